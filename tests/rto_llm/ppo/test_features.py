"""RTO-specific behaviour, configs, safety and the CLI of the ppo / rto stages."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch

from rto_llm.config import ConfigError, load_config
from rto_llm.ppo.config import PPOConfig, RTOConfig
from rto_llm.ppo.metrics import RedFlags
from rto_llm.testing import ppo_overrides
from rto_sim.core import dpo_token_reward, masked_sum
from tests.rto_llm.lm_helpers import response_logprobs


def test_paper_defaults_and_documented_fields():
    c = RTOConfig()
    assert (c.rto.mode, c.rto.beta1, c.rto.dpo_clip) == ("rto", 0.05, 0.05)
    assert (c.kl.beta2, c.kl.adaptive, c.kl.kind, c.reward.beta3, c.reward.score_clip) == (0.01, False, "k1", 1.0, 10.0)
    assert (c.train.lr, c.critic.lr, c.rollout.batch_size, c.train.batch_size) == (5e-7, 9e-6, 1024, 128)
    assert (c.ppo.epochs, c.ppo.gamma, c.ppo.lam, c.ppo.clip_eps, c.ppo.value_clip) == (1, 1.0, 0.95, 0.2, 0.2)
    assert (c.train.adam_beta1, c.train.adam_beta2, c.train.grad_clip) == (0.9, 0.95, 1.0)
    assert (c.train.lr_scheduler, c.train.warmup_ratio, c.train.min_lr_ratio) == ("cosine", 0.03, 0.1)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, 0)
    p = PPOConfig()
    assert (p.rto.mode, p.rto.beta1) == ("ppo", 0.0) and not p.rto.uses_dpo
    n = 0
    for cls in (PPOConfig, RTOConfig):
        cfg = cls()
        for sec in dataclasses.fields(cfg):
            for f in dataclasses.fields(getattr(cfg, sec.name)):
                assert f.default is not dataclasses.MISSING and f.metadata.get("doc"), f"{sec.name}.{f.name}"
                n += 1
    assert n > 100


def test_config_errors_name_the_field(fx, tmp_path):
    def cfg(*o, cls=RTOConfig):
        return load_config(cls, None, ppo_overrides(fx, str(tmp_path), *o))

    with pytest.raises(ConfigError, match="rto.beta1 must be >= 0"):
        cfg("rto.beta1=-0.1", f"rto.dpo_path={fx['dpo']}")
    with pytest.raises(ConfigError, match="needs rto.dpo_path"):
        cfg()
    from rto_llm.ppo.config import check_ppo_config

    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        check_ppo_config(cfg("rollout.batch_size=12", f"rto.dpo_path={fx['dpo']}"))
    with pytest.raises(ConfigError, match="ref_ema_decay"):
        check_ppo_config(cfg("kl.ref_ema_decay=0.5", f"rto.dpo_path={fx['dpo']}"))


def test_temperature_convention(make_trainer, prompts, fx):
    """KL and ratio at logits / T; the DPO implicit reward on the unscaled models (T = 1)."""
    T = 0.7
    tr = make_trainer(f"rollout.temperature={T}", "rto.beta1=0.5", "rto.dpo_clip=0", f"rto.dpo_path={fx['dpo']}",
                      cls=RTOConfig)
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)  # actor != reference
    exp, _ = tr.make_experience(prompts)
    seq, am, P, m = exp.sequences, exp.attention_mask, exp.prompt_width, exp.action_mask

    def lp(model, temp):
        with torch.no_grad():
            return response_logprobs(model, seq, am, P, temperature=temp) * m

    torch.testing.assert_close(exp.old_logprobs, lp(tr.roles.actor, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.ref_logprobs, lp(tr.roles.reference, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.dpo_ref_logprobs, lp(tr.roles.reference, 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.dpo_logprobs, lp(tr.roles.dpo_model, 1.0), atol=1e-5, rtol=0)
    unscaled = dpo_token_reward(lp(tr.roles.dpo_model, 1.0), lp(tr.roles.reference, 1.0), m, 0.5)
    scaled = dpo_token_reward(lp(tr.roles.dpo_model, T), lp(tr.roles.reference, T), m, 0.5)
    torch.testing.assert_close(exp.rewards.dpo_token_rewards, unscaled, atol=1e-5, rtol=0)
    assert float((exp.rewards.dpo_token_rewards - scaled).abs().max()) > 1e-3  # the convention matters


def test_adapter_dpo_shares_the_reference_weights(make_trainer, prompts, fx):
    tr = make_trainer("rto.beta1=0.5", "rto.dpo_clip=0", f"rto.dpo_path={fx['dpo_adapter']}", cls=RTOConfig)
    roles = tr.roles
    assert roles.dpo_adapter and roles.dpo_model is None and roles.dpo_reference is None
    base = sum(p.numel() for p in tr.roles.actor.parameters())
    frozen_lm = sum(p.numel() for p in roles.reference.parameters())
    lora = sum(p.numel() for n, p in roles.reference.named_parameters() if "lora_" in n)
    assert frozen_lm == base + lora and lora < 0.5 * base  # one copy of the base weights, plus the adapter
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    assert float(exp.rewards.kl.abs().sum()) == 0.0  # adapter off = the reference = the initial actor
    # adapter on gives the DPO model: equal to the merged LoRA model's log-probs
    from peft import PeftModel

    from rto_llm.models import load_causal_lm

    base_model = load_causal_lm(dataclasses.replace(tr.cfg.model, lora_rank=0), trainable=False)
    merged = PeftModel.from_pretrained(base_model, fx["dpo_adapter"]).merge_and_unload().eval()
    with torch.no_grad():
        lp = response_logprobs(merged, exp.sequences, exp.attention_mask, exp.prompt_width) * m
    torch.testing.assert_close(exp.dpo_logprobs, lp, atol=1e-5, rtol=0)
    assert float(masked_sum(exp.rewards.dpo_token_rewards, m, -1).abs().min()) > 0


def test_beta1_zero_means_no_dpo_model_at_all(make_trainer, prompts, fx, monkeypatch):
    import rto_llm.ppo.roles as roles_mod

    loaded = []
    real = roles_mod.load_causal_lm
    monkeypatch.setattr(roles_mod, "load_causal_lm", lambda *a, **k: loaded.append(k.get("path")) or real(*a, **k))
    for over in (("rto.beta1=0",), ("rto.mode=ppo", "rto.beta1=0.05")):
        loaded.clear()
        tr = make_trainer(*over, f"rto.dpo_path={fx['dpo']}", cls=RTOConfig)
        assert fx["dpo"] not in loaded and tr.roles.dpo_model is None and not tr.roles.dpo_adapter
        torch.manual_seed(0)
        exp, _ = tr.make_experience(prompts)
        assert exp.dpo_logprobs is None and float(exp.rewards.dpo_rewards.abs().sum()) == 0.0
    # and the reward is exactly PPO's
    ppo = make_trainer()
    torch.manual_seed(0)
    exp_ppo, _ = ppo.make_experience(prompts)
    assert torch.equal(exp_ppo.rewards.token_level_rewards, exp.rewards.token_level_rewards)


@pytest.mark.parametrize("mode", ["semi_rto", "ddpo", "rs_ppo"])
def test_ablation_modes_on_the_rollout(make_trainer, prompts, fx, mode):
    common = ("rto.beta1=0.5", "rto.dpo_clip=0.2", f"rto.dpo_path={fx['dpo']}", "rto.delimiters=5,7")
    # the trainer re-seeds after loading its models, so both rollouts sample the same responses
    rto_exp, _ = make_trainer(*common, cls=RTOConfig).make_experience(prompts)
    tr = make_trainer(*common, f"rto.mode={mode}", cls=RTOConfig)
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    assert torch.equal(exp.sequences, rto_exp.sequences)
    dense_sum = masked_sum(rto_exp.rewards.dpo_rewards, m, -1)
    assert dense_sum.abs().min() > 0
    got = masked_sum(exp.rewards.dpo_rewards, m, -1)
    if mode == "rs_ppo":
        torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(got, dense_sum, atol=1e-6, rtol=0)
    nonzero = exp.rewards.dpo_rewards != 0
    last = torch.zeros_like(m).scatter(-1, (m.sum(-1, keepdim=True) - 1), True)
    if mode == "ddpo":
        assert bool((nonzero <= last).all())
    if mode == "semi_rto":
        resp = exp.sequences[:, exp.prompt_width :]
        delim = tr.delimiters[resp]
        assert delim.any()
        assert bool((nonzero <= (delim & m) | last).all())


def test_reinforce_pp_needs_no_critic(make_trainer, prompts):
    tr = make_trainer("ppo.advantage_estimator=reinforce++")
    assert tr.roles.critic is None and tr.critic_engine is None
    exp, _ = tr.make_experience(prompts)
    assert float(exp.values.abs().sum()) == 0.0
    row = tr.ppo_update(exp, rollout=0)
    assert "loss/value_avg" not in row and row["grad_norm/actor"] > 0


def test_critic_warmup_freezes_the_actor(make_trainer, prompts):
    tr = make_trainer("critic.warmup_rollouts=1")
    actor0 = {k: v.clone() for k, v in tr.roles.actor.state_dict().items()}
    critic0 = {k: v.clone() for k, v in tr.roles.critic.state_dict().items()}
    row = tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)
    assert row["train/actor_frozen"] == 1.0
    assert all(torch.equal(actor0[k], v) for k, v in tr.roles.actor.state_dict().items())
    assert any(not torch.equal(critic0[k], v) for k, v in tr.roles.critic.state_dict().items())
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=1)
    assert any(not torch.equal(actor0[k], v) for k, v in tr.roles.actor.state_dict().items())


def test_reference_ema_moves_the_reference(make_trainer, prompts):
    tr = make_trainer("kl.ref_ema_decay=0.5")
    ref0 = {k: v.clone() for k, v in tr.roles.reference.state_dict().items()}
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)
    tr.update_reference_ema()
    actor = tr.roles.actor.state_dict()
    for k, v in tr.roles.reference.state_dict().items():
        torch.testing.assert_close(v, 0.5 * ref0[k] + 0.5 * actor[k])


def test_nonfinite_stops_and_keeps_last_checkpoint(make_trainer, tmp_path):
    from rto_llm.ppo.trainer import NonFiniteError

    out = tmp_path / "nan"
    tr = make_trainer("ppo.max_rollouts=3", out=out)
    tr.train(stop_after=1)
    ckpt_dir = out / "checkpoints"
    assert (ckpt_dir / "latest").read_text() == "step-00000001"
    saved = torch.load(ckpt_dir / "step-00000001" / "actor" / "engine.pt", weights_only=True)["model"]
    tr2 = make_trainer("ppo.max_rollouts=3", "checkpoint.resume=latest", "checkpoint.save_every=1", out=out)
    with torch.no_grad():
        tr2.roles.reward_model.score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        tr2.train()
    assert (ckpt_dir / "latest").read_text() == "step-00000001"
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step-00000001"]
    for k, v in tr2.roles.actor.state_dict().items():  # stopped before any weight changed
        assert torch.equal(v, saved[k])


def test_red_flags(caplog):
    rf = RedFlags()
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        flags = rf.check(1, {"objective/kl": -0.5, "objective/kl_seq_std": 0.1, "val/batch_size": 64.0,
                             "policy/ratio_max": 3.0, "policy/ratio_min": 0.9, "val/frac_at_max_length": 0.9})
    assert len(flags) == 3 and "red flag" in caplog.text
    assert rf.check(2, {"objective/kl": -0.01, "objective/kl_seq_std": 1.0, "val/batch_size": 16.0}) == []  # noise
    rising = [rf.check(i, {"policy/clipfrac_avg": 0.1 * i, "policy/approxkl_avg": 0.01 * i}) for i in range(3, 7)]
    assert rising[-1] and "rose" in rising[-1][0] and not rising[0]


def test_cli_run_logs_practice_metrics(fx, tmp_path, capsys):
    from rto_llm.ppo.cli import main

    out = tmp_path / "cli"
    over = ppo_overrides(fx, str(out), "ppo.max_rollouts=2", f"rto.dpo_path={fx['dpo']}")
    assert main(["rto", "--print-config", *over]) == 0
    assert "beta1: 0.05" in capsys.readouterr().out
    assert main(["rto", *over[:-1], "rto.beta1=-1"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--help"])
    assert e.value.code == 0 and "rto.beta1 (float, default 0.0)" in capsys.readouterr().out
    assert main(["rto", *over]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    names = {
        "objective/scores", "objective/kl", "objective/kl3", "objective/kl_neg_frac", "objective/rlhf_reward",
        "objective/non_score_reward", "objective/beta2", "rto/dpo_reward_token_mean", "rto/dpo_reward_token_std",
        "rto/dpo_reward_seq_mean", "rto/dpo_reward_seq_std", "rto/dpo_clipfrac", "rto/share_dpo",
        "rto/share_score", "rto/share_kl", "val/response_length", "val/response_length_p95",
        "val/frac_at_max_length", "val/num_eos_tokens", "val/frac_missing_eos_penalty", "objective/entropy",
        "objective/ppl_policy", "objective/ppl_ref", "objective/score_length_corr", "adv/mean", "adv/std",
        "returns/mean", "returns/std", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/ratio_mean",
        "policy/ratio_min", "policy/ratio_max", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
        "val/explained_variance", "grad_norm/actor", "grad_norm/critic", "lr/actor", "lr/critic",
        "perf/throughput", "perf/time_generate", "perf/time_score", "perf/time_train", "perf/peak_mem_gb",
    }
    assert names <= set(rows[0]), names - set(rows[0])
    r = rows[1]
    assert r["rto/share_dpo"] + r["rto/share_score"] + r["rto/share_kl"] == pytest.approx(1.0)
    assert (out / "final" / "config.json").exists()


def test_deepspeed_zero2_matches_plain_torch(fx, tmp_path):
    """One-process DeepSpeed ZeRO-2 (CLI in a subprocess) gives the plain-torch run's metrics."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from rto_llm.ppo.cli import main

    def over(name, *extra):
        return ppo_overrides(fx, str(tmp_path / name), "ppo.max_rollouts=2", f"rto.dpo_path={fx['dpo_adapter']}",
                             "checkpoint.save_every=1", *extra)

    assert main(["rto", *over("torch")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "rto_llm.ppo.cli", "rto", *over("ds", "deepspeed.enabled=true")],
                         env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("torch", "ds"))
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got):
        for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "grad_norm/actor"):
            assert g[k] == pytest.approx(r[k], abs=1e-5), k
    assert (tmp_path / "ds" / "checkpoints" / "step-00000002" / "actor").is_dir()


def test_paper_example_config_loads():
    from rto_llm.ppo.config import check_ppo_config

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "llama3_8b_ultrafeedback_rto.yaml")
    cfg = load_config(RTOConfig, path)
    check_ppo_config(cfg, world_size=8)
    assert (cfg.rto.beta1, cfg.rto.dpo_clip, cfg.kl.beta2) == (0.05, 0.05, 0.01)
    assert (cfg.train.lr, cfg.critic.lr) == (5e-7, 9e-6)
    assert cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.bf16
    assert cfg.rollout.batch_size // cfg.train.batch_size == 8


def test_offloaded_frozen_roles_give_the_same_rollout(make_trainer, prompts, fx):
    common = ("rto.beta1=0.5", f"rto.dpo_path={fx['dpo']}")
    tr0 = make_trainer(*common, cls=RTOConfig)
    torch.manual_seed(0)
    a, _ = tr0.make_experience(prompts)
    tr = make_trainer(*common, "kl.offload=true", "reward.offload=true", cls=RTOConfig)
    torch.manual_seed(0)
    b, _ = tr.make_experience(prompts)
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k
    assert next(tr.roles.reference.parameters()).device.type == "cpu"
