"""E8 foundations: a simulator token task exported for the LLM stages, and the exact evaluator of neural
policies (rto_llm.token_task, rto_llm.exact_eval). Tiny Llama models from configs, no network."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import expit, logsumexp

from rto_llm.exact_eval import enumerated_logprobs, evaluate_policy, sequence_logprobs, tree_policy
from rto_llm.token_task import (
    action_token_ids,
    build_task_model,
    build_task_tokenizer,
    check_task_tokenizer,
    export_task,
    prompt_token_ids,
    sample_preferences,
)
from rto_sim import enumerate_responses, evaluate, implicit_token_reward, soft_bellman
from rto_sim.exact import sequence_kl
from rto_sim.token_task import TokenTask, make_token_task

BETA = 0.5
QUANTITIES = ("J", "kl", "expected_return", "J_star", "sub_opt", "optimal_return", "optimal_kl", "win_rate")


@pytest.fixture(scope="module")
def task():
    return make_token_task(3, 3, 2, structure="last_token", feature_kind="bigram", beta=BETA, rho=[0.35, 0.65],
                           seed=2)


@pytest.fixture(scope="module")
def tok(task):
    return build_task_tokenizer(task)


@pytest.fixture(scope="module")
def models(task, tok):
    """policy, reference, DPO model: random tiny Llamas in float64 (so the cross-check can be tight)."""
    return {name: build_task_model(task, tok, hidden_size=32, seed=s).double().eval()
            for name, s in (("policy", 1), ("reference", 2), ("dpo", 3))}


def _tabular(task, tok, model):
    return tree_policy(model, task, tok)


def _brute(tree, log_p, log_q, reward, beta):
    """Sequence-level J, KL, E R, J*, win rate from enumerated log-probs (independent of the evaluator)."""
    e = enumerate_responses(tree)
    lp, lq, R = e.log_prob(log_p), e.log_prob(log_q), e.returns(reward)
    P = tree.n_prompts
    lp, lq, R = lp.reshape(P, -1), lq.reshape(P, -1), R.reshape(P, -1)
    p, q = np.exp(lp), np.exp(lq)
    win = np.array([(p[i][:, None] * q[i][None, :] * expit(R[i][:, None] - R[i][None, :])).sum() for i in range(P)])
    jstar = beta * logsumexp(lq + R / beta, axis=1)
    return {"win_rate": float(tree.rho @ win), "J_star": float(tree.rho @ jstar)}


# ---------------------------------------------------------------------------------------------------
# Export: the stages read the folder with their normal code
# ---------------------------------------------------------------------------------------------------


def test_tokenizer_maps_the_task_eos_and_export_is_read_by_the_stages(task, tmp_path):
    from rto_llm.config import DPOConfig, SFTConfig, load_config
    from rto_llm.data import load_examples
    from rto_llm.models import check_tokenizers, load_tokenizer

    ex = export_task(task, str(tmp_path / "task"), n_sft=64, n_rl_prompts=16, seed=3)
    tok = load_tokenizer(ex.model_dir)
    check_tokenizers({"policy": tok})                               # PAD != EOS, as the trainers require
    check_task_tokenizer(tok, task)
    act = action_token_ids(task)
    assert tok.eos_token_id == act[task.eos] == tok.convert_tokens_to_ids(task.eos_word)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template is None
    assert [tok.convert_ids_to_tokens(int(i)) for i in act] == task.token_words
    pids = prompt_token_ids(tok, task)
    assert all(p == [tok.bos_token_id, tok.convert_tokens_to_ids(w)] for p, w in zip(pids, task.prompt_words))
    cfg = load_config(SFTConfig, ex.sft_config)
    assert cfg.data.apply_chat_template is False
    exs, stats = load_examples("sft", ex.sft, "train", tok, cfg.data)
    assert stats.kept == 64 and stats.prompt_truncated == 0 and stats.dropped_response_too_long == 0
    rows = [json.loads(x) for x in open(ex.sft)]
    for e, r in zip(exs, rows):
        y = task.parse_response(r["response"])
        want = pids[r["prompt_index"]] + act[y].tolist()
        if y[-1] != task.eos:                            # H tokens without EOS: the loader appends EOS at H + 1
            assert len(y) == task.H
            want = want + [tok.eos_token_id]
        assert e["input_ids"] == want and e["prompt_len"] == 2
    prompts, _ = load_examples("prompt", ex.prompts, "train", tok, cfg.data)
    assert len(prompts) == 16 and all(p["prompt_ids"] in pids for p in prompts)
    ev = [json.loads(x) for x in open(ex.eval_prompts)]
    assert [r["prompt_index"] for r in ev] == [0, 1] and sum(r["rho"] for r in ev) == pytest.approx(1.0)
    back = TokenTask.from_json(ex.task_json)
    assert np.array_equal(back.enumerate().returns, task.enumerate().returns)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ex.model_dir, local_files_only=True)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    # preference rows in the pair format are read by the RM / DPO loaders
    prefs = sample_preferences(ex.model_dir, ex.root, 8, seed=0)
    assert prefs.path == os.path.join(ex.root, "prefs.jsonl")
    dcfg = load_config(DPOConfig, None, [f"model.path={ex.model_dir}", f"data.train_path={prefs.path}",
                                         "data.apply_chat_template=false", "data.max_prompt_len=2",
                                         f"data.max_len={task.H + 3}"])
    pairs, st = load_examples("preference", prefs.path, "train", tok, dcfg.data)
    assert st.kept == 8 and len(pairs) == 8
    with pytest.raises(ValueError, match="overwrite"):
        export_task(task, ex.root)


# ---------------------------------------------------------------------------------------------------
# The cross-check against rto_sim's recursions
# ---------------------------------------------------------------------------------------------------


def test_cross_check_restricted_policy_equals_rto_sim_recursions(task, tok, models):
    pol, ref, dpo = models["policy"], models["reference"], models["dpo"]
    res = evaluate_policy(pol, ref, task, tokenizer=tok, restrict_to_task=True, dpo_model=dpo, beta_dpo=0.3)
    assert res.method == "exact" and res.n_responses == task.num_responses == 15
    tp, tr, td = (_tabular(task, tok, m) for m in (pol, ref, dpo))
    mdp = tp.tree.with_reference(tr.policy)
    ev = evaluate(mdp, tp.policy, tp.reward, beta=BETA)
    star = soft_bellman(mdp, tp.reward, BETA)
    J_star = float(mdp.rho @ star.V[0])
    want = {"J": ev.J, "kl": ev.kl, "expected_return": ev.expected_return, "J_star": J_star, "sub_opt": J_star - ev.J}
    ev_star = evaluate(mdp, star.policy, tp.reward, beta=BETA)
    want.update(optimal_return=ev_star.expected_return, optimal_kl=ev_star.kl)
    want.update(_brute(mdp, tp.log_policy, tr.log_policy, tp.reward, BETA))
    for k in QUANTITIES:
        assert getattr(res, k) == pytest.approx(want[k], abs=1e-6), k
    assert np.allclose(res.per_prompt["J"], ev.J_per_prompt, atol=1e-6)
    assert np.allclose(res.per_prompt["J_star"], star.V[0], atol=1e-6)
    # pi*_beta at the sequence level = the soft-Bellman policy's sequence probabilities
    e = enumerate_responses(mdp)
    assert np.allclose(res.responses["log_optimal"], e.log_prob(star.log_policy), atol=1e-6)
    assert np.allclose(res.responses["log_policy"], e.log_prob(tp.log_policy), atol=1e-6)
    # DPO implicit reward: E_pi sum_h beta log pi_dpo/pi_ref per token = the sequence-level mean
    r_dpo = implicit_token_reward(mdp, td.policy, 0.3)
    assert res.dpo_reward == pytest.approx(evaluate(mdp, tp.policy, r_dpo, beta=0.0).expected_return, abs=1e-6)
    # raw valid mass = sum over valid responses of the raw (unrenormalized) conditionals
    for name, t in (("valid_mass", tp), ("valid_mass_ref", tr)):
        mass = np.bincount(e.prompt, weights=np.exp(e.log_prob(t.raw_log_policy)))
        assert getattr(res, name) == pytest.approx(float(mdp.rho @ mass), abs=1e-9)
    assert 0 < res.valid_mass < 0.9                    # a random model leaks mass onto PAD / BOS / prompt words
    assert res.sub_opt >= 0 and res.kl >= 0 and all(v == 0.0 for v in res.se.values())


def test_cross_check_is_not_vacuous(task, tok, models):
    """A wrong beta, or another policy, moves J far beyond the cross-check's tolerance."""
    pol, ref = models["policy"], models["reference"]
    tp, tr = _tabular(task, tok, pol), _tabular(task, tok, ref)
    mdp = tp.tree.with_reference(tr.policy)
    J = evaluate(mdp, tp.policy, tp.reward, beta=BETA).J
    wrong_beta = evaluate_policy(pol, ref, task, 0.7, tokenizer=tok, restrict_to_task=True)
    assert abs(wrong_beta.J - J) > 1e-3
    other = evaluate_policy(models["dpo"], ref, task, tokenizer=tok, restrict_to_task=True)
    assert abs(other.J - J) > 1e-3
    unrestricted = evaluate_policy(pol, ref, task, tokenizer=tok)   # conditioned on validity: another policy
    assert abs(unrestricted.J - J) > 1e-3


def test_direct_sequence_logprobs_equal_the_prefix_batched_ones(task, tok, models):
    """One forward per response (any batch size, mixed lengths) = one forward per maximal prefix."""
    e = task.enumerate()
    act, pids = action_token_ids(task), prompt_token_ids(tok, task)
    prompts = [pids[p] for p in e.prompt]
    responses = [act[y].tolist() for y in e.responses()]
    for model in (models["policy"], build_task_model(task, tok, hidden_size=32, seed=5)):   # float64, float32
        a_raw, a_res = sequence_logprobs(model, prompts, responses, tok.pad_token_id, act, batch_size=7)
        b_raw, b_res = enumerated_logprobs(model, task, tok, e.prompt, e.actions, e.length, batch_size=5)
        tol = 1e-10 if next(model.parameters()).dtype == torch.float64 else 2e-5
        assert np.abs(a_raw - b_raw).max() < tol and np.abs(a_res - b_res).max() < tol
        assert np.allclose(np.bincount(e.prompt, weights=np.exp(b_res)), 1.0, atol=1e-5)


@pytest.mark.parametrize("A, H, P", [(2, 3, 1), (4, 1, 3), (3, 2, 2)])
def test_prefix_batching_edge_shapes(A, H, P):
    """One live token (A = 2), H = 1 (EOS or one token), and a two-token horizon."""
    t = make_token_task(A, H, P, seed=1)
    tk = build_task_tokenizer(t)
    model = build_task_model(t, tk, hidden_size=16, num_layers=1, seed=2).double()
    e = t.enumerate()
    act, pids = action_token_ids(t), prompt_token_ids(tk, t)
    a_raw, a_res = sequence_logprobs(model, [pids[p] for p in e.prompt], [act[y].tolist() for y in e.responses()],
                                     tk.pad_token_id, act)
    b_raw, b_res = enumerated_logprobs(model, t, tk, e.prompt, e.actions, e.length)
    assert np.abs(a_raw - b_raw).max() < 1e-10 and np.abs(a_res - b_res).max() < 1e-10
    assert np.allclose(np.bincount(e.prompt, weights=np.exp(b_res)), 1.0, atol=1e-10)


class _TaskOnly(torch.nn.Module):
    """A model whose non-task logits are -inf: it never leaves the task."""

    def __init__(self, base, allowed):
        super().__init__()
        self.base, self.config = base, base.config
        bias = torch.full((base.config.vocab_size,), float("-inf"), dtype=torch.float64)
        bias[torch.as_tensor(allowed)] = 0.0
        self.register_buffer("bias", bias)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def forward(self, **kw):
        return SimpleNamespace(logits=self.base(**kw).logits.double() + self.bias)


def test_leak_is_handled_by_conditioning_on_validity(task, tok, models):
    pol, ref = models["policy"], models["reference"]
    res = evaluate_policy(pol, ref, task, tokenizer=tok)
    tp, tr = _tabular(task, tok, pol), _tabular(task, tok, ref)
    e = enumerate_responses(tp.tree)
    P = task.n_prompts
    lp = e.log_prob(tp.raw_log_policy).reshape(P, -1)
    lq = e.log_prob(tr.raw_log_policy).reshape(P, -1)
    pv, qv = lp - logsumexp(lp, axis=1, keepdims=True), lq - logsumexp(lq, axis=1, keepdims=True)
    R = e.returns(tp.reward).reshape(P, -1)
    kl = (np.exp(pv) * (pv - qv)).sum(1)
    er = (np.exp(pv) * R).sum(1)
    assert res.kl == pytest.approx(float(task.rho @ kl), abs=1e-9)
    assert res.J == pytest.approx(float(task.rho @ (er - BETA * kl)), abs=1e-9)
    assert res.valid_mass == pytest.approx(float(task.rho @ np.exp(logsumexp(lp, axis=1))), abs=1e-9)
    assert any("conditioned on valid" in n for n in res.notes)
    # a model that never leaves the task: valid mass 1 and both conventions agree
    act = action_token_ids(task)
    mp, mr = _TaskOnly(pol, act), _TaskOnly(ref, act)
    a = evaluate_policy(mp, mr, task, tokenizer=tok)
    b = evaluate_policy(mp, mr, task, tokenizer=tok, restrict_to_task=True)
    c = evaluate_policy(pol, ref, task, tokenizer=tok, restrict_to_task=True)
    assert a.valid_mass == pytest.approx(1.0, abs=1e-12) and a.valid_mass_ref == pytest.approx(1.0, abs=1e-12)
    for k in QUANTITIES:
        assert getattr(a, k) == pytest.approx(getattr(b, k), abs=1e-9), k
        assert getattr(b, k) == pytest.approx(getattr(c, k), abs=1e-9), k   # masking logits = restricting
    assert not a.notes


@pytest.mark.parametrize("restrict", [True, False])
def test_sampled_mode_agrees_with_exact(task, tok, models, restrict):
    pol, ref, dpo = models["policy"], models["reference"], models["dpo"]
    kw = dict(tokenizer=tok, restrict_to_task=restrict, dpo_model=dpo, beta_dpo=0.3)
    exact = evaluate_policy(pol, ref, task, **kw)
    smp = evaluate_policy(pol, ref, task, method="sampled", n_samples=1500, seed=11, **kw)
    assert smp.method == "sampled" and smp.responses is None
    for k in ("J", "J_star", "sub_opt", "expected_return", "kl", "win_rate", "dpo_reward", "valid_mass",
              "valid_mass_ref"):
        se = smp.se[k]
        assert 0 < se < 0.2, (k, se)
        assert abs(getattr(smp, k) - getattr(exact, k)) < 4 * se, (k, getattr(smp, k), getattr(exact, k), se)
    if restrict:    # the agreement is not vacuous: the exact J of another policy is far outside 4 standard errors
        other = evaluate_policy(dpo, ref, task, **kw)
        assert abs(other.J - smp.J) > 4 * smp.se["J"]


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_too_large_switches_to_sampling_with_a_warning(task, tok, models, caplog):
    pol, ref = models["policy"], models["reference"]
    with caplog.at_level(logging.WARNING, logger="rto_llm.exact_eval"):
        res = evaluate_policy(pol, ref, task, tokenizer=tok, max_enumerated=10, n_samples=64, restrict_to_task=True)
    assert res.method == "sampled" and "max_enumerated=10" in caplog.text
    assert any("sampled estimates" in n for n in res.notes) and res.summary()["method"] == "sampled"
    with pytest.raises(ValueError, match="max_enumerated"):
        evaluate_policy(pol, ref, task, tokenizer=tok, max_enumerated=10, method="exact")


def test_bad_inputs_name_the_field(task, tok, models, tmp_path):
    from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer

    pol, ref = models["policy"], models["reference"]
    with pytest.raises(ValueError, match="vocabulary is not the task's"):
        evaluate_policy(pol, ref, task, tokenizer=build_tiny_tokenizer())
    foreign = build_tiny_llama(build_tiny_tokenizer(), hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match="reference: the model has vocab_size"):
        evaluate_policy(pol, foreign, task, tokenizer=tok)
    foreign.save_pretrained(str(tmp_path / "foreign"))
    build_tiny_tokenizer().save_pretrained(str(tmp_path / "foreign"))
    with pytest.raises(ValueError, match="policy tokenizer .*: its vocabulary"):
        evaluate_policy(str(tmp_path / "foreign"), ref, task)
    with pytest.raises(ValueError, match="reference tokenizer .*: its vocabulary"):
        evaluate_policy(pol, str(tmp_path / "foreign"), task, tokenizer=tok)
    with pytest.raises(ValueError, match="prompts: the list of prompt indices is empty"):
        evaluate_policy(pol, ref, task, tokenizer=tok, prompts=[])
    with pytest.raises(ValueError, match="prompt indices"):
        evaluate_policy(pol, ref, task, tokenizer=tok, prompts=[7])
    with pytest.raises(ValueError, match="beta must be"):
        evaluate_policy(pol, ref, task, 0.0, tokenizer=tok)
    with pytest.raises(ValueError, match="beta_dpo"):
        evaluate_policy(pol, ref, task, tokenizer=tok, dpo_model=models["dpo"])
    with pytest.raises(ValueError, match="task: .* does not exist"):
        evaluate_policy(pol, ref, str(tmp_path / "nowhere"), tokenizer=tok)
    with pytest.raises(ValueError, match="not a model directory"):
        evaluate_policy(str(tmp_path / "nowhere"), ref, task, tokenizer=tok)
    # a subset of prompts is weighted by rho renormalized over it
    one = evaluate_policy(pol, ref, task, tokenizer=tok, prompts=[1])
    full = evaluate_policy(pol, ref, task, tokenizer=tok)
    assert one.J == pytest.approx(full.per_prompt["J"][1]) and one.weights.tolist() == [1.0]


def test_preferences_from_a_leaky_model_redraw_invalid_responses(task, tok, models, tmp_path):
    pol = build_task_model(task, tok, hidden_size=32, seed=7)
    out = str(tmp_path / "prefs.jsonl")
    s = sample_preferences(pol, task, 64, seed=5, out_path=out, tokenizer=tok)
    st = s.stats
    assert st.n_invalid > 0 and st.n_draws == 128 + st.n_invalid and st.invalid_examples
    rows = [json.loads(x) for x in open(out)]
    assert rows == s.rows and len(rows) == 64
    for r in rows:
        p = r["prompt_index"]
        assert r["prompt"] == task.prompt_words[p]
        assert r["chosen_R"] == pytest.approx(task.gold_return(p, task.parse_response(r["chosen"])))
        assert r["rejected_R"] == pytest.approx(task.gold_return(p, task.parse_response(r["rejected"])))
    saved = json.load(open(str(tmp_path / "prefs_stats.json")))
    assert saved["n_invalid"] == st.n_invalid
    assert sample_preferences(pol, task, 64, seed=5, tokenizer=tok).rows == rows      # seeded
    with pytest.raises(ValueError, match="still invalid"):
        sample_preferences(pol, task, 64, seed=5, tokenizer=tok, max_rounds=1)


# ---------------------------------------------------------------------------------------------------
# End to end: export -> rto-llm sft -> preferences from the SFT model -> rto-llm dpo -> exact evaluation
# ---------------------------------------------------------------------------------------------------


def _kl_to_task_reference(model_dir, task_dir):
    """E_x KL(pi_ref of the simulator || the model restricted to the task tokens), exactly on the tree."""
    tp = tree_policy(model_dir, task_dir)
    e = enumerate_responses(tp.tree)
    return sequence_kl(e, e.log_prob(tp.tree.log_pi_ref), e.log_prob(tp.log_policy), tp.tree.rho)


def test_end_to_end_sft_preferences_and_exact_evaluation(tmp_path):
    from rto_llm import cli

    task = make_token_task(3, 4, 2, structure="last_token", feature_kind="bigram", beta=BETA, seed=0)
    ex = export_task(task, str(tmp_path / "task"), n_sft=2048, seed=0)
    kl_before = _kl_to_task_reference(ex.model_dir, ex.root)
    assert cli.main(["sft", "--config", ex.sft_config]) == 0
    sft = os.path.join(ex.root, "sft", "final")
    kl_after = _kl_to_task_reference(sft, ex.root)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)          # SFT learned the task's pi_ref
    prefs = sample_preferences(sft, ex.root, 256, seed=1)
    assert prefs.stats.invalid_fraction < 0.05
    assert prefs.stats.mean_chosen_return > prefs.stats.mean_rejected_return
    d = task.H + 3
    assert cli.main(["dpo", f"model.path={sft}", f"data.train_path={prefs.path}", "data.apply_chat_template=false",
                     "data.max_prompt_len=2", f"data.max_len={d}", f"train.output_dir={ex.root}/dpo",
                     "train.batch_size=32", "train.micro_batch_size=32", "train.max_steps=4", "train.lr=1e-3",
                     "train.device=cpu", "log.progress_bar=false", "log.tensorboard=false", "dpo.beta=0.1"]) == 0
    res = evaluate_policy(sft, sft, ex.root)                           # pi_ref against itself
    assert res.method == "exact" and res.valid_mass > 0.95
    assert abs(res.kl) < 1e-12 and res.J == pytest.approx(res.expected_return, abs=1e-12)
    assert res.win_rate == pytest.approx(0.5, abs=1e-12)
    assert res.sub_opt == pytest.approx(res.J_star - res.expected_return, abs=1e-12) and res.sub_opt > 0
    dpo = os.path.join(ex.root, "dpo", "final")
    r = evaluate_policy(dpo, sft, ex.root, dpo_model=dpo, beta_dpo=0.1, restrict_to_task=True)
    assert r.kl > 0 and r.dpo_reward == pytest.approx(0.1 * r.kl, rel=1e-9)   # E_pi beta log pi/pi_ref = beta KL
    assert r.sub_opt >= 0
