"""Exact computations on a TokenMDP (docs/theory.md sections 1-2).

Everything here is a backward or forward recursion over the layers (the "token recursion"), so it
works at any size the state space fits in memory; `enumerate_responses` additionally lists every
complete response (up to ~6.5e4 per prompt) for sequence-level checks.

Conventions: `beta` is the KL coefficient; policies and rewards are layered lists (see mdp.py);
0 * log 0 = 0; absorbing states carry zero reward and zero KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp

from .core import dpo_token_reward
from .mdp import Layered, Responses, TokenMDP, check_beta, is_real_number, safe_log

MAX_ENUMERATED = 2**16 * 4   # rows (prompts x responses) that `enumerate_responses` accepts by default


def _xlogy_ratio(p: np.ndarray, logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """p * (log p - log q) with 0 where p == 0."""
    out = np.zeros_like(p)
    m = p > 0
    out[m] = p[m] * (logp[m] - logq[m])
    return out


def _next_values(mdp: TokenMDP, h: int, V_next: np.ndarray | None) -> np.ndarray:
    """(n_h, A) value of the successor state; 0 after the last layer."""
    if h == mdp.H - 1:
        return np.zeros((mdp.n_states[h], mdp.A))
    return V_next[mdp.next_state[h]]


# ---------------------------------------------------------------------- optimal KL-regularized policy
@dataclass
class SoftSolution:
    """Soft-Bellman solution for reward r and coefficient beta.

    V[h]: (n_h,) V*(s);  Q[h]: (n_h, A) r(s,a) + V*(s');  log_policy[h]: (n_h, A) log pi*_beta."""

    V: Layered
    Q: Layered
    log_policy: Layered
    beta: float

    @property
    def policy(self) -> Layered:
        return [np.exp(lp) for lp in self.log_policy]


def soft_value(log_ref: np.ndarray, q: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The soft (KL-regularized) optimum over the last axis: V = beta log sum_a pi_ref(a) exp(q(a) / beta) and
    the Gibbs log-policy log pi*(a) = log pi_ref(a) + q(a) / beta - V / beta (computed as z - logsumexp(z)).
    One soft-Bellman backup (q = r + V*(s')), or V*(x) = beta log Z(x) over whole responses (q = R(y))."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = log_ref + q / beta
        lse = logsumexp(z, axis=-1)
        V, logpi = beta * lse, z - lse[..., None]
    if not (np.all(np.isfinite(V)) and not np.any(np.isnan(logpi))):
        _raise_non_finite("the soft-Bellman value beta log sum_a pi_ref exp(q / beta)", q, beta)
    return V, logpi


def _raise_non_finite(what: str, q: np.ndarray, beta: float | None) -> None:
    """A non-finite result of the exact engine: a ValueError naming the input that caused it."""
    q = np.asarray(q, dtype=float)
    if np.any(np.isnan(q)):
        raise ValueError(f"{what} is NaN: the reward (or theta, or a policy) holds NaN; check the inputs for NaN")
    qmax = float(np.max(np.abs(q))) if q.size else 0.0
    if not np.isfinite(qmax) or beta is None:
        raise ValueError(f"{what} overflows: the reward scale (max |r| = {qmax:.3g}) is too large for float64; "
                         "rescale the reward")
    raise ValueError(f"{what} overflows at beta={beta:g}: beta is too small for the reward scale (max |r + V| = "
                     f"{qmax:.3g}, so q / beta exceeds the float64 range); use beta >= {qmax / 1e300:.3g}, rescale the "
                     "reward, or use argmax_policy for the beta -> 0 limit")


def soft_bellman(mdp: TokenMDP, reward: Layered, beta: float) -> SoftSolution:
    """V*(s) = beta log sum_a pi_ref(a|s) exp((r(s,a) + V*(s'))/beta),
    pi*(a|s) = pi_ref(a|s) exp((r(s,a) + V*(s') - V*(s))/beta), V*(terminal) = 0."""
    beta = check_beta(beta)
    return soft_backward(mdp.log_pi_ref, mdp.check_reward(reward), beta, lambda h, V: _next_values(mdp, h, V))


def soft_backward(log_pi_ref: Layered, reward: Layered, beta: float, expected_next) -> SoftSolution:
    """The backward recursion of both transition kinds (checked inputs): from the last layer down,
    Q[h] = reward[h] + expected_next(h, V[h+1]) (n_h, A) and (V[h], log pi[h]) = soft_value(log_pi_ref[h], Q[h],
    beta); `expected_next(h, None)` is the zero (n_h, A) array after the last layer."""
    H = len(log_pi_ref)
    V: list = [None] * H
    Q: list = [None] * H
    logpi: list = [None] * H
    V_next = None
    for h in range(H - 1, -1, -1):
        Q[h] = reward[h] + expected_next(h, V_next)
        V[h], logpi[h] = soft_value(log_pi_ref[h], Q[h], beta)
        V_next = V[h]
    return SoftSolution(V=V, Q=Q, log_policy=logpi, beta=beta)


def argmax_policy(mdp: TokenMDP, reward: Layered) -> Layered:
    """Deterministic policy maximizing the (unregularized) return (beta -> 0 limit); ties to the lowest
    token id."""
    reward = mdp.check_reward(reward)
    pol: list = [None] * mdp.H
    V_next = None
    for h in range(mdp.H - 1, -1, -1):
        Q = reward[h] + _next_values(mdp, h, V_next)
        Q = np.where(mdp.log_pi_ref[h] > -np.inf, Q, -np.inf)   # only actions the model allows
        a = Q.argmax(axis=1)
        pol[h] = np.eye(mdp.A)[a]
        V_next = Q.max(axis=1)
    return mdp.force_absorbing(pol)


# ---------------------------------------------------------------------- evaluation of any policy
def occupancy(mdp: TokenMDP, policy: Layered) -> Layered:
    """State occupancy d^pi_h(s) (forward recursion from rho); each layer sums to 1."""
    policy = mdp.check_policy(policy)
    d = [mdp.rho.astype(float)]
    for h in range(mdp.H - 1):
        flow = d[h][:, None] * policy[h]
        d.append(np.bincount(mdp.next_state[h].ravel(), weights=flow.ravel(), minlength=mdp.n_states[h + 1]))
    return d


@dataclass
class PolicyValue:
    """Exact value of a policy: J_beta = E_x[E_pi R - beta KL(pi(.|x) || pi_ref(.|x))].

    Per-prompt arrays have shape (P,); `V`, `Q` are the layered KL-regularized values (with the
    r - beta log(pi/pi_ref) convention)."""

    J: float
    expected_return: float
    kl: float
    J_per_prompt: np.ndarray
    return_per_prompt: np.ndarray
    kl_per_prompt: np.ndarray
    V: Layered
    Q: Layered


def evaluate(mdp: TokenMDP, policy: Layered, reward: Layered, beta: float = 0.0) -> PolicyValue:
    """Exact return, sequence-level KL(pi || pi_ref) and J_beta of `policy` (beta = 0 allowed here). Raises
    ValueError if a result is not finite (a policy putting mass on a token pi_ref forbids has infinite KL; a
    reward too large for float64 overflows)."""
    if not is_real_number(beta) or not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    policy = mdp.check_policy(policy)
    reward = mdp.check_reward(reward)
    Vr, Vk = None, None            # expected future return / KL
    Vs: list = [None] * mdp.H
    Qs: list = [None] * mdp.H
    with np.errstate(over="ignore", invalid="ignore"):
        for h in range(mdp.H - 1, -1, -1):
            logp = safe_log(policy[h])
            kl_tok = _xlogy_ratio(policy[h], logp, mdp.log_pi_ref[h])        # (n_h, A) pi * log(pi/pi_ref)
            qr = reward[h] + _next_values(mdp, h, Vr)
            qk = _next_values(mdp, h, Vk)
            Qs[h] = qr - beta * qk
            Vr = (policy[h] * qr).sum(axis=1)
            Vk = kl_tok.sum(axis=1) + (policy[h] * qk).sum(axis=1)
            Vs[h] = Vr - beta * Vk
    ret_p, kl_p = Vr, Vk
    if not np.all(np.isfinite(kl_p)):
        for h in range(mdp.H):
            off = (policy[h] > 0) & (mdp.log_pi_ref[h] == -np.inf)
            if np.any(off):
                s, a = (int(i[0]) for i in np.nonzero(off))
                raise ValueError(f"KL(policy || pi_ref) is infinite: policy[{h}] puts mass on token {a} in state {s}, "
                                 "which pi_ref forbids (pi_ref = 0); give the policy zero mass there")
        raise ValueError("KL(policy || pi_ref) is not finite: pi_ref is too close to 0 where the policy has mass")
    if not np.all(np.isfinite(ret_p)):
        _raise_non_finite("the expected return", np.concatenate([r.ravel() for r in reward]), None)
    J_p = ret_p - beta * kl_p
    return PolicyValue(J=float(mdp.rho @ J_p), expected_return=float(mdp.rho @ ret_p), kl=float(mdp.rho @ kl_p),
                       J_per_prompt=J_p, return_per_prompt=ret_p, kl_per_prompt=kl_p, V=Vs, Q=Qs)


def sub_optimality(mdp: TokenMDP, policy: Layered, reward: Layered, beta: float) -> float:
    """SubOpt(pi) = J_beta(pi*_beta) - J_beta(pi) >= 0."""
    star = soft_bellman(mdp, reward, beta)
    return float(mdp.rho @ star.V[0]) - evaluate(mdp, policy, reward, beta).J


def return_moments(mdp: TokenMDP, policy: Layered, reward: Layered) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt mean and variance of R(y) = sum_h r(s_h, a_h) under y ~ policy(.|x), by recursion."""
    policy = mdp.check_policy(policy)
    reward = mdp.check_reward(reward)
    M1, M2 = None, None
    with np.errstate(over="ignore", invalid="ignore"):
        for h in range(mdp.H - 1, -1, -1):
            m1n, m2n = _next_values(mdp, h, M1), _next_values(mdp, h, M2)
            r = reward[h]
            M1_new = (policy[h] * (r + m1n)).sum(axis=1)
            M2 = (policy[h] * (r**2 + 2 * r * m1n + m2n)).sum(axis=1)
            M1 = M1_new
        var = np.maximum(M2 - M1**2, 0.0)
    if not (np.all(np.isfinite(M1)) and np.all(np.isfinite(var))):
        _raise_non_finite("the return variance", np.concatenate([r.ravel() for r in reward]), None)
    return M1, var


def implicit_token_reward(mdp: TokenMDP, policy: Layered, beta: float) -> Layered:
    """DPO implicit token reward of a policy: beta * log(pi(a|s) / pi_ref(a|s)) (0 in absorbing states;
    -inf where pi = 0 < pi_ref)."""
    beta = check_beta(beta)
    policy = mdp.check_policy(policy)
    out = []
    for h in range(mdp.H):
        lp = safe_log(policy[h])
        m = mdp.log_pi_ref[h] > -np.inf
        r = np.zeros_like(lp)
        r[m] = beta * (lp[m] - mdp.log_pi_ref[h][m])
        r[mdp.absorbing[h]] = 0.0
        out.append(r)
    return out


# ---------------------------------------------------------------------- enumeration
@dataclass
class Enumeration(Responses):
    """Every complete response of every prompt (`Responses`: prompt (N,), actions (N, H) EOS-padded,
    states (N, H); `gather` and `returns` read layered tables along them) and length: (N,) tokens through
    the first EOS."""

    length: np.ndarray

    def log_prob(self, log_policy: Layered) -> np.ndarray:
        """(N,) log pi(y | x) from a layered LOG policy."""
        return self.gather(log_policy).sum(axis=1)


def enumerate_responses(mdp: TokenMDP, max_rows: int = MAX_ENUMERATED) -> Enumeration:
    """List all complete responses of all prompts (rows = prompts x responses). Raises ValueError
    beyond `max_rows`: use the recursions (soft_bellman, evaluate, occupancy) instead."""
    P, A, H = mdp.n_prompts, mdp.A, mdp.H
    K = mdp.num_responses
    if P * K > max_rows:
        raise ValueError(f"enumeration of {P} x {K} responses exceeds max_rows={max_rows}: this size is not "
                         "enumerable; use the token recursion (soft_bellman / evaluate / occupancy) or raise "
                         "max_rows")
    if mdp.eos is None:
        digits = (np.arange(A**H)[:, None] // A ** np.arange(H - 1, -1, -1)[None, :]) % A
        length = np.full(len(digits), H)
    else:
        b, rows, lens = A - 1, [], []
        for k in range(H + 1):        # k live tokens, then EOS (if k < H) and EOS padding
            live = (np.arange(b**k)[:, None] // b ** np.arange(k - 1, -1, -1)[None, :]) % b if k else \
                np.zeros((1, 0), np.int64)
            pad = np.full((len(live), H - k), A - 1)
            rows.append(np.concatenate([live, pad], axis=1))
            lens.append(np.full(len(live), min(k + 1, H)))
        digits, length = np.concatenate(rows), np.concatenate(lens)
    digits = digits.astype(np.int64)
    prompt = np.repeat(np.arange(P), len(digits))
    actions = np.tile(digits, (P, 1))
    return Enumeration(prompt=prompt, actions=actions, states=mdp.states_of(prompt, actions), length=np.tile(length, P))


def sequence_kl(enum: Enumeration, log_p: np.ndarray, log_q: np.ndarray, rho: np.ndarray) -> float:
    """E_x KL(p(.|x) || q(.|x)) from per-row sequence log-probs (N,)."""
    p = np.exp(log_p)
    terms = np.where(p > 0, p * (log_p - np.where(p > 0, log_q, 0.0)), 0.0)
    return float(rho @ np.bincount(enum.prompt, weights=terms, minlength=len(rho)))


def rto_reward_table(mdp: TokenMDP, reward: Layered | None = None, log_pi_dpo: Layered | None = None,
                     beta1: float = 0.0, beta3: float = 1.0, clip: float | None = None) -> Layered:
    """Exact-planning form of the RTO token reward (RTO eq. 4.7) on a layered MDP:

        r_RTO(s, a) = clip(beta1 * log(pi_dpo(a|s) / pi_ref(a|s)), -c, c) + beta3 * r(s, a)

    The -beta2 * log(pi/pi_ref) term is the KL regularizer: pass beta = beta2 to `soft_bellman`.
    (The sampled-trajectory form, with the score at the last token and masks, is
    `rto_sim.core.compute_rto_rewards`.) The DPO term is `core.dpo_token_reward` (the one definition of
    the clipped DPO token reward) on every (s, a) of each layer, with tokens pi_ref forbids (log pi_ref =
    -inf) masked to 0. beta1 = 0 never reads `log_pi_dpo`."""
    for name, v in (("beta1", beta1), ("beta3", beta3), ("clip", 1.0 if clip is None else clip)):
        if not is_real_number(v) or not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if beta1 < 0:
        raise ValueError(f"beta1 must be >= 0 (0 switches the DPO term off), got {beta1}")
    out = [np.zeros((n, mdp.A)) for n in mdp.n_states]
    if reward is not None and beta3 != 0:
        out = [o + beta3 * r for o, r in zip(out, mdp.check_reward(reward))]
    if beta1 > 0:
        if log_pi_dpo is None:
            raise ValueError("log_pi_dpo is required when beta1 > 0")
        log_pi_dpo = mdp._layered_arrays(log_pi_dpo, "log_pi_dpo")
        for h, lp in enumerate(log_pi_dpo):
            if np.any(np.isnan(lp)) or np.any(lp == np.inf):
                raise ValueError(f"log_pi_dpo[{h}] holds NaN or +inf: pass log-probabilities (<= 0, -inf for 0)")
        for h in range(mdp.H):
            m = mdp.log_pi_ref[h] > -np.inf
            t = dpo_token_reward(torch.as_tensor(np.where(m, log_pi_dpo[h], 0.0), dtype=torch.float64),
                                 torch.as_tensor(np.where(m, mdp.log_pi_ref[h], 0.0), dtype=torch.float64),
                                 torch.as_tensor(m), beta1=beta1, clip=clip)
            out[h] = out[h] + t.numpy()
    for h, r in enumerate(out):
        if not np.all(np.isfinite(r[~mdp.absorbing[h]])):
            raise ValueError(f"the RTO reward is not finite at layer {h}: log_pi_dpo is -inf (pi_dpo = 0) where pi_ref "
                             "allows the token (pass clip=c to bound the DPO term, or smooth pi_dpo), or beta3 * "
                             "reward overflows (rescale it)")
    return mdp.check_reward(out)
