"""Metrics of a PPO / RTO run (docs/practice.md section 3) and the console red flags.

Names follow TRL / verl where they exist. Per rollout (from the buffer, before the update):

  objective/scores, objective/scores_std      raw RM score r_RM mean / std
  objective/scores_normalized                 mean of R (normalized, clipped, missing-EOS penalty)
  objective/kl                                mean over sequences of sum_t k1_t
  objective/kl_seq_std                        std over sequences of sum_t k1_t (for the negative-KL flag)
  objective/kl3                               mean over sequences of sum_t k3_t
  objective/kl_neg_frac                       fraction of valid tokens with k1_t < 0
  objective/kl_used                           mean over sequences of sum_t of the reward's KL estimate
  objective/rlhf_reward                       mean over sequences of sum_t r_t (the return PPO maximizes)
  objective/non_score_reward                  mean over sequences of sum_t -beta2 * kl_t
  objective/beta2                             current KL coefficient
  objective/entropy                           mean per-token entropy of pi_old(. | s_t) at T
  objective/ppl_policy, objective/ppl_ref     exp(-mean token log-prob) of the samples under pi_old / pi_ref
  objective/score_length_corr                 Pearson corr(r_RM, response length)
  rto/dpo_reward_token_mean, _token_std       the clipped dense DPO reward per valid token
  rto/dpo_reward_seq_mean, _seq_std           its per-sequence sum
  rto/dpo_clipfrac                            fraction of valid tokens where |beta1 log-ratio| > c
  rto/share_dpo, rto/share_score, rto/share_kl
      share of the return's magnitude: mean_seq |sum dpo| , |beta3 R| , |beta2 sum kl| divided by
      their total (the three shares add up to 1)
  val/batch_size                              responses in the buffer (per process)
  val/response_length, val/response_length_p95, val/frac_at_max_length
  val/num_eos_tokens (responses that emitted EOS), val/eos_rate, val/frac_missing_eos_penalty
  adv/mean, adv/std, returns/mean, returns/std (before whitening), values/mean
  val/explained_variance (rollout values vs returns)

Per update (averaged over the PPO optimizer steps of the rollout; ratio_min / ratio_max are the extremes):

  policy/approxkl_avg, policy/clipfrac_avg, policy/ratio_mean, policy/ratio_min, policy/ratio_max,
  policy/entropy_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg, grad_norm/actor,
  grad_norm/critic, lr/actor, lr/critic, train/actor_frozen (1 during critic warm-up)

Throughput: perf/throughput (tokens of prompts and responses per second per device over the whole PPO
step), perf/time_generate, perf/time_score, perf/time_train, perf/step_s, perf/peak_mem_gb, perf/mfu (GPU).
"""

from __future__ import annotations

import logging
import math

import torch

from rto_llm.ppo.roles import n_params
from rto_sim.core import dpo_token_reward, explained_variance, kl_penalty, masked_mean, masked_sum

log = logging.getLogger("rto_llm")
Tensor = torch.Tensor


def _std(x: Tensor) -> float:
    return float(x.float().std(unbiased=False)) if x.numel() > 1 else 0.0


def _masked_std(x: Tensor, m: Tensor) -> float:
    mean = masked_mean(x, m)
    return float(masked_mean((x - mean) ** 2, m).sqrt())


@torch.no_grad()
def rollout_metrics(exp, rto_opts, max_new_tokens: int) -> dict[str, float]:
    """Statistics of one filled rollout buffer (see the module doc for names). Masked entries never
    enter any statistic."""
    m, terms = exp.action_mask, exp.rewards
    fm = m.float()
    lengths = fm.sum(-1)
    k1 = kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k1", mask=m)
    k3 = kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k3", mask=m)
    kl_sum = masked_sum(terms.kl, m, dim=-1)
    dpo_seq = masked_sum(terms.dpo_rewards, m, dim=-1)
    score_part = masked_sum(terms.score_rewards, m, dim=-1)
    kl_part = -terms.kl_coef * kl_sum
    ret = masked_sum(terms.token_level_rewards, m, dim=-1)
    raw = exp.raw_scores.float()
    row = {
        "objective/scores": float(raw.mean()),
        "objective/scores_std": _std(raw),
        "objective/scores_normalized": float(exp.scores.float().mean()),
        "objective/kl": float(masked_sum(k1, m, dim=-1).mean()),
        "objective/kl_seq_std": _std(masked_sum(k1, m, dim=-1)),
        "objective/kl3": float(masked_sum(k3, m, dim=-1).mean()),
        "objective/kl_neg_frac": float(masked_mean((k1 < 0).float(), m)),
        "objective/kl_used": float(kl_sum.mean()),
        "objective/rlhf_reward": float(ret.mean()),
        "objective/non_score_reward": float(kl_part.mean()),
        "objective/beta2": float(terms.kl_coef),
        "objective/entropy": float(masked_mean(exp.entropy, m)),
        "objective/ppl_policy": math.exp(-float(masked_mean(exp.old_logprobs, m))),
        "objective/ppl_ref": math.exp(-float(masked_mean(exp.ref_logprobs, m))),
        "objective/score_length_corr": _corr(raw, lengths),
        "val/batch_size": float(m.shape[0]),
        "val/response_length": float(lengths.mean()),
        "val/response_length_p95": float(torch.quantile(lengths, 0.95)),
        "val/frac_at_max_length": float(((lengths >= max_new_tokens) & ~exp.has_eos).float().mean()),
        "val/num_eos_tokens": float(exp.has_eos.sum()),
        "val/eos_rate": float(exp.has_eos.float().mean()),
        "val/frac_missing_eos_penalty": float((~exp.has_eos).float().mean()),
        "adv/mean": float(masked_mean(exp.advantages_raw, m)),
        "adv/std": _masked_std(exp.advantages_raw, m),
        "returns/mean": float(masked_mean(exp.returns, m)),
        "returns/std": _masked_std(exp.returns, m),
        "values/mean": float(masked_mean(exp.values, m)),
        "val/explained_variance": float(explained_variance(exp.values, exp.returns, m)),
    }
    if rto_opts.uses_dpo:
        ref = exp.ref_logprobs if exp.dpo_ref_logprobs is None else exp.dpo_ref_logprobs
        unclipped = dpo_token_reward(exp.dpo_logprobs, ref, m, rto_opts.beta1, clip=None)
        clip = rto_opts.dpo_clip or float("inf")
        d = terms.dpo_token_rewards
        row.update({
            "rto/dpo_reward_token_mean": float(masked_mean(d, m)),
            "rto/dpo_reward_token_std": _masked_std(d, m),
            "rto/dpo_reward_seq_mean": float(masked_sum(d, m, dim=-1).mean()),
            "rto/dpo_reward_seq_std": _std(masked_sum(d, m, dim=-1)),
            "rto/dpo_clipfrac": float(masked_mean((unclipped.abs() > clip).float(), m)),
        })
    parts = torch.stack([dpo_seq.abs().mean(), score_part.abs().mean(), kl_part.abs().mean()])
    total = float(parts.sum())
    shares = (parts / total).tolist() if total > 0 else [0.0, 0.0, 0.0]
    row.update({"rto/share_dpo": shares[0], "rto/share_score": shares[1], "rto/share_kl": shares[2]})
    return row


def _corr(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


class UpdateStats:
    """Accumulates per-optimizer-step statistics of one rollout's PPO update."""

    MEAN_KEYS = {
        "approxkl": "policy/approxkl_avg",
        "clipfrac": "policy/clipfrac_avg",
        "ratio_mean": "policy/ratio_mean",
        "entropy": "policy/entropy_avg",
        "policy_loss": "loss/policy_avg",
        "value_loss": "loss/value_avg",
        "vf_clipfrac": "val/clipfrac_avg",
        "grad_norm_actor": "grad_norm/actor",
        "grad_norm_critic": "grad_norm/critic",
    }

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.ratio_min = float("inf")
        self.ratio_max = float("-inf")

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_ratio_range(self, lo: float, hi: float) -> None:
        self.ratio_min = min(self.ratio_min, lo)
        self.ratio_max = max(self.ratio_max, hi)

    def result(self) -> dict[str, float]:
        row = {self.MEAN_KEYS[k]: self.sums[k] / self.counts[k] for k in self.sums if k in self.MEAN_KEYS}
        if math.isfinite(self.ratio_min):
            row["policy/ratio_min"] = self.ratio_min
            row["policy/ratio_max"] = self.ratio_max
        return row


class RedFlags:
    """Console warnings for the signs of a broken run (docs/practice.md section 3).

    - mean KL negative beyond noise (``objective/kl < -max(kl_tol, 3 * std / sqrt(n))``): sampling differs
      from the scored distribution;
    - ratio far from 1 (``policy/ratio_max > ratio_hi`` or ``policy/ratio_min < 1 / ratio_hi``);
    - length at the maximum (``val/frac_at_max_length > length_frac``);
    - clip fraction and approx-KL rising for ``rising`` rollouts in a row.
    """

    def __init__(self, kl_tol: float = 1e-3, ratio_hi: float = 2.0, length_frac: float = 0.5, rising: int = 3):
        self.kl_tol, self.ratio_hi, self.length_frac, self.rising = kl_tol, ratio_hi, length_frac, rising
        self.history: list[tuple[float, float]] = []

    def check(self, step: int, row: dict[str, float]) -> list[str]:
        flags = []
        kl = row.get("objective/kl", 0.0)
        noise = 3.0 * row.get("objective/kl_seq_std", 0.0) / max(row.get("val/batch_size", 1.0), 1.0) ** 0.5
        if kl < -max(self.kl_tol, noise):
            flags.append(
                f"mean KL is negative ({row['objective/kl']:.4g}): rollouts are not sampled from the policy "
                "the log-probs describe (check temperature, top_p/top_k, dropout, padding)"
            )
        hi, lo = row.get("policy/ratio_max", 1.0), row.get("policy/ratio_min", 1.0)
        if hi > self.ratio_hi or lo < 1.0 / self.ratio_hi:
            flags.append(f"PPO ratio far from 1 (min {lo:.3g}, max {hi:.3g}): lower the lr or the epochs")
        if row.get("val/frac_at_max_length", 0.0) > self.length_frac:
            flags.append(
                f"{100 * row['val/frac_at_max_length']:.0f}% of responses hit max_new_tokens without EOS"
            )
        if "policy/clipfrac_avg" in row and "policy/approxkl_avg" in row:
            self.history.append((row["policy/clipfrac_avg"], row["policy/approxkl_avg"]))
            h = self.history[-(self.rising + 1) :]
            if len(h) == self.rising + 1 and all(b[0] > a[0] and b[1] > a[1] for a, b in zip(h, h[1:])):
                flags.append(f"clip fraction and approx-KL rose for {self.rising} rollouts in a row")
        for f in flags:
            log.warning("rollout %d: red flag: %s", step, f)
        return flags

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(x) for x in state["history"]]


def nonfinite_keys(row: dict[str, float]) -> list[str]:
    """Metric names whose value is NaN or inf (explained variance is NaN by definition when Var[G] = 0)."""
    return [k for k, v in row.items() if not math.isfinite(v) and k != "val/explained_variance"]


_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """Dense bf16 peak TFLOP/s of one device (configured, or guessed from the CUDA device name; 0 = unknown)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, v in _PEAK_TFLOPS.items():
        if key in name:
            return v
    return 0.0


def rollout_flops(roles, exp, uses_dpo: bool, ppo_epochs: int) -> float:
    """Approximate model FLOPs of one PPO step (2N per token forward, 6N per token forward+backward).

    Generation: 2 N_actor per generated token; scoring: forwards of actor, reference, RM, critic and DPO
    model (an adapter DPO model counts as the reference) over the rollout; training: 6 N per trained
    token for the actor and the critic, ``ppo_epochs`` passes (attention FLOPs ignored, as in the 6N rule).
    """
    n_actor, n_critic = n_params(roles.actor), n_params(roles.critic)
    n_dpo = n_params(roles.reference if roles.dpo_adapter else roles.dpo_model) if uses_dpo else 0
    gen_tokens, seq_tokens = float(exp.action_mask.sum()), float(exp.attention_mask.sum())
    train_tokens = seq_tokens * ppo_epochs
    fwd = 2.0 * (n_actor + n_params(roles.reference) + n_params(roles.reward_model) + n_critic + n_dpo) * seq_tokens
    return 2.0 * n_actor * gen_tokens + fwd + 6.0 * (n_actor + n_critic) * train_tokens
