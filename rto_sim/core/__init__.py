"""The RTO algorithm core: small pure torch functions shared by the simulator and the LLM trainer.

Every equation of "DPO Meets PPO: Reinforced Token Optimization for RLHF" (Zhong et al., ICML 2025)
that the trainers use lives here exactly once, one topic per module:

    stats.py       masked sum / mean / var / whitening, the loss-reduction helper (token-mean vs
                   sequence-mean, micro-batch weights), log-probs, entropy, explained variance
    losses.py      DPO / IPO / cDPO and Bradley-Terry losses; PPO clipped policy loss (dual clip) and
                   clipped value loss, registered by name
    kl.py          KL estimators k1 / k2 / k3 and the KL coefficient controllers (beta2)
    rewards.py     the RTO token reward (RTO eq. 4.7) and its ablations (Semi-RTO, DDPO, RS-PPO), score
                   normalization, the missing-EOS penalty
    advantages.py  GAE and REINFORCE++, registered by name

Conventions
-----------
- Token tensors are ``(B, T)`` over *response* tokens, with a float or bool ``mask`` ``(B, T)`` that is
  1 on generated tokens through the first EOS (inclusive) and 0 on pads.
- Rewards, advantages and returns are computed without grad (inputs are detached).
- This package imports torch and the standard library only: ``import rto_sim.core`` loads neither
  scipy, pandas, gymnasium, transformers nor deepspeed (``tests/rto_sim/test_imports.py``).
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages,
    get_advantage_estimator,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_returns,
)
from .kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from .losses import (
    DPO_LOSS_TYPES,
    POLICY_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    get_policy_loss,
    ppo_policy_loss,
    value_loss,
)
from .rewards import (
    REDISTRIBUTION_MODES,
    REWARD_MODES,
    RewardTerms,
    apply_missing_eos_penalty,
    compute_rto_rewards,
    dpo_token_reward,
    normalize_score,
    redistribute_dpo_rewards,
)
from .stats import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    gather_logprobs,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    microbatch_loss_weight,
    sequence_logprob,
)

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "LOSS_AGG_MODES", "aggregate_loss",
    "microbatch_loss_weight", "gather_logprobs", "sequence_logprob", "last_valid_index", "entropy_from_logits",
    "explained_variance",
    "DPO_LOSS_TYPES", "dpo_loss", "bradley_terry_loss", "ppo_policy_loss", "POLICY_LOSSES", "get_policy_loss",
    "value_loss",
    "KL_KINDS", "kl_penalty", "FixedKLController", "AdaptiveKLController",
    "dpo_token_reward", "REDISTRIBUTION_MODES", "redistribute_dpo_rewards", "normalize_score",
    "apply_missing_eos_penalty", "REWARD_MODES", "RewardTerms", "compute_rto_rewards",
    "gae_advantages", "reinforce_plus_plus_returns", "reinforce_plus_plus_advantages", "ADVANTAGE_ESTIMATORS",
    "get_advantage_estimator",
]
