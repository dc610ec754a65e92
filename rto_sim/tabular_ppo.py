"""Practical RTO in the simulator: PPO on tabular softmax policies over a TokenMDP (docs/theory.md section 8,
docs/practice.md sections 1-2, experiment E7).

Long because it is the simulator's whole PPO (config, rollout, reward assembly through rto_sim.core, critics,
update) with the docstring mapping each setting to its LLM-trainer name.

The training loop mirrors the LLM trainer tensor for tensor. Per PPO update:

    1. generate   B episodes x ~ rho, y ~ pi_old from a vectorized gymnasium env -> (B, H) tokens, mask
    2. log-probs  log pi_old, log pi_ref, log pi_dpo (tabular look-ups), critic values V(s_t)
    3. score      R = r_RM(x, y): the sentence reward-model score of the whole response (placed at the
                  last valid token by the core)
    4. rewards    r_t = -beta2 k1_t + redistribute(clip(beta1 (log pi_dpo - log pi_ref)(y_t), -c, c))
                        + [t = last] beta3 R          -> rto_sim.core.compute_rto_rewards (ONLY there)
    5. advantages GAE (gamma 1, lambda 0.95) -> core.gae_advantages, then whitening over the buffer
                  (core.masked_whiten); or REINFORCE++ (core.reinforce_plus_plus_advantages, no critic)
    6. PPO epochs shuffled minibatches of episodes: core.ppo_policy_loss + core.value_loss, Adam
    7. evaluate   exact J_beta2(pi; r*) with the TRUE token reward r*, gold return E_pi r*(y) and
                  KL(pi || pi_ref) by `rto_sim.exact.evaluate` (the policy is tabular, so this is exact)

"True objective". We report J_true = E_x[E_pi r*(y) - beta2 KL(pi(.|x) || pi_ref(.|x))], i.e. the
KL-regularized objective with the TRUE reward r* and the KL coefficient beta2 that PPO itself uses.
This is the objective that PPO with an exact sentence reward (mode "ppo", beta3 = 1) maximizes. RTO
adds beta1 * (DPO implicit reward), which on its own approximates (beta1 / beta_dpo) * r* plus a
potential: the RTO reward therefore approximates (beta3 + beta1 / beta_dpo) r*, whose optimum at KL
coefficient beta2 is pi*_{beta2 / (beta3 + beta1/beta_dpo)} (less regularized than pi*_{beta2}). The
gold return and the KL are recorded next to J_true so that both readings are available.

Layout (mirrors the LLM side): every per-episode tensor is (B, H) over response tokens; `mask` is True
on generated tokens through the first EOS (inclusive) and False on the EOS-absorbing remainder.
Episodes run in lockstep for H steps: after EOS the MDP is absorbing (pi = pi_ref = delta_EOS, zero
reward, zero KL) and those steps are masked out, exactly like right padding on the LLM side.

Reward modes (`TabularPPOConfig.mode`, the LLM trainer's `rto.mode`; `core.REWARD_MODES`):
    "ppo"             sparse sentence RM score at the last valid token, KL penalty per token
    "rto"             + dense DPO token reward (RTO eq. 4.7)
    "semi_rto"        DPO rewards summed per segment and paid at the segment's delimiter token.
                      Delimiters: every `segment_length`-th response token (positions L, 2L, ...; 1-based),
                      or, if `delimiter_token` is set, every occurrence of that token id; the tokens after
                      the last delimiter form a segment ending at the last valid token.
    "ddpo"            all DPO rewards delayed to the last valid token
    "rs_ppo"          dense DPO rewards minus their (clipped) sum at the last valid token
Advantages (`advantage_estimator`, the LLM trainer's `ppo.advantage_estimator`): "gae" (critic) or
"reinforce++" (no critic). `SCHEMES` names the (mode, advantage estimator) pairs the experiments compare:
the five modes with GAE, "rto_reinforce++" = mode "rto" + advantage_estimator "reinforce++" and "reinforce++" =
mode "ppo" + "reinforce++" (REINFORCE++ on the sparse reward: the RPP baseline of RTO's Table 2).

Policies: by default `TabularPolicy` (one logit per (layer, state, token), initialized at log pi_ref) and
`TabularCritic` (one value per (layer, state), initialized at 0); the trainer takes any actor and critic of
`rto_sim.policies` instead (`LogLinearPolicy` over shared features, `LinearCritic`, a critic started elsewhere), plus
extra exact evaluations (`eval_rewards`) and a per-update `diagnostics` hook (E7 compares the advantages with the
exact advantage there). `shaping_is_critic_offset` checks identity 11 (docs/theory.md section 10) through the
whole trainer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import core
from .exact import enumerate_responses, rto_reward_table
from .gym_env import TokenMDPVectorEnv
from .mdp import Layered, TokenMDP, gather, safe_log
from .policies import MultiEvaluator, TabularCritic, TabularPolicy
from .sampling import sample_categorical

__all__ = ["SCHEMES", "TabularPolicy", "TabularCritic", "TabularPPOConfig", "TabularPPOTrainer", "Rollout",
           "PPOResult", "train_ppo", "scheme_reward_table", "delimiter_mask", "prefix_dpo_sum",
           "shaping_is_critic_offset"]

# experiment label -> TabularPPOConfig settings (E7's table rows and the tests iterate over these)
SCHEMES = {"ppo": {"mode": "ppo"}, "rto": {"mode": "rto"}, "semi_rto": {"mode": "semi_rto"},
           "ddpo": {"mode": "ddpo"}, "rs_ppo": {"mode": "rs_ppo"},
           "rto_reinforce++": {"mode": "rto", "advantage_estimator": "reinforce++"},
           "reinforce++": {"mode": "ppo", "advantage_estimator": "reinforce++"}}
DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------------
# Config and rollout record
# ---------------------------------------------------------------------------------------------------


@dataclass
class TabularPPOConfig:
    """PPO / RTO hyper-parameters for the tabular simulator (paper values in brackets where they exist).
    Every setting the LLM trainer also has carries its name there, flattened (`rto_llm/ppo/config.py`:
    rto.mode -> mode, kl.kind -> kl_kind, train.lr -> lr, critic.lr -> critic_lr, ppo.epochs -> epochs,
    train.grad_clip -> grad_clip, ...).

    mode: reward mode, one of core.REWARD_MODES (default "rto"; rto.mode). advantage_estimator: "gae"
    (default, with the critic) or "reinforce++" (no critic) (ppo.advantage_estimator).
    beta1: DPO token-reward scale beta1 >= 0 [0.05] (rto.beta1). beta2: KL coefficient beta2 > 0 (also the
    beta of the true objective J_true) [0.01; default here 0.05 to keep the tabular optimum at a moderate KL]
    (kl.beta2). beta3: RM score scale [1] (reward.beta3). dpo_clip: per-token clip c of the DPO reward, None =
    off [0.05] (rto.dpo_clip). kl_kind: "k1" (default; kl.kind). segment_length / delimiter_token: Semi-RTO
    delimiters (module docstring). n_updates: PPO updates (rollout + epochs) [default 40]. batch_size:
    episodes per rollout B [256]. epochs: PPO epochs per rollout [1 in the paper; default 4] (ppo.epochs).
    n_minibatches per epoch [8 in the paper; default 4]. lr: actor learning rate [5e-7 for an LLM; 0.05 for
    tabular logits] (train.lr), critic_lr [0.1] (critic.lr), clip_eps [0.2], value_clip [0.2; None = off],
    vf_coef [0.5], gamma [1.0], lam [0.95], whiten_advantages [True] (all ppo.*), grad_clip: max gradient
    norm [1.0; None = off] (train.grad_clip), seed [0] (train.seed). num_threads: torch intra-op threads
    during `train` (default 1, restored afterwards: the tensors are tiny and thread hand-offs cost ~10x on a
    shared CPU; None leaves torch's setting alone). optimizer: "adam" (default; betas (0.9, 0.999)) or "sgd"
    (plain gradient steps: the update size then scales with the advantage magnitudes, which Adam normalizes
    away).
    """

    mode: str = "rto"
    advantage_estimator: str = "gae"
    beta1: float = 0.05
    beta2: float = 0.05
    beta3: float = 1.0
    dpo_clip: float | None = None
    kl_kind: str = "k1"
    segment_length: int = 2
    delimiter_token: int | None = None
    n_updates: int = 40
    batch_size: int = 256
    epochs: int = 4
    n_minibatches: int = 4
    lr: float = 0.05
    critic_lr: float = 0.1
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    grad_clip: float | None = 1.0
    seed: int = 0
    num_threads: int | None = 1
    optimizer: str = "adam"

    def __post_init__(self):
        if self.mode not in core.REWARD_MODES:
            raise ValueError(f"mode must be one of {core.REWARD_MODES}, got {self.mode!r}")
        core.get_advantage_estimator(self.advantage_estimator)       # ValueError for an unknown name
        for name in ("beta1", "beta3"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.beta2 > 0:
            raise ValueError(f"beta2 must be > 0 (it is also the beta of the true objective), got {self.beta2}")
        if self.dpo_clip is not None and self.dpo_clip <= 0:
            raise ValueError(f"dpo_clip must be > 0 or None, got {self.dpo_clip}")
        for name in ("n_updates", "batch_size", "epochs", "n_minibatches", "segment_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < self.n_minibatches:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= n_minibatches ({self.n_minibatches})")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (0 <= self.lam <= 1 and 0 < self.gamma <= 1):
            raise ValueError(f"need 0 <= lam <= 1 and 0 < gamma <= 1, got lam={self.lam}, gamma={self.gamma}")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"


@dataclass
class Rollout:
    """One rollout buffer. Every tensor is (B, H) over response tokens unless stated."""

    prompt: torch.Tensor          # (B,) prompt index
    flat_states: torch.Tensor     # (B, H) flat state index of s_t (offsets[h] + s)
    actions: torch.Tensor         # (B, H) tokens y_t
    mask: torch.Tensor            # (B, H) bool, generated tokens through the first EOS
    logprobs: torch.Tensor        # (B, H) log pi_old(y_t)
    ref_logprobs: torch.Tensor    # (B, H) log pi_ref(y_t)
    dpo_logprobs: torch.Tensor | None   # (B, H) log pi_dpo(y_t) (None when the mode has no DPO term)
    values: torch.Tensor | None   # (B, H) V_old(s_t) (None without critic)
    score: torch.Tensor           # (B,) sentence RM score R = r_RM(x, y)
    delimiter_mask: torch.Tensor  # (B, H) bool Semi-RTO delimiters
    terms: core.RewardTerms | None = None   # token-level rewards and their parts
    advantages: torch.Tensor | None = None  # (B, H)
    returns: torch.Tensor | None = None     # (B, H)


def delimiter_mask(actions: np.ndarray, segment_length: int = 2, delimiter_token: int | None = None) -> np.ndarray:
    """(B, H) bool Semi-RTO delimiters: token == delimiter_token if given, else every
    `segment_length`-th position (1-based positions L, 2L, ...)."""
    actions = np.asarray(actions)
    if delimiter_token is not None:
        return actions == delimiter_token
    pos = np.arange(actions.shape[1]) + 1
    return np.broadcast_to(pos % segment_length == 0, actions.shape).copy()


# ---------------------------------------------------------------------------------------------------
# Exact-planning reward tables of each reward mode (S12), built through the core
# ---------------------------------------------------------------------------------------------------


def scheme_reward_table(mdp: TokenMDP, mode: str, rm_reward: Layered, log_pi_dpo: Layered | None,
                        beta1: float, beta3: float = 1.0, dpo_clip: float | None = None, segment_length: int = 2,
                        delimiter_token: int | None = None) -> tuple[Layered, float]:
    """The token reward table r_mode(s, a) (without the KL term, which is soft_bellman's beta = beta2)
    of a reward mode (core.REWARD_MODES), built by running `core.compute_rto_rewards` on EVERY enumerated
    response and scattering the (N, H) per-token rewards back onto (state, token).

    The sentence RM score of a response is R(y) = sum_h rm_reward[h][s_h, a_h].
    Returns (table, spread): spread = max over (s, a) of the disagreement between responses that share
    (s, a). On a tree every causal redistribution is a function of the prefix, so spread = 0; on an
    aggregated automaton Semi-RTO / DDPO / RS-PPO depend on the path and spread > 0: the mode is not
    a Markov reward on those states (the table then holds the mean over responses, for information).
    """
    if mode not in core.REWARD_MODES:
        raise ValueError(f"mode must be one of {core.REWARD_MODES}, got {mode!r}")
    enum = enumerate_responses(mdp)
    H = mdp.H
    mask = np.arange(H)[None, :] < enum.length[:, None]
    rm = mdp.check_reward(rm_reward)
    score = np.where(mask, enum.gather(rm), 0.0).sum(axis=1)
    ref = np.where(mask, enum.gather(mdp.log_pi_ref), 0.0)
    dpo = None
    if mode != "ppo" and beta1 > 0:
        if log_pi_dpo is None:
            raise ValueError("log_pi_dpo is required for this mode when beta1 > 0")
        dpo = torch.as_tensor(np.where(mask, enum.gather(log_pi_dpo), 0.0), dtype=DTYPE)
    t = lambda x: torch.as_tensor(x, dtype=DTYPE)  # noqa: E731
    terms = core.compute_rto_rewards(
        t(score), t(ref), t(ref), torch.as_tensor(mask), beta2=0.0, beta3=beta3, dpo_logprobs=dpo, beta1=beta1,
        dpo_clip=dpo_clip, mode=mode,
        delimiter_mask=torch.as_tensor(delimiter_mask(enum.actions, segment_length, delimiter_token)))
    r = terms.token_level_rewards.numpy()
    table, spread = [], 0.0
    for h in range(H):
        n = mdp.n_states[h]
        m = mask[:, h]
        key = enum.states[m, h] * mdp.A + enum.actions[m, h]
        hi = np.full(n * mdp.A, -np.inf)
        lo = np.full(n * mdp.A, np.inf)
        np.maximum.at(hi, key, r[m, h])
        np.minimum.at(lo, key, r[m, h])
        tot = np.bincount(key, weights=r[m, h], minlength=n * mdp.A)
        cnt = np.bincount(key, minlength=n * mdp.A)
        seen = cnt > 0
        if seen.any():
            spread = max(spread, float((hi[seen] - lo[seen]).max()))
        table.append(np.where(seen, tot / np.maximum(cnt, 1), 0.0).reshape(n, mdp.A))
    return mdp.check_reward(table), spread


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class PPOResult:
    """curve: one dict per evaluation (update 0 = the initial policy pi_ref) with the exact J_true,
    gold_return, kl_ref, rm_return, dpo_reward (E_pi of the clipped beta1 DPO reward sum), J_<name> for every
    extra table of `eval_rewards` and, for updates >= 1, rollout statistics: score_mean, seq_kl_k1,
    dpo_reward_sampled, response_length, pg_loss, vf_loss, clipfrac, approxkl, ratio_first (max |rho - 1| on the
    first minibatch: exactly 0), explained_variance, and whatever the `diagnostics` hook returned.
    policy / critic: trained modules; config: the TabularPPOConfig as a dict; wall_time_s."""

    curve: list = field(default_factory=list)
    policy: torch.nn.Module | None = None
    critic: torch.nn.Module | None = None
    config: dict = field(default_factory=dict)
    wall_time_s: float = 0.0


class TabularPPOTrainer:
    """PPO with the RTO reward on a softmax policy over the states of a layered MDP (module docstring gives the
    numbered loop).

    Args:
        mdp: the TokenMDP; pi_ref = mdp.pi_ref.
        true_reward: layered r*(s, a) (n_h, A), used ONLY for exact evaluation.
        rm_reward: layered token table whose trajectory sum is the sentence RM score r_RM(x, y)
            (a fitted token MLE, a bandit fit on terminal features, or r* itself for an exact RM).
        log_pi_dpo: layered log pi_dpo (the DPO policy, trained against pi_ref); needed when the
            mode has a DPO term and beta1 > 0.
        config: TabularPPOConfig.
        policy: the actor (default `TabularPolicy(mdp)`; any `rto_sim.policies` actor, e.g. `LogLinearPolicy`).
            It must start at pi_ref: pi_ref is a frozen copy of it.
        critic: the critic module (default `TabularCritic(mdp)` when the advantage estimator uses one; any
            `rto_sim.policies` critic, e.g. `LinearCritic`, or `TabularCritic(mdp, init=...)` started elsewhere).
        eval_rewards: {name: layered reward table}: the exact J_beta2 of each is added to every evaluation as
            J_<name> (e.g. the objective the arm optimizes).
        diagnostics: optional hook f(trainer, rollout, update) -> dict, called after step 5 of every update; its
            entries are added to that update's curve row (e.g. advantage estimates against the exact advantage).
    """

    def __init__(self, mdp: TokenMDP, true_reward: Layered, rm_reward: Layered, log_pi_dpo: Layered | None,
                 config: TabularPPOConfig, policy: torch.nn.Module | None = None,
                 critic: torch.nn.Module | None = None, eval_rewards: dict | None = None, diagnostics=None):
        self.mdp, self.cfg = mdp, config
        self.true_reward = mdp.check_reward(true_reward)
        self.rm_reward = mdp.check_reward(rm_reward)
        self.uses_dpo = config.mode != "ppo" and config.beta1 > 0
        if self.uses_dpo and log_pi_dpo is None:
            raise ValueError(f"log_pi_dpo is required for mode={config.mode!r} with beta1 > 0")
        if critic is not None and not config.uses_critic:
            raise ValueError(f"a critic was given but advantage_estimator={config.advantage_estimator!r} uses none")
        self.log_pi_dpo = log_pi_dpo
        self.offsets = mdp.flat_offsets()
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.env = TokenMDPVectorEnv(mdp, config.batch_size)
        self.policy = TabularPolicy(mdp) if policy is None else policy
        # pi_ref is a frozen copy of the initial policy (as on the LLM side), so at initialization
        # log pi_old and log pi_ref are bit-identical and the k1 KL reward is exactly 0.
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)
        if critic is None and config.uses_critic:
            critic = TabularCritic(mdp)
        self.critic = critic
        opt = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
        self.opt_actor = opt(self.policy.parameters(), lr=config.lr)
        self.opt_critic = opt(self.critic.parameters(), lr=config.critic_lr) if self.critic else None
        flat = lambda layered: torch.as_tensor(np.concatenate(layered, axis=0), dtype=DTYPE)  # noqa: E731
        self._dpo_flat = flat(log_pi_dpo) if self.uses_dpo else None
        self._rm = self.rm_reward
        self._dpo_table = None
        if log_pi_dpo is not None and config.beta1 > 0:
            self._dpo_table = rto_reward_table(mdp, None, log_pi_dpo, beta1=config.beta1, beta3=0.0,
                                               clip=config.dpo_clip)
        # exact evaluation: every table in one backward recursion (true reward, RM, DPO reward, extras)
        self._eval_names = ["true", "rm"] + (["dpo"] if self._dpo_table is not None else [])
        tables = [self.true_reward, self._rm] + ([self._dpo_table] if self._dpo_table is not None else [])
        self.eval_rewards = dict(eval_rewards or {})
        for name, table in self.eval_rewards.items():
            self._eval_names.append(f"J_{name}")
            tables.append(mdp.check_reward(table, f"eval_rewards[{name!r}]"))
        self._evaluator = MultiEvaluator(mdp, tables)
        self.diagnostics = diagnostics

    # 1. generate ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sample B episodes from pi_old through the vector env. Returns prompt (B,), states (B, H)
        layer-wise, actions (B, H), mask (B, H)."""
        B, H = self.cfg.batch_size, self.mdp.H
        states, actions, mask = (np.zeros((B, H), np.int64), np.zeros((B, H), np.int64), np.zeros((B, H), bool))
        probs = torch.exp(self.policy.log_probs_all(torch.arange(int(self.offsets[-1])))).numpy()   # (S, A)
        obs, info = self.env.reset(seed=int(self.rng.integers(2**31)))
        prompt = info["prompt"]
        for h in range(H):
            a = sample_categorical(probs[obs], self.rng)
            obs, _, _, _, info = self.env.step(a)
            states[:, h], actions[:, h], mask[:, h] = info["state"], a, info["valid"]
        return prompt, states, actions, mask

    # 2.-5. log-probs, score, rewards, advantages ------------------------------------------------------
    @torch.no_grad()
    def make_experience(self) -> Rollout:
        cfg = self.cfg
        prompt, states, actions, mask_np = self.generate()
        flat = torch.as_tensor(states + self.offsets[:-1][None, :])
        act = torch.as_tensor(actions)
        mask = torch.as_tensor(mask_np)
        logprobs = self.policy.log_probs(flat, act)                               # log pi_old
        ref_logprobs = self.ref_policy.log_probs(flat, act)
        dpo_logprobs = self._dpo_flat[flat, act] if self.uses_dpo else None
        values = self.critic(flat) if self.critic is not None else None
        # 3. score: sentence RM score of the whole response (sum of the RM table over valid tokens)
        score = torch.as_tensor(np.where(mask_np, gather(self._rm, states, actions), 0.0).sum(axis=1),
                                dtype=DTYPE)
        delim = torch.as_tensor(delimiter_mask(actions, cfg.segment_length, cfg.delimiter_token))
        roll = Rollout(prompt=torch.as_tensor(prompt), flat_states=flat, actions=act, mask=mask, logprobs=logprobs,
                       ref_logprobs=ref_logprobs, dpo_logprobs=dpo_logprobs, values=values, score=score,
                       delimiter_mask=delim)
        # 4. rewards (RTO eq. 4.7) -- the only place rewards are built
        roll.terms = core.compute_rto_rewards(
            score, logprobs, ref_logprobs, mask, beta2=cfg.beta2, beta3=cfg.beta3, dpo_logprobs=dpo_logprobs,
            beta1=cfg.beta1, dpo_clip=cfg.dpo_clip, mode=cfg.mode, kl_kind=cfg.kl_kind, delimiter_mask=delim)
        rewards = roll.terms.token_level_rewards
        # 5. advantages (as the LLM trainer: the estimator by name, whitening of GAE advantages)
        estimator = core.get_advantage_estimator(cfg.advantage_estimator)
        adv, ret = estimator(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages and cfg.advantage_estimator == "gae":
            adv = core.masked_whiten(adv, mask)
        roll.advantages, roll.returns = adv, ret
        return roll

    # 6. PPO epochs ---------------------------------------------------------------------------------
    def ppo_epochs(self, roll: Rollout) -> dict:
        cfg = self.cfg
        B = roll.actions.shape[0]
        stats: dict[str, list] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approxkl": [], "ratio_first": []}
        first = True
        for _ in range(cfg.epochs):
            perm = torch.randperm(B, generator=self.gen)
            for idx in torch.tensor_split(perm, cfg.n_minibatches):
                mb_mask = roll.mask[idx]
                logp = self.policy.log_probs(roll.flat_states[idx], roll.actions[idx])
                pg_loss, pg_stats = core.ppo_policy_loss(logp, roll.logprobs[idx], roll.advantages[idx], mb_mask,
                                                         clip_eps=cfg.clip_eps)
                if first:       # first minibatch of the update: pi == pi_old, ratio exactly 1
                    stats["ratio_first"].append(max(abs(float(pg_stats["ratio_max"]) - 1.0),
                                                    abs(float(pg_stats["ratio_min"]) - 1.0)))
                    first = False
                self.opt_actor.zero_grad()
                loss = pg_loss
                if self.critic is not None:
                    v = self.critic(roll.flat_states[idx])
                    vf_loss, _ = core.value_loss(v, roll.values[idx], roll.returns[idx], mb_mask,
                                                 clip_eps=cfg.value_clip)
                    self.opt_critic.zero_grad()
                    loss = loss + cfg.vf_coef * vf_loss
                    stats["vf_loss"].append(float(vf_loss.detach()))
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
                    if self.critic is not None:
                        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
                self.opt_actor.step()
                if self.opt_critic is not None:
                    self.opt_critic.step()
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["clipfrac"].append(float(pg_stats["clipfrac"]))
                stats["approxkl"].append(float(pg_stats["approxkl"]))
        return {k: (float(np.mean(v)) if v else float("nan")) for k, v in stats.items()}

    # 7. exact evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Exact J_true = E[r*] - beta2 KL, gold return E_pi r*, KL(pi || pi_ref), the RM return, the exact
        expected DPO reward sum E_pi sum_t clip(beta1 log pi_dpo/pi_ref) (Fig. 6 analogue) and J_<name> =
        E_pi R_name - beta2 KL for the tables of `eval_rewards` (one recursion for all of them)."""
        ret, kl = self._evaluator(self.policy.layered_policy())
        vals = dict(zip(self._eval_names, ret))
        b2 = self.cfg.beta2
        out = {"J_true": float(vals["true"] - b2 * kl), "gold_return": float(vals["true"]), "kl_ref": kl,
               "rm_return": float(vals["rm"])}
        if "dpo" in vals:
            out["dpo_reward"] = float(vals["dpo"])
        for name in self.eval_rewards:
            out[f"J_{name}"] = float(vals[f"J_{name}"] - b2 * kl)
        return out

    def train(self) -> PPOResult:
        """Run cfg.n_updates PPO updates; the curve has one exact evaluation per update (0 = pi_ref)."""
        old_threads = torch.get_num_threads()
        if self.cfg.num_threads is not None:
            torch.set_num_threads(self.cfg.num_threads)
        try:
            return self._train()
        finally:
            torch.set_num_threads(old_threads)

    def _train(self) -> PPOResult:
        t0 = time.perf_counter()
        curve = [{"update": 0, **self.evaluate()}]
        for u in range(1, self.cfg.n_updates + 1):
            roll = self.make_experience()                       # 1.-5.
            extra = self.diagnostics(self, roll, u) if self.diagnostics is not None else {}
            stats = self.ppo_epochs(roll)                        # 6.
            terms = roll.terms
            seq_kl = core.masked_sum(terms.kl, roll.mask, dim=-1)
            row = {"update": u, **self.evaluate(),               # 7.
                   "score_mean": float(roll.score.mean()), "seq_kl_k1": float(seq_kl.mean()),
                   "dpo_reward_sampled": float(core.masked_sum(terms.dpo_token_rewards, roll.mask, dim=-1).mean()),
                   "response_length": float(roll.mask.sum(-1).double().mean()), **stats}
            if roll.values is not None:
                row["explained_variance"] = float(core.explained_variance(roll.values, roll.returns, roll.mask))
            row.update(extra)
            curve.append(row)
        return PPOResult(curve=curve, policy=self.policy, critic=self.critic, config=asdict(self.cfg),
                         wall_time_s=time.perf_counter() - t0)


def train_ppo(mdp: TokenMDP, true_reward: Layered, rm_reward: Layered, log_pi_dpo: Layered | None = None,
              config: TabularPPOConfig | None = None, policy=None, critic=None, eval_rewards=None, diagnostics=None,
              **overrides) -> PPOResult:
    """Run PPO/RTO (see `TabularPPOTrainer`, which takes policy, critic, eval_rewards and diagnostics);
    keyword overrides go to `TabularPPOConfig`."""
    cfg = config if config is not None else TabularPPOConfig(**overrides)
    if config is not None and overrides:
        cfg = TabularPPOConfig(**{**asdict(config), **overrides})
    return TabularPPOTrainer(mdp, true_reward, rm_reward, log_pi_dpo, cfg, policy=policy, critic=critic,
                             eval_rewards=eval_rewards, diagnostics=diagnostics).train()


# ---------------------------------------------------------------------------------------------------
# Potential shaping = critic offset (docs/theory.md section 10), through the whole trainer
# ---------------------------------------------------------------------------------------------------


def prefix_dpo_sum(tree: TokenMDP, log_pi_dpo: Layered, beta1: float, dpo_clip: float | None = None) -> Layered:
    """D(s): the sum of the (clipped) DPO token rewards clip(beta1 log pi_dpo/pi_ref) paid along the prefix BEFORE
    state s, layered (n_h,), on a prefix TREE (each live state has one parent); 0 at the prompts and in absorbing
    states. RS-PPO's reward is PPO's shaped by this potential (with D = 0 after the last token)."""
    if tree.kind != "tree":
        raise ValueError("prefix_dpo_sum needs a prefix tree: on an automaton the prefix sum is not a state function")
    table = rto_reward_table(tree, None, log_pi_dpo, beta1=beta1, beta3=0.0, clip=dpo_clip)
    D = [np.zeros(n) for n in tree.n_states]
    for h in range(tree.H - 1):
        live = ~tree.absorbing[h][:, None] & (tree.log_pi_ref[h] > -np.inf)
        if tree.eos is not None:
            live[:, tree.eos] = False                     # EOS leads to the shared absorbing state (D = 0)
        child = tree.next_state[h][live]
        D[h + 1][child] = (D[h][:, None] + table[h])[live]
    return D


def shaping_is_critic_offset(mdp: TokenMDP, reward: Layered, beta: float, seed: int, n_updates: int = 2,
                             beta1: float = 0.5, contrast: bool = True) -> tuple[float, float]:
    """Identity (docs/theory.md section 10) through the whole trainer on the prefix tree (an automaton is lifted to
    its tree with the same pi_ref): PPO on RS-PPO's reward with the tabular critic started at 0 and PPO on the
    sparse reward with the critic started at the prefix DPO sum D (`prefix_dpo_sum`) give the same iterates.
    Both runs use the same seed (same rollout RNG), a random pi_dpo and a deliberately large beta1; whitening,
    value clipping, gradient clipping and Adam are all on.

    Returns (error, contrast): error = max over updates of |J_true(RS-PPO, V0 = 0) - J_true(PPO, V0 = D)| and
    over (s, a) of the final |log pi| difference; contrast = the same J distance between RS-PPO and PPO when
    both critics start at 0 (> 0: the identity is not a triviality; nan unless `contrast`)."""
    from .learners import lift_to_tree

    if mdp.kind == "tree":
        tree, r = mdp, mdp.check_reward(reward)
    else:
        tree, smap = lift_to_tree(mdp)
        r = tree.check_reward([np.asarray(reward[h])[smap[h]] for h in range(mdp.H)])
    log_dpo = [np.where(tree.log_pi_ref[h] > -np.inf, safe_log(p), -np.inf)
               for h, p in enumerate(tree.random_policy(seed=seed + 17))]
    cfg = TabularPPOConfig(mode="rs_ppo", beta1=beta1, beta2=beta, n_updates=n_updates, batch_size=16, epochs=1,
                           n_minibatches=2, lr=0.1, critic_lr=0.1, seed=seed)
    D = prefix_dpo_sum(tree, log_dpo, beta1)
    shaped = TabularPPOTrainer(tree, r, r, log_dpo, cfg).train()
    offset = TabularPPOTrainer(tree, r, r, log_dpo, TabularPPOConfig(**{**asdict(cfg), "mode": "ppo"}),
                               critic=TabularCritic(tree, init=D)).train()
    J = lambda res: np.array([row["J_true"] for row in res.curve])  # noqa: E731
    err = float(np.abs(J(shaped) - J(offset)).max())
    for a, b in zip(shaped.policy.layered_log_policy(), offset.policy.layered_log_policy()):
        ok = np.isfinite(a) & np.isfinite(b)
        err = max(err, float(np.abs(a[ok] - b[ok]).max()) if ok.any() else 0.0)
        if np.any(np.isfinite(a) != np.isfinite(b)):
            err = float("inf")
    if not contrast:
        return err, float("nan")
    plain = TabularPPOTrainer(tree, r, r, log_dpo, TabularPPOConfig(**{**asdict(cfg), "mode": "ppo"})).train()
    return err, float(np.abs(J(shaped) - J(plain)).max())
