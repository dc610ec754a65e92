"""Policy quality as a function of the sampling temperature, computed exactly (RTO Fig. 5).

Sampling a policy pi at temperature T means dividing its logits by T at every step, so the law actually
sampled is, per state,

    pi_T(a|s) = pi(a|s)^(1/T) / sum_b pi(b|s)^(1/T)                                   (n_h, A) per layer

(not the sequence law pi(y|x)^(1/T) renormalized: the per-state normalizers do not multiply up to the
sequence-level one). Conventions: absorbing (post-EOS) rows stay delta_EOS; a token with pi(a|s) = 0 stays
at 0 (in particular every token pi_ref forbids, since a policy that puts mass there has infinite KL and is
refused); T -> 0 gives the per-state greedy policy (uniform over tied maxima, `temper_policy(..., 0)`);
T -> inf gives the uniform law on the support of pi(.|s).

`temperature_sweep` returns, for each T, the exact J_beta(pi_T), gold return E R, KL(pi_T || pi_ref) and
SubOpt = J_beta(pi*_beta) - J_beta(pi_T), all by `exact.evaluate` / `exact.soft_bellman`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from .exact import evaluate, soft_bellman
from .mdp import Layered, TokenMDP, safe_log


def _check_temperature(T: float) -> float:
    T = float(T)
    if np.isnan(T) or T < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy, inf = uniform on the support), got {T!r}")
    return T


def _checked_policy(mdp: TokenMDP, policy: Layered) -> Layered:
    policy = mdp.check_policy(policy)
    for h, p in enumerate(policy):
        bad = (p > 0) & (mdp.log_pi_ref[h] == -np.inf)
        if bad.any():
            s, a = np.argwhere(bad)[0]
            raise ValueError(f"policy[{h}] puts mass {p[s, a]:.3g} on token {a} in state {s}, which pi_ref forbids "
                             "(pi_ref = 0): its KL is infinite; set those entries to 0 and renormalize")
    return policy


def temper_policy(mdp: TokenMDP, policy: Layered, T: float) -> Layered:
    """pi_T(a|s) proportional to pi(a|s)^(1/T) in every state (layered (n_h, A)); see the module docstring for
    T = 0, T = inf, zeros and absorbing rows."""
    T = _check_temperature(T)
    policy = _checked_policy(mdp, policy)
    out = []
    for p in policy:
        logp = safe_log(p)
        if T == 0:
            top = logp == logp.max(axis=1, keepdims=True)
            q = top / top.sum(axis=1, keepdims=True)
        elif np.isinf(T):
            q = (p > 0) / (p > 0).sum(axis=1, keepdims=True)
        else:
            z = logp / T
            q = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        out.append(q)
    return mdp.force_absorbing(out)


def tempering_error(mdp: TokenMDP, policy: Layered, T: float, candidate: Layered) -> float:
    """Checker, independent of `temper_policy`: how far `candidate` is from the per-state tempering of
    `policy` at 0 < T < inf. On each live row the candidate must (1) sum to 1, (2) have the support of
    pi(.|s), and (3) satisfy log candidate(a|s) - log pi(a|s)/T = const(s) on that support. Returns the
    largest violation (row-sum error, or spread of the log-ratio; +inf on a support mismatch); 0 up to
    rounding for the right law. A sequence-level tempering or a missing renormalization shows up here."""
    T = _check_temperature(T)
    if T == 0 or np.isinf(T):
        raise ValueError("tempering_error checks 0 < T < inf; compare T = 0 / inf with temper_policy directly")
    policy = _checked_policy(mdp, policy)
    err = 0.0
    for h, (p, c) in enumerate(zip(policy, mdp._layered_arrays(candidate, "candidate"))):
        live = ~mdp.absorbing[h]
        p, c = p[live], c[live]
        if not p.size:
            continue
        if np.any((p > 0) != (c > 0)):
            return float("inf")
        err = max(err, float(np.abs(c.sum(axis=1) - 1.0).max()))
        ratio = np.where(p > 0, safe_log(c) - safe_log(p) / T, np.nan)
        spread = np.nanmax(ratio, axis=1) - np.nanmin(ratio, axis=1)
        err = max(err, float(spread.max()))
    return err


@dataclass
class TemperatureSweep:
    """Exact readouts per temperature, arrays of shape (k,) aligned with `temperatures`:
    J = J_beta(pi_T), expected_return = E_{pi_T} R (gold return), kl = KL(pi_T || pi_ref) (sequence level,
    rho-weighted), subopt = J_star - J; J_star = J_beta(pi*_beta)."""

    temperatures: np.ndarray
    J: np.ndarray
    expected_return: np.ndarray
    kl: np.ndarray
    subopt: np.ndarray
    J_star: float
    beta: float

    def rows(self) -> list[dict]:
        """One dict per temperature (for a results table)."""
        return [{"temperature": float(t), "J": float(j), "expected_return": float(r), "kl": float(k),
                 "subopt": float(s), "J_star": self.J_star, "beta": self.beta}
                for t, j, r, k, s in zip(self.temperatures, self.J, self.expected_return, self.kl, self.subopt)]


def temperature_sweep(mdp: TokenMDP, policy: Layered, reward: Layered, beta: float,
                      temperatures: Sequence[float] = (0.25, 0.5, 0.7, 1.0, 1.5, 2.0)) -> TemperatureSweep:
    """Exact J_beta, gold return, KL to pi_ref and SubOpt of pi_T for each T in `temperatures` (T = 0 is
    the greedy limit). `reward` is the true (gold) token reward, layered (n_h, A); beta > 0."""
    temps = np.array([_check_temperature(t) for t in temperatures], dtype=float)
    if temps.ndim != 1 or temps.size == 0:
        raise ValueError("temperatures must be a non-empty list of numbers >= 0")
    J_star = float(mdp.rho @ soft_bellman(mdp, reward, beta).V[0])
    vals = [evaluate(mdp, temper_policy(mdp, policy, t), reward, beta) for t in temps]
    J = np.array([v.J for v in vals])
    return TemperatureSweep(temperatures=temps, J=J, expected_return=np.array([v.expected_return for v in vals]),
                            kl=np.array([v.kl for v in vals]), subopt=J_star - J, J_star=J_star, beta=float(beta))
