"""Evaluation inside the PPO / RTO trainer (the ``eval`` section, rto_llm/evaluation.py): eval rows at the right
steps, sample completions, gold rewards (a callable and an exact token task), red flags, errors that name the
field, and training that evaluation leaves bitwise unchanged."""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap

import numpy as np
import pytest
import torch

from rto_llm.config import ConfigError, load_config
from rto_llm.evaluation import EvalRedFlags, GoldRewardError, fitted_change
from rto_llm.ppo.config import PPOConfig, RTOConfig
from rto_llm.testing import ppo_overrides, write_jsonl

GOLD_MODULE = textwrap.dedent('''
    """Gold rewards for the tests (imported by name from eval.gold)."""
    import random

    import numpy as np
    import torch

    random.random()          # draws at import: the run's random stream must not notice
    np.random.rand()


    def short_without_wrong(prompts, responses):
        """The issue's gold check: no 'wrong', and short; it also draws from every global RNG."""
        random.random(), np.random.rand(), torch.rand(3)
        return [float("wrong" not in r.split()) - 0.1 * len(r.split()) for r in responses]


    def count_ok(prompts, responses):
        return [float(r.split().count("ok")) for r in responses]


    def minus_ok(prompts, responses):
        return [-float(r.split().count("ok")) for r in responses]


    def one_value(prompts, responses):
        return [0.0]


    def not_finite(prompts, responses):
        return [float("nan")] * len(responses)


    def raises(prompts, responses):
        raise RuntimeError("gold server down")


    def strings(prompts, responses):
        return ["high"] * len(responses)


    NOT_CALLABLE = 3
''')

EVAL_KEYS = {
    "eval/rm_score", "eval/rm_score_std", "eval/rm_score_normalized", "eval/kl", "eval/kl3", "eval/response_length",
    "eval/response_length_p95", "eval/eos_rate", "eval/eos_first_frac", "eval/frac_at_max_length", "eval/win_rate",
    "eval/ref_rm_score", "eval/num_prompts", "eval/time_s", "eval/flag_rm_up_gold_down", "eval/flag_length_collapse",
    "eval/red_flags",
}


@pytest.fixture
def gold_mod(tmp_path, monkeypatch):
    """Module name of GOLD_MODULE, importable for this test."""
    d = tmp_path / "goldpkg"
    d.mkdir()
    (d / "rto_test_gold.py").write_text(GOLD_MODULE)
    monkeypatch.syspath_prepend(str(d))
    return "rto_test_gold"


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def _samples(out) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out, "samples.jsonl"))]


def _eval_rows(rows):
    return [r for r in rows if any(k.startswith("eval/") for k in r)]


def _strip(h):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in h]


# ---------------------------------------------------------------------------------------------------
# Rows, samples, history
# ---------------------------------------------------------------------------------------------------


def test_eval_rows_samples_and_history(make_trainer, fx, tmp_path, gold_mod):
    import importlib

    out = tmp_path / "ev"
    tr = make_trainer("ppo.max_rollouts=5", "eval.every=2", f"data.eval_path={fx['prompts']}", "eval.max_prompts=8",
                      "eval.num_samples=3", f"eval.gold={gold_mod}:short_without_wrong", "log.tensorboard=true",
                      out=out)
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert all(not any(k.startswith("eval/") for k in h) for h in hist)   # training rows stay training rows
    ev = _eval_rows(_rows(out))
    assert [r["step"] for r in ev] == [0, 2, 4, 5]                        # at start, every 2, after the last
    for r in ev:
        assert EVAL_KEYS | {"eval/gold", "eval/gold_ref", "eval/gold_win_rate_sampled"} <= set(r), EVAL_KEYS - set(r)
        assert r["eval/num_prompts"] == 8 and 0 <= r["eval/win_rate"] <= 1 and 0 <= r["eval/eos_rate"] <= 1
        assert 1 <= r["eval/response_length"] <= 6 and r["eval/response_length_p95"] <= 6
    assert abs(ev[0]["eval/kl"]) < 1e-5 and abs(ev[0]["eval/kl3"]) < 1e-5  # policy = reference at step 0
    assert ev[-1]["eval/kl3"] > 1e-3                                      # and then it moves
    assert tr.eval_history == ev                                           # the same rows, programmatically
    samples = _samples(out)
    assert [s["step"] for s in samples] == [0] * 3 + [2] * 3 + [4] * 3 + [5] * 3
    gold = importlib.import_module(gold_mod).short_without_wrong
    for s in samples:
        assert {"prompt", "response", "rm_score", "score_normalized", "gold", "ref_response", "ref_rm_score"} <= set(s)
        assert s["prompt"].startswith("count up from")                     # the text as written in the file
        assert s["gold"] == pytest.approx(gold([s["prompt"]], [s["response"]])[0])
    # TensorBoard: the eval scalars and the sample table as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("eval/rm_score")] == [0, 2, 4, 5]
    text = acc.Tensors("eval/samples/text_summary")
    assert [t.step for t in text] == [0, 2, 4, 5]
    assert "| prompt | response | RM score | gold |" in text[0].tensor_proto.string_val[0].decode()


def test_eval_path_is_honoured_without_every(make_trainer, fx, tmp_path):
    """data.eval_path alone: the starting policy and the final one are evaluated (never ignored)."""
    out = tmp_path / "end"
    make_trainer("ppo.max_rollouts=3", f"data.eval_path={fx['prompts']}", "eval.max_prompts=8", out=out).train()
    assert [r["step"] for r in _eval_rows(_rows(out))] == [0, 3]
    out2 = tmp_path / "end2"
    make_trainer("ppo.max_rollouts=3", f"data.eval_path={fx['prompts']}", "eval.max_prompts=4", "eval.at_start=false",
                 "eval.num_samples=0", "eval.win_rate=false", out=out2).train()
    ev = _eval_rows(_rows(out2))
    assert [r["step"] for r in ev] == [3] and ev[0]["eval/num_prompts"] == 4 and "eval/win_rate" not in ev[0]
    assert not os.path.exists(out2 / "samples.jsonl")
    out3 = tmp_path / "off"                                                 # no eval_path, every = 0: nothing
    tr = make_trainer("ppo.max_rollouts=2", out=out3)
    tr.train()
    assert not _eval_rows(_rows(out3)) and tr.eval_history == []


# ---------------------------------------------------------------------------------------------------
# Evaluation leaves training unchanged (its own random stream, global RNG restored)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, extra", [(PPOConfig, ()), (RTOConfig, ("rto.dpo_path={dpo_adapter}",))])
def test_eval_does_not_change_the_training_trajectory(make_trainer, fx, tmp_path, gold_mod, cls, extra, monkeypatch):
    extra = tuple(e.format(**fx) for e in extra)
    common = ("ppo.max_rollouts=4", *extra)
    with_eval = (*common, "eval.every=1", f"data.eval_path={fx['prompts']}", "eval.max_prompts=8",
                 f"eval.gold={gold_mod}:short_without_wrong")
    a = make_trainer(*common, cls=cls, out=tmp_path / "a")
    ha = a.train()
    b = make_trainer(*with_eval, cls=cls, out=tmp_path / "b")
    hb = b.train()
    assert len(b.eval_history) == 5
    assert _strip(ha) == _strip(hb)                                         # bitwise equal training metrics
    for m in ("actor", "critic"):
        sa, sb = getattr(a.roles, m).state_dict(), getattr(b.roles, m).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the comparison can fail: an evaluation that does not restore the global RNG changes the rollouts
    import rto_llm.evaluation as E

    monkeypatch.setattr(E, "restore_global_rng", lambda state: None)
    c = make_trainer(*with_eval, cls=cls, out=tmp_path / "c")
    assert _strip(c.train()) != _strip(ha)


def test_evaluations_reuse_one_random_stream(make_trainer, fx):
    """Common random numbers: two evaluations of the same policy give the same samples and metrics."""
    tr = make_trainer("eval.every=1", f"data.eval_path={fx['prompts']}", "eval.max_prompts=8")
    r1, s1 = tr.evaluator.evaluate(tr, 0)
    torch.rand(5)
    r2, s2 = tr.evaluator.evaluate(tr, 0)
    assert s1 == s2 and {k: v for k, v in r1.items() if k != "eval/time_s"} == \
        {k: v for k, v in r2.items() if k != "eval/time_s"}


def test_resume_keeps_the_eval_history(make_trainer, fx, tmp_path):
    common = ("ppo.max_rollouts=4", "eval.every=1", f"data.eval_path={fx['prompts']}", "eval.max_prompts=8")
    full = make_trainer(*common, out=tmp_path / "full")
    full.train()
    part = make_trainer(*common, "checkpoint.save_every=2", out=tmp_path / "part")
    part.train(stop_after=2)
    resumed = make_trainer(*common, "checkpoint.resume=latest", out=tmp_path / "part")
    resumed.train()

    def strip(h):
        return [{k: v for k, v in r.items() if k != "eval/time_s"} for r in h]

    assert [r["step"] for r in resumed.eval_history] == [0, 1, 2, 3, 4]
    assert strip(resumed.eval_history) == strip(full.eval_history)
    assert [s["step"] for s in _samples(tmp_path / "part")] == [s["step"] for s in _samples(tmp_path / "full")]


# ---------------------------------------------------------------------------------------------------
# Errors that name the field
# ---------------------------------------------------------------------------------------------------


def test_eval_without_prompts_is_refused(fx, tmp_path, make_trainer, capsys):
    def cfg(*o):
        return load_config(PPOConfig, None, ppo_overrides(fx, str(tmp_path / "x"), *o))

    with pytest.raises(ConfigError, match="eval.every=2 needs evaluation data: set data.eval_path"):
        cfg("eval.every=2")
    with pytest.raises(ConfigError, match="eval.gold=.* evaluation is off: set data.eval_path"):
        cfg("eval.gold=a:b")
    with pytest.raises(ConfigError, match="eval.gold='nocolon': expected 'module:function'"):
        cfg(f"data.eval_path={fx['prompts']}", "eval.gold=nocolon")
    with pytest.raises(ConfigError, match="eval.flag_window must be >= 3"):
        cfg("eval.flag_window=2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="data.eval_path=.*empty.jsonl.* yields no evaluation prompts"):
        make_trainer("eval.every=1", f"data.eval_path={empty}")
    junk = write_jsonl(str(tmp_path / "junk.jsonl"), [{"text": "no prompt key"}] * 3)
    with pytest.raises(ConfigError, match="yields no evaluation prompts"):
        make_trainer("eval.every=1", f"data.eval_path={junk}", "data.on_malformed=skip")
    with pytest.raises(ConfigError, match="data.eval_path=.*nowhere.jsonl.*no such file"):
        make_trainer("eval.every=1", f"data.eval_path={tmp_path / 'nowhere.jsonl'}")
    from rto_llm.cli import main

    assert main(["ppo", *ppo_overrides(fx, str(tmp_path / "cli")), "eval.every=3"]) == 2
    assert "config error: eval.every=3 needs evaluation data" in capsys.readouterr().err


def test_gold_callable_bad_inputs_are_refused(make_trainer, fx, tmp_path, gold_mod):
    runs = iter(range(100))

    def make(gold):
        return make_trainer("ppo.max_rollouts=1", f"data.eval_path={fx['prompts']}", "eval.max_prompts=4",
                            f"eval.gold={gold}", out=tmp_path / f"run{next(runs)}")

    for gold, msg in [("rto_no_such_module_xyz:f", "cannot import 'rto_no_such_module_xyz'"),
                      (f"{gold_mod}:missing", "has no attribute 'missing'"),
                      (f"{gold_mod}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
                      (f"{tmp_path}/none.py:f", "no such file"),
                      ("task:", "is not a task folder"), (f"task:{tmp_path}", "is not a task folder")]:
        with pytest.raises(GoldRewardError, match=f"eval.gold=.*{msg}"):
            make(gold)
    for fn, msg in [("one_value", "returned 1 value.* for 4 responses"), ("not_finite", "non-finite values"),
                    ("raises", "raised RuntimeError: gold server down"), ("strings", "not a list of floats")]:
        tr = make(f"{gold_mod}:{fn}")
        with pytest.raises(GoldRewardError, match=f"eval.gold=.*{msg}"):
            tr.train()                                                      # the first (step 0) evaluation
    # a file path works as well as a module name
    path = os.path.join(os.path.dirname(__import__(gold_mod).__file__), f"{gold_mod}.py")
    tr = make(f"{path}:count_ok")
    tr.train()
    assert all("eval/gold" in r for r in tr.eval_history)


# ---------------------------------------------------------------------------------------------------
# Exact gold on a token task
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_fx(tmp_path_factory):
    """An exported token task, a token-counting RM and a LoRA DPO adapter on its tokenizer."""
    from transformers import AutoModelForCausalLM

    from rto_llm.testing import build_preferring_lm, build_token_counting_rm, save_model_dir, set_adapter_base
    from rto_llm.token_task import build_task_tokenizer, export_task
    from rto_sim.token_task import make_token_task

    root = str(tmp_path_factory.mktemp("task"))
    task = make_token_task(3, 3, 2, structure="last_token", feature_kind="bigram", beta=0.5, seed=2)
    ex = export_task(task, os.path.join(root, "task"), n_sft=32, n_rl_prompts=32, seed=0, hidden_size=32)
    tok = build_task_tokenizer(task)
    rm = save_model_dir(os.path.join(root, "rm"), build_token_counting_rm(tok, 4, hidden_size=32), tok)
    actor = AutoModelForCausalLM.from_pretrained(ex.model_dir)
    adapter = os.path.join(root, "dpo_adapter")
    build_preferring_lm(actor, 4, lora_rank=4).save_pretrained(adapter)
    set_adapter_base(adapter, ex.model_dir)
    evals = write_jsonl(os.path.join(root, "eval.jsonl"), [{"prompt": w} for w in task.prompt_words] * 16)
    return {"ex": ex, "task": task, "rm": rm, "adapter": adapter, "eval": evals, "out": root}


def _task_overrides(t, out, *extra):
    H = t["task"].H
    fx = {"actor": t["ex"].model_dir, "prompts": t["ex"].prompts, "rm": t["rm"]}
    return ppo_overrides(fx, out, f"rollout.max_new_tokens={H}", "data.apply_chat_template=false",
                         "data.max_prompt_len=2", f"data.max_len={H + 3}", f"data.eval_path={t['eval']}",
                         f"eval.gold=task:{t['ex'].root}", *extra)


@pytest.mark.parametrize("cls, extra", [(RTOConfig, ("rto.dpo_path={adapter}",)), (PPOConfig, ())])
def test_task_gold_runs_the_exact_evaluator(task_fx, tmp_path, cls, extra):
    from rto_llm.exact_eval import evaluate_policy
    from rto_llm.ppo.trainer import PPOTrainer
    from rto_llm.token_task import token_ids_to_actions

    extra = tuple(e.format(**task_fx) for e in extra)
    out = str(tmp_path / "run")
    cfg = load_config(cls, None, _task_overrides(task_fx, out, "ppo.max_rollouts=3", "eval.every=1",
                                                 "eval.num_samples=32", *extra))
    tr = PPOTrainer(cfg)
    tr.train()
    ev = tr.eval_history
    assert [r["step"] for r in ev] == [0, 1, 2, 3]
    keys = {"eval/gold_J", "eval/gold_subopt", "eval/gold_return", "eval/gold_kl", "eval/gold_win_rate",
            "eval/valid_mass", "eval/gold_beta", "eval/gold_valid_frac"}
    for r in ev:
        assert keys <= set(r) and r["eval/gold_subopt"] >= 0 and r["eval/gold_beta"] == cfg.kl.beta2
        assert ("eval/dpo_implicit_reward" in r) == (cls is RTOConfig)
    # step 0: the actor is the reference (with an adapter DPO model the reference is the adapter switched off)
    assert abs(ev[0]["eval/gold_kl"]) < 1e-12 and ev[0]["eval/gold_win_rate"] == pytest.approx(0.5, abs=1e-12)
    # the last evaluation equals the exact evaluator run by hand on the final actor
    task = task_fx["task"]
    res = evaluate_policy(tr.roles.actor, task_fx["ex"].model_dir, task_fx["ex"].root, cfg.kl.beta2)
    assert ev[-1]["eval/gold_J"] == pytest.approx(res.J, abs=1e-6)
    assert ev[-1]["eval/gold_subopt"] == pytest.approx(res.sub_opt, abs=1e-6)
    assert ev[-1]["eval/gold_kl"] == pytest.approx(res.kl, abs=1e-6) and res.kl > 1e-4
    if cls is RTOConfig:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(task_fx["ex"].model_dir)
        dpo = PeftModel.from_pretrained(base, task_fx["adapter"]).eval()
        r2 = evaluate_policy(tr.roles.actor, task_fx["ex"].model_dir, task_fx["ex"].root, cfg.kl.beta2,
                             dpo_model=dpo, beta_dpo=cfg.rto.beta1)
        assert ev[-1]["eval/dpo_implicit_reward"] == pytest.approx(r2.dpo_reward, abs=1e-6)
    # per-sample gold: the task's R of each valid sampled response, None for a response outside the task
    tok = tr.tokenizer
    samples = _samples(out)
    assert len(samples) == 4 * 32
    n_valid = 0
    for s in samples:
        if s["gold"] is None:                   # e.g. a prompt word inside the response
            continue
        n_valid += 1
        ids = tok(s["response"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if s["has_eos"] else [])
        acts = token_ids_to_actions(ids, task)
        assert acts is not None
        assert s["gold"] == pytest.approx(task.gold_return(task.prompt_words.index(s["prompt"]), acts))
        if any(w in s["response"].split() for w in task.prompt_words):
            raise AssertionError(f"a response with a prompt word got a gold value: {s}")
    assert n_valid > 0 and any(s["gold"] is None for s in samples)
    assert ev[-1]["eval/gold_valid_frac"] == pytest.approx(
        sum(s["gold"] is not None for s in samples if s["step"] == 3) / 32)


def test_task_gold_refuses_a_foreign_tokenizer(make_trainer, fx, task_fx):
    with pytest.raises(GoldRewardError, match="eval.gold='task:.*the policy's tokenizer .*vocabulary is not the task"):
        make_trainer("eval.every=1", f"data.eval_path={fx['prompts']}", f"eval.gold=task:{task_fx['ex'].root}")


def test_task_gold_needs_a_positive_beta(task_fx, tmp_path):
    from rto_llm.ppo.trainer import PPOTrainer

    cfg = load_config(PPOConfig, None, _task_overrides(task_fx, str(tmp_path / "b0"), "ppo.max_rollouts=1",
                                                       "kl.beta2=0"))
    with pytest.raises(GoldRewardError, match="set eval.gold_beta"):
        PPOTrainer(cfg).train()
    cfg = load_config(PPOConfig, None, _task_overrides(task_fx, str(tmp_path / "b1"), "ppo.max_rollouts=1",
                                                       "kl.beta2=0", "eval.gold_beta=0.3", "eval.at_start=false"))
    tr = PPOTrainer(cfg)
    tr.train()
    assert tr.eval_history[-1]["eval/gold_beta"] == 0.3


# ---------------------------------------------------------------------------------------------------
# Red flags on synthetic metric sequences
# ---------------------------------------------------------------------------------------------------


def _row(rm, gold=None, rm_std=0.1, n=100, gold_std=0.1, length=6.0, eos_first=0.0, exact=False):
    r = {"eval/rm_score": rm, "eval/rm_score_std": rm_std, "eval/num_prompts": float(n),
         "eval/response_length": length, "eval/eos_first_frac": eos_first}
    if gold is not None:
        if exact:
            r["eval/gold_return"] = gold
        else:
            r.update({"eval/gold": gold, "eval/gold_std": gold_std, "eval/gold_n": float(n)})
    return r


def _fire(rows, **kw):
    f = EvalRedFlags(**kw)
    return [sorted(f.check(i, r)) for i, r in enumerate(rows)]


def test_fitted_change_and_its_standard_error():
    d, se = fitted_change([1.0, 2.0, 3.0, 4.0], [0.5] * 4)
    assert d == pytest.approx(3.0) and se == pytest.approx(0.5 * 3 / math.sqrt(5))
    ys = np.random.default_rng(0).normal(0, 1, (20000, 4))
    ds = [fitted_change(y, [1.0] * 4)[0] for y in ys]
    assert np.std(ds) == pytest.approx(fitted_change([0] * 4, [1.0] * 4)[1], rel=0.03)   # se is the real spread


def test_red_flag_rm_up_gold_down_fires():
    # the run: RM score rising, held-out gold falling from 10/10 to 0/10
    rows = [_row(0.1 + 0.2 * i, 1.0 - 0.35 * i, gold_std=0.3, n=10) for i in range(4)]
    assert _fire(rows) == [[], [], [], ["rm_up_gold_down"]]
    # exact task gold (no sampling noise): a steady fall fires too
    rows = [_row(0.1 * i, 0.5 - 0.05 * i, exact=True) for i in range(5)]
    assert _fire(rows)[-2:] == [["rm_up_gold_down"], ["rm_up_gold_down"]]
    # the window slides: a rise-and-fall of the gold is caught once the fall dominates the last 3 evals
    rows = [_row(0.1 * i, g, gold_std=0.01) for i, g in enumerate([0.2, 0.5, 0.8, 0.5, 0.2])]
    assert _fire(rows, window=3) == [[], [], [], [], ["rm_up_gold_down"]]


def test_red_flag_rm_up_gold_down_does_not_fire():
    up = [_row(0.1 + 0.2 * i, 0.1 + 0.2 * i) for i in range(6)]                      # both rising
    flat = [_row(0.1 + 0.2 * i, 0.5) for i in range(6)]                              # gold flat
    rm_down = [_row(1.0 - 0.2 * i, 1.0 - 0.2 * i) for i in range(6)]                 # both falling
    noise = [_row(r, g, rm_std=1.0, gold_std=1.0, n=16)                               # within 2 se (0.25 each)
             for r, g in zip([0.1, 0.2, 0.15, 0.3, 0.35], [0.5, 0.45, 0.5, 0.4, 0.38])]
    tiny = [_row(0.1 * i, 0.5 - 1e-4 * i, exact=True) for i in range(6)]             # < 1% of |gold|
    no_gold = [_row(0.1 * i) for i in range(6)]
    for rows in (up, flat, rm_down, noise, tiny, no_gold):
        assert all("rm_up_gold_down" not in f for f in _fire(rows)), rows
    # too few evaluations for a trend: never before the window is full
    assert _fire([_row(0.1 + 0.2 * i, 1.0 - 0.4 * i, n=10) for i in range(3)]) == [[], [], []]


def test_red_flag_length_collapse():
    # mean length falls below half the first evaluation's
    assert _fire([_row(0, length=L) for L in (6.0, 4.0, 3.5, 2.5)]) == [[], [], [], ["length_collapse"]]
    # most responses end at the first token (the issue: both policies collapsed to EOS)
    assert _fire([_row(0, eos_first=e) for e in (0.1, 0.4, 0.9)]) == [[], [], ["length_collapse"]]
    # does not fire: stable or growing lengths, a starting policy that is already short, a first eval that
    # already ends most responses at once, a custom fraction
    assert _fire([_row(0, length=L) for L in (6.0, 5.0, 4.0, 3.5)]) == [[]] * 4
    assert _fire([_row(0, length=L) for L in (1.5, 1.0, 0.7)]) == [[]] * 3
    assert _fire([_row(0, eos_first=e) for e in (0.7, 0.9, 1.0)]) == [[]] * 3
    assert _fire([_row(0, length=L) for L in (6.0, 2.5)], length_frac=0.4) == [[], []]


def test_red_flags_state_round_trip_and_counting(make_trainer, fx, monkeypatch, caplog):
    f = EvalRedFlags()
    for i in range(3):
        f.check(i, _row(0.1 + 0.2 * i, 1.0 - 0.35 * i, gold_std=0.3, n=10))
    g = EvalRedFlags()
    g.load_state_dict(f.state_dict())
    assert g.check(3, _row(0.7, -0.05, gold_std=0.3, n=10)) == f.check(3, _row(0.7, -0.05, gold_std=0.3, n=10))
    # wiring: the evaluator writes 0/1 keys, counts the flags and warns on the console
    tr = make_trainer("eval.every=1", f"data.eval_path={fx['prompts']}", "eval.max_prompts=4")
    seq = iter([_row(0.1 + 0.2 * i, 1.0 - 0.35 * i, gold_std=0.3, n=10, eos_first=0.3 * i) for i in range(4)])
    monkeypatch.setattr(tr.evaluator, "evaluate", lambda trainer, n: (next(seq), []))
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        rows = [tr.evaluator.run(tr, n) for n in range(4)]
    assert [r["eval/flag_rm_up_gold_down"] for r in rows] == [0, 0, 0, 1]
    assert [r["eval/flag_length_collapse"] for r in rows] == [0, 0, 1, 1]
    assert rows[-1]["eval/red_flags"] == 2
    assert tr.evaluator.flag_counts == {"rm_up_gold_down": 1, "length_collapse": 2}
    assert "red flag: RM score up" in caplog.text and "EOS at the first token" in caplog.text


def test_two_process_evaluation(fx, tmp_path):
    """torchrun, 2 processes (gloo): each evaluates its share of the prompts, the rows cover all of them, only
    the main process writes samples."""
    import subprocess
    import sys

    from rto_llm.distributed import free_port

    out = tmp_path / "ddp"
    over = ppo_overrides(fx, str(out), "ppo.max_rollouts=2", "eval.every=1", f"data.eval_path={fx['prompts']}",
                         "eval.max_prompts=9", "eval.num_samples=3", rollout=8, train_batch=4, micro=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "rto_llm.ppo.cli", "ppo", *over]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ev = _eval_rows(_rows(out))
    assert [r["step"] for r in ev] == [0, 1, 2]
    assert all(r["eval/num_prompts"] == 8 for r in ev)                     # 9 prompts: a multiple of 2 is used
    assert all(math.isfinite(v) for r in ev for v in r.values())
    assert abs(ev[0]["eval/kl"]) < 1e-5 and 0 <= ev[0]["eval/win_rate"] <= 1
    assert [s["step"] for s in _samples(out)] == [0] * 3 + [1] * 3 + [2] * 3


@pytest.mark.parametrize("gold_fn, fires", [("minus_ok", True), ("count_ok", False)])
def test_rm_up_gold_down_in_a_real_run(make_trainer, fx, tmp_path, gold_mod, gold_fn, fires):
    """The issue's run in miniature: the RM prefers 'ok'; a gold that penalizes 'ok' falls while the RM score
    rises (the flag fires), a gold that agrees with the RM rises with it (no flag)."""
    budget = ("ppo.max_rollouts=12", "train.lr=5e-3", "critic.lr=5e-3", "ppo.epochs=2", "kl.beta2=0.2",
              "reward.missing_eos_mode=off", "train.seed=0")
    tr = make_trainer(*budget, "eval.every=3", f"data.eval_path={fx['prompts']}", "eval.max_prompts=32",
                      f"eval.gold={gold_mod}:{gold_fn}", "eval.flag_window=3", out=tmp_path / gold_fn, rollout=32,
                      train_batch=8, micro=8, max_new_tokens=8)
    tr.train()
    ev = tr.eval_history
    assert [r["step"] for r in ev] == [0, 3, 6, 9, 12]
    assert ev[-1]["eval/rm_score"] > ev[0]["eval/rm_score"] + 0.1
    flags = [r["eval/flag_rm_up_gold_down"] for r in ev]
    assert (sum(flags) > 0) == fires, (flags, [(r["eval/rm_score"], r["eval/gold"]) for r in ev])
    assert tr.evaluator.flag_counts["rm_up_gold_down"] == sum(flags)
