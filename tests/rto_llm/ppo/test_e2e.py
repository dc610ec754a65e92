"""End to end on CPU: PPO and RTO raise the reward-model score of a tiny policy while the KL stays bounded.

The reward model prefers one token ("ok": score rises with its frequency); the RTO DPO model is the
actor nudged towards the same token. Fixed seed and budget: 12 rollouts of 32 prompts.
"""

from __future__ import annotations

import math

import pytest
import torch

from rto_llm.ppo.config import PPOConfig, RTOConfig

BUDGET = ("ppo.max_rollouts=12", "train.lr=5e-3", "critic.lr=5e-3", "ppo.epochs=2", "kl.beta2=0.2",
          "reward.missing_eos_mode=off", "train.seed=0")
SIZES = {"rollout": 32, "train_batch": 8, "micro": 8, "max_new_tokens": 8}


def _eval_score(tr, prompts, seed: int = 123) -> float:
    """Mean raw RM score of one fresh sample per prompt from the trainer's current actor."""
    torch.manual_seed(seed)
    exp, _ = tr.make_experience(prompts)
    return float(exp.raw_scores.mean())


@pytest.mark.parametrize("stage", ["ppo", "rto"])
def test_policy_improves_rm_score_with_bounded_kl(stage, make_trainer, fx, tmp_path):
    extra = (f"rto.dpo_path={fx['dpo']}",) if stage == "rto" else ()
    tr = make_trainer(*BUDGET, *extra, cls=RTOConfig if stage == "rto" else PPOConfig, out=tmp_path / stage, **SIZES)
    all_prompts = [p["prompt_ids"] for p in tr.prompts]
    before = _eval_score(tr, all_prompts)
    torch.manual_seed(0)
    history = tr.train()
    after = _eval_score(tr, all_prompts)
    assert len(history) == 12
    # a real improvement of the RM score (the initial policy scores ~0.06 here; all-target responses ~4)
    assert after > before + 0.15 and after > 2.0 * before, (before, after)
    first, last = history[0], history[-3:]
    assert sum(r["objective/scores"] for r in last) / 3 > first["objective/scores"] + 0.1
    # KL stays bounded (beta2 = 0.2): a few nats per 8-token response, not a collapse onto one token
    kls = [r["objective/kl"] for r in history]
    assert all(math.isfinite(k) for k in kls) and max(kls) < 4.0, kls
    assert kls[-1] > 0.05  # the policy did move away from the reference
    if stage == "rto":
        # the policy moves towards the DPO model's preferred tokens: the DPO reward per sequence rises
        dpo = [r["rto/dpo_reward_seq_mean"] for r in history]
        assert sum(dpo[-3:]) / 3 > dpo[0] + 0.05, dpo
