"""Offline pessimistic planning: RTO Algorithm 1, the Appendix B.1 max-min planner, Theorem 4.2, rho.

Notation (docs/theory.md section 4). Data D of N pairs with Delta_i = psi(y_w^i) - psi(y_l^i) in R^d;
theta_hat the token MLE (`rto_sim.learners.fit_token_mle`) and

    Sigma_D = sum_i Delta_i Delta_i^T + lambda I                     (a SUM: grows with N)
    ||x||_{M} = sqrt(x^T M x).

* Algorithm 1: pessimistic token reward
      r_pess(s, a) = <phi(s, a), theta_hat> - rho * ||phi(s, a)||_{Sigma_D^-1}
  followed by exact soft planning (`rto_sim.exact.soft_bellman`) at KL coefficient beta.
* Appendix B.1: max over pi of min over the ellipsoid {||theta - theta_hat||_{Sigma_D} <= rho} of
      <m(pi), theta> - beta KL(pi || pi_ref),      m(pi) = E_x E_{y ~ pi(.|x)} psi(y) = E_{d^pi} phi.
  The inner minimum is closed form, <m, theta_hat> - rho ||m||_{Sigma_D^-1} (Cauchy-Schwarz), and the
  outer objective F(pi) is concave in the sequence distribution. By the minimax theorem its value equals
      min_{theta in ellipsoid} g(theta),     g(theta) = E_x V*_theta(x) = E_x beta log Z_theta(x)
  (the soft value of the linear reward theta: convex, gradient m(pi_theta)), and the maximizing policy is
  the Gibbs policy pi_{theta_min} of the minimizer. `maxmin_policy` solves this d-dimensional convex
  problem (method "dual", token recursion, any automaton) or mirror ascent on the enumerated sequence
  distribution (method "primal", for checks); both report the duality gap g(theta) - F(pi) >= 0, a
  certificate of optimality.
* Theorem 4.2 (with probability >= 1 - delta, i.e. whenever ||theta_hat - theta*||_{Sigma_D} <= rho):
      SubOpt(pi_pess) <= 2 rho E_{d*} ||phi||_{Sigma_D^-1} - beta E_{d*} KL(pi*(.|s) || pi_pess(.|s))
  and for B.1: SubOpt(pi_B1) <= 2 rho ||E_{d*} phi||_{Sigma_D^-1} (tighter by Jensen).
  E_{d^pi} f means sum_h E_{(s_h, a_h) ~ d^pi_h} f(s_h, a_h) (a per-response sum of per-token terms).

IDENTIFIABLE SUBSPACE (`project=True`, the default). Bradley-Terry sees theta only through
S = span{psi(y) - psi(y') : y, y' responses of one prompt}. A direction v outside S changes every return
of a prompt by the same constant (e.g. the all-ones vector for unigram features without EOS), so it
changes neither the policy nor any SubOpt, but Sigma_D gives it only the ridge lambda: ||phi||_{Sigma_D^-1}
then contains a policy-irrelevant term ~ 1/sqrt(lambda) and the bounds become vacuous. With projection P
onto S, every norm is taken of the projected vector (||P phi||_{Sigma_D^-1}, ||P (theta - theta*)||_{Sigma_D},
ellipsoid theta_hat + {u in S : ||u||_{Sigma_D} <= rho}); the proofs of both bounds go through unchanged
(the discarded part of phi is a per-prompt constant on complete responses, i.e. a potential). P is
computed from the enumerated responses (up to ~6.5e4 per prompt). `project=False` gives the paper's
literal formulas.

rho: the bounds hold on the event ||P(theta_hat - theta*)||_{Sigma_D} <= rho. `calibrate_rho` takes
the (1 - delta) quantile of that radius over simulated data sets (the simulator knows theta*);
`bootstrap_radii` is the data-only parametric bootstrap; `theory_rho` is the paper's order
sqrt((d + log(1/delta)) / Upsilon^2 + lambda B^2) with Upsilon = 1/(2 + exp(-2HLB) + exp(2HLB)) and
constant C = 1 (the theorem's constant is unspecified); `asymptotic_rho` is the large-N value
sqrt(chi2_{1-delta}(d_eff) / s) with s the mean Bradley-Terry slope (Fisher information s Sigma_D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.stats import chi2

from .exact import (
    SoftSolution,
    enumerate_responses,
    evaluate,
    occupancy,
    soft_bellman,
)
from .features import FeatureMap
from .learners import fit_token_mle
from .mdp import Layered, TokenMDP, check_beta
from .preferences import PreferenceData, trajectory_features

__all__ = ["ConfidenceSet", "identifiable_basis", "expected_features", "feature_bonus", "pessimistic_reward",
           "pessimistic_policy", "greedy_policy", "MaxMinSolution", "maxmin_policy", "maxmin_objective",
           "theorem42_bound", "b1_bound", "layered_kl", "confidence_radius", "calibrate_rho", "bootstrap_radii",
           "theory_rho", "asymptotic_rho", "plugin_rho"]


# ---------------------------------------------------------------------- geometry
def identifiable_basis(mdp: TokenMDP, features: FeatureMap, tol: float = 1e-9) -> np.ndarray:
    """U (d, k) orthonormal basis of S = span{psi(y) - psi(y') : same prompt} (by enumeration)."""
    enum = enumerate_responses(mdp)
    psi = features.psi(enum).toarray()
    means = np.zeros((mdp.n_prompts, features.d))
    np.add.at(means, enum.prompt, psi)
    means /= np.bincount(enum.prompt, minlength=mdp.n_prompts)[:, None]
    X = psi - means[enum.prompt]
    G = X.T @ X
    w, V = np.linalg.eigh(G)
    keep = w > tol * max(w.max(), 1e-300)
    return V[:, keep]


@dataclass
class ConfidenceSet:
    """The ellipsoid {theta_hat + u : u in S, ||u||_{Sigma_D} <= rho} of Algorithm 1 / Appendix B.1.

    theta_hat (d,); sigma_D (d, d) = sum_i Delta_i Delta_i^T + lambda I; rho >= 0; basis U (d, k): an
    orthonormal basis of the subspace the set lives in (identity = the paper's literal set);
    norm_bound: B or None. With B (the paper's parameter class ||theta*|| <= B) the Algorithm-1 bonus is
    min(rho ||P phi||_{Sigma_D^-1}, ||P phi||_2 (||P theta_hat||_2 + B)), still an upper bound on
    |<phi, theta_hat - theta*>| on the event, but no longer ~ rho / sqrt(lambda) along directions the data
    never cover. The B.1 set stays the ellipsoid alone."""

    theta_hat: np.ndarray
    sigma_D: np.ndarray
    rho: float
    basis: np.ndarray
    norm_bound: float | None = None

    def __post_init__(self):
        d = len(self.theta_hat)
        if self.sigma_D.shape != (d, d):
            raise ValueError(f"sigma_D must have shape ({d}, {d}), got {self.sigma_D.shape}")
        if not np.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho!r}")
        if self.norm_bound is not None and not (np.isfinite(self.norm_bound) and self.norm_bound >= 0):
            raise ValueError(f"norm_bound (B) must be >= 0 or None, got {self.norm_bound!r}")
        U = self.basis
        S = U.T @ self.sigma_D @ U                                   # (k, k) Sigma_D restricted to S
        w, V = np.linalg.eigh((S + S.T) / 2)
        if w.min() <= 0:
            raise ValueError("Sigma_D is singular on the subspace: refit with ridge (lambda) > 0")
        self._S_inv_half = V @ np.diag(w**-0.5) @ V.T              # Sigma_S^{-1/2}
        self.metric_inv = U @ np.linalg.solve(S, U.T)                # P Sigma_D^{-1} P  (d, d)

    @classmethod
    def from_fit(cls, fit, rho: float, mdp: TokenMDP | None = None, project: bool = True,
                 norm_bound: float | None = None) -> ConfidenceSet:
        """From a `TokenMLEFit` (theta, sigma_D); project=True needs `mdp` for the identifiable subspace;
        norm_bound = B caps the Algorithm-1 bonus (class docstring)."""
        if fit.sigma_D is None:
            raise ValueError("fit.sigma_D is None (d too large for a dense Sigma_D): use fewer features")
        d = len(fit.theta)
        if project:
            if mdp is None:
                raise ValueError("project=True needs the mdp (identifiable subspace); pass mdp= or project=False")
            U = identifiable_basis(mdp, fit.features)
        else:
            U = np.eye(d)
        return cls(theta_hat=np.asarray(fit.theta, float), sigma_D=np.asarray(fit.sigma_D, float), rho=float(rho),
                   basis=U, norm_bound=norm_bound)

    def with_rho(self, rho: float) -> ConfidenceSet:
        return ConfidenceSet(self.theta_hat, self.sigma_D, float(rho), self.basis, self.norm_bound)

    def inv_norm(self, x: np.ndarray) -> np.ndarray:
        """||P x||_{Sigma_D^-1} for x (d,) or rows of X (n, d)."""
        x = np.asarray(x, float)
        return np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", x, self.metric_inv, x), 0.0))

    def radius(self, theta: np.ndarray) -> float:
        """||P (theta - theta_hat)||_{Sigma_D}: theta is in the set iff this is <= rho (and theta - theta_hat
        in S)."""
        u = self.basis.T @ (np.asarray(theta, float) - self.theta_hat)
        return float(np.sqrt(max(u @ (self.basis.T @ self.sigma_D @ self.basis) @ u, 0.0)))

    def point(self, z: np.ndarray) -> np.ndarray:
        """theta_hat + rho U Sigma_S^{-1/2} z: the ellipsoid as the image of the unit ball ||z|| <= 1."""
        return self.theta_hat + self.rho * self.basis @ (self._S_inv_half @ z)

    def inner_min(self, m: np.ndarray) -> tuple[float, np.ndarray]:
        """min over the set of <m, theta> = <m, theta_hat> - rho ||P m||_{Sigma_D^-1}, and the minimizer
        theta_hat - rho P Sigma_D^-1 P m / ||P m||_{Sigma_D^-1}."""
        m = np.asarray(m, float)
        nrm = float(self.inv_norm(m))
        val = float(m @ self.theta_hat) - self.rho * nrm
        arg = self.theta_hat - (self.rho / nrm) * (self.metric_inv @ m) if nrm > 0 else self.theta_hat.copy()
        return val, arg


def expected_features(mdp: TokenMDP, features: FeatureMap, policy: Layered) -> np.ndarray:
    """m(pi) = E_x E_{y ~ pi} psi(y) = sum_h E_{(s, a) ~ d^pi_h} phi(s, a), shape (d,) (by recursion)."""
    policy = mdp.check_policy(policy)
    d = occupancy(mdp, policy)
    m = np.zeros(features.d)
    for h in range(mdp.H):
        w = (d[h][:, None] * policy[h])[:, :, None] * features.value[h]            # (n_h, A, mm)
        m += np.bincount(features.index[h].ravel(), weights=w.ravel(), minlength=features.d)
    return m


def _phi_norms(features: FeatureMap, M: np.ndarray) -> Layered:
    """sqrt(phi(s, a)^T M phi(s, a)), layered (n_h, A) (sparse phi, dense M)."""
    out = []
    for idx, val in zip(features.index, features.value):
        # sum_{j,k} v_j v_k M[i_j, i_k] over the m non-zeros of phi(s, a)
        q = np.einsum("saj,sak,sajk->sa", val, val, M[idx[:, :, :, None], idx[:, :, None, :]])
        out.append(np.sqrt(np.maximum(q, 0.0)))
    return out


def feature_bonus(features: FeatureMap, cs: ConfidenceSet) -> Layered:
    """The Algorithm-1 bonus b(s, a) = rho ||P phi(s, a)||_{Sigma_D^-1}, capped
    at ||P phi||_2 (||P theta_hat|| + B) when cs.norm_bound = B is set; layered (n_h, A)."""
    b = [cs.rho * x for x in _phi_norms(features, cs.metric_inv)]
    if cs.norm_bound is not None:
        P = cs.basis @ cs.basis.T
        cap = float(np.linalg.norm(cs.basis.T @ cs.theta_hat)) + cs.norm_bound
        b = [np.minimum(x, cap * e) for x, e in zip(b, _phi_norms(features, P))]
    return b


# ---------------------------------------------------------------------- Algorithm 1
def pessimistic_reward(features: FeatureMap, cs: ConfidenceSet) -> Layered:
    """r_pess(s, a) = <phi(s, a), theta_hat> - rho ||P phi(s, a)||_{Sigma_D^-1} (RTO Algorithm 1)."""
    r = features.token_reward(cs.theta_hat)
    if cs.rho == 0:
        return r
    return [rh - b for rh, b in zip(r, feature_bonus(features, cs))]


def pessimistic_policy(mdp: TokenMDP, features: FeatureMap, cs: ConfidenceSet, beta: float) -> SoftSolution:
    """Algorithm 1: exact soft planning (`soft_bellman`) on the pessimistic token reward."""
    return soft_bellman(mdp, pessimistic_reward(features, cs), beta)


def greedy_policy(mdp: TokenMDP, features: FeatureMap, theta_hat: np.ndarray, beta: float) -> SoftSolution:
    """The plain-MLE baseline: soft planning on r_hat = <phi, theta_hat> (Algorithm 1 with rho = 0)."""
    return soft_bellman(mdp, features.token_reward(theta_hat), beta)


# ---------------------------------------------------------------------- Appendix B.1
@dataclass
class MaxMinSolution:
    """Solution of the B.1 max-min problem.

    policy: layered Gibbs policy pi_{theta_min} (dual) or None (primal, sequence-level only);
    seq_prob: (N,) sequence probabilities over `enumerate_responses(mdp)` (primal) or None;
    theta_min: (d,) the inner minimizer; value: F(pi) (primal objective, a lower bound on the optimum);
    dual_value: g(theta_min) (an upper bound); gap = dual_value - value >= 0; n_iter; converged (gap <= tol)."""

    policy: Layered | None
    seq_prob: np.ndarray | None
    theta_min: np.ndarray
    value: float
    dual_value: float
    gap: float
    n_iter: int
    converged: bool


def _kl_to_ref(mdp: TokenMDP, policy: Layered) -> float:
    zero = [np.zeros((n, mdp.A)) for n in mdp.n_states]
    return evaluate(mdp, policy, zero, 0.0).kl


def maxmin_objective(mdp: TokenMDP, features: FeatureMap, cs: ConfidenceSet, beta: float, policy: Layered) -> float:
    """F(pi) = min_{theta in set} <m(pi), theta> - beta KL(pi || pi_ref) (closed-form inner min)."""
    return cs.inner_min(expected_features(mdp, features, policy))[0] - beta * _kl_to_ref(mdp, policy)


def maxmin_policy(mdp: TokenMDP, features: FeatureMap, cs: ConfidenceSet, beta: float, method: str = "dual",
                  tol: float = 1e-8, max_iter: int = 2000) -> MaxMinSolution:
    """Solve max_pi min_{theta in set} <E_{d^pi} phi, theta> - beta KL(pi || pi_ref) (module docstring).

    method "dual": minimize g(theta) = E_x V*_theta(x) over the ellipsoid (SLSQP on the unit ball in the
    subspace coordinates, analytic gradient m(pi_theta), soft_bellman inside); "primal": entropic mirror
    ascent on the enumerated sequence distribution of each prompt, p <- p^(1/2) (pi_ref exp(<psi,
    theta_eff(p)>/beta))^(1/2) (normalized), theta_eff(p) the inner minimizer. Converged = duality gap <= tol."""
    beta = check_beta(beta)
    if method == "dual":
        return _maxmin_dual(mdp, features, cs, beta, tol, max_iter)
    if method == "primal":
        return _maxmin_primal(mdp, features, cs, beta, tol, max_iter)
    raise ValueError(f"method must be 'dual' or 'primal', got {method!r}")


def _g(mdp, features, beta, theta) -> tuple[float, SoftSolution]:
    sol = soft_bellman(mdp, features.token_reward(theta), beta)
    return float(mdp.rho @ sol.V[0]), sol


def _maxmin_dual(mdp, features, cs, beta, tol, max_iter) -> MaxMinSolution:
    k = cs.basis.shape[1]
    if cs.rho == 0 or k == 0:
        val, sol = _g(mdp, features, beta, cs.theta_hat)
        F = maxmin_objective(mdp, features, cs, beta, sol.policy)
        return MaxMinSolution(sol.policy, None, cs.theta_hat.copy(), F, val, val - F, 0, val - F <= tol)
    J = cs.rho * cs._S_inv_half @ cs.basis.T                       # d theta / d z transposed: (k, d)

    def fun(z):
        # SLSQP may probe points outside the unit ball; evaluate at the radial projection (the ball is all
        # that matters, and far-away theta would overflow the soft-Bellman recursion)
        z = z / max(1.0, float(np.linalg.norm(z)))
        val, sol = _g(mdp, features, beta, cs.point(z))
        return val, J @ expected_features(mdp, features, sol.policy)

    # start at the Algorithm-1-like direction: the inner minimizer for the greedy policy
    m0 = expected_features(mdp, features, soft_bellman(mdp, features.token_reward(cs.theta_hat), beta).policy)
    _, th0 = cs.inner_min(m0)
    z0 = np.linalg.lstsq(cs.rho * cs.basis @ cs._S_inv_half, th0 - cs.theta_hat, rcond=None)[0]
    cons = {"type": "ineq", "fun": lambda z: 1.0 - z @ z, "jac": lambda z: -2.0 * z}
    res = minimize(fun, z0, jac=True, method="SLSQP", constraints=[cons],
                   options={"maxiter": max_iter, "ftol": 1e-14})
    z = res.x / max(1.0, float(np.linalg.norm(res.x)))           # feasible point
    theta = cs.point(z)
    dual, sol = _g(mdp, features, beta, theta)
    F = maxmin_objective(mdp, features, cs, beta, sol.policy)
    gap = dual - F
    return MaxMinSolution(sol.policy, None, theta, F, dual, gap, int(res.nit), bool(gap <= tol))


def _maxmin_primal(mdp, features, cs, beta, tol, max_iter) -> MaxMinSolution:
    enum = enumerate_responses(mdp)
    psi = features.psi(enum).toarray()                              # (N, d)
    logref = enum.log_prob(mdp.log_pi_ref)
    w = mdp.rho[enum.prompt]
    P = mdp.n_prompts

    def normalize(logp):
        z = np.full(P, -np.inf)
        np.logaddexp.at(z, enum.prompt, logp)
        return logp - z[enum.prompt]

    def objective(logp):
        p = np.exp(logp)
        m = (w * p) @ psi
        inner, arg = cs.inner_min(m)
        kl = float(w @ np.where(p > 0, p * (logp - logref), 0.0))
        return inner - beta * kl, arg

    def dual(theta):
        s = logref + psi @ theta / beta
        z = np.full(P, -np.inf)
        np.logaddexp.at(z, enum.prompt, s)
        return float(mdp.rho @ (beta * z))

    logp = logref.copy()
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        F, arg = objective(logp)
        if dual(arg) - F <= tol:
            break
        logp = normalize(0.5 * logp + 0.5 * (logref + psi @ arg / beta))
    F, arg = objective(logp)
    dv = dual(arg)
    return MaxMinSolution(None, np.exp(logp), arg, F, dv, dv - F, n_iter, bool(dv - F <= tol))


# ---------------------------------------------------------------------- Theorem 4.2 and B.1 bounds
def layered_kl(mdp: TokenMDP, p: Layered, log_q: Layered) -> float:
    """E_{d^p} KL(p(.|s) || q(.|s)) = sum_h E_{s ~ d^p_h} sum_a p (log p - log q) (= sequence-level
    KL(p || q) on a tree). q is given by its LOG policy (e.g. `SoftSolution.log_policy`) so that
    probabilities that underflow to 0 still give a finite KL."""
    p = mdp.check_policy(p)
    d = occupancy(mdp, p)
    kl = 0.0
    for h in range(mdp.H):
        live = p[h] > 0
        t = np.where(live, p[h] * (np.log(np.where(live, p[h], 1.0)) - np.where(live, log_q[h], 0.0)), 0.0)
        t[mdp.absorbing[h]] = 0.0
        kl += float(d[h] @ t.sum(axis=1))
    return kl


def theorem42_bound(mdp: TokenMDP, features: FeatureMap, cs: ConfidenceSet, beta: float, pi_star: Layered,
                    log_pi_hat: Layered) -> dict:
    """RTO Theorem 4.2 right-hand side: first = 2 E_{d*} b(s, a) with b = rho ||P phi||_{Sigma_D^-1} (or its
    capped version, `feature_bonus`), kl = beta E_{d*} KL(pi* || pi_hat) (pi_hat by its LOG policy),
    bound = first - kl; b1 = 2 rho ||P E_{d*} phi||_{Sigma_D^-1} (Appendix B.1); coverage =
    ||P E_{d*} phi||_{Sigma_D^-1}."""
    bonus = feature_bonus(features, cs)
    e_bonus = evaluate(mdp, pi_star, bonus, 0.0).expected_return
    kl = beta * layered_kl(mdp, pi_star, log_pi_hat)
    first = 2 * e_bonus
    return {"first": first, "kl": kl, "bound": first - kl,
            "b1": 2 * cs.rho * float(cs.inv_norm(expected_features(mdp, features, pi_star))),
            "coverage": float(cs.inv_norm(expected_features(mdp, features, pi_star)))}


def b1_bound(mdp: TokenMDP, features: FeatureMap, cs: ConfidenceSet, pi_star: Layered) -> float:
    """2 rho ||P E_{d*} phi||_{Sigma_D^-1} (the Appendix B.1 bound on SubOpt of the max-min policy)."""
    return 2 * cs.rho * float(cs.inv_norm(expected_features(mdp, features, pi_star)))


# ---------------------------------------------------------------------- rho
def confidence_radius(cs: ConfidenceSet, theta_star: np.ndarray) -> float:
    """||P (theta_hat - theta*)||_{Sigma_D}: the smallest rho for which the bounds' event holds."""
    return cs.radius(theta_star)


def calibrate_rho(radii, delta: float) -> float:
    """(1 - delta) quantile (the 'higher' order statistic, conservative) of simulated radii."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    r = np.asarray(radii, float)
    if r.size == 0:
        raise ValueError("radii is empty: simulate at least one data set")
    return float(np.quantile(r, 1 - delta, method="higher"))


def bootstrap_radii(fit, data, features: FeatureMap, basis: np.ndarray, n_boot: int = 50, seed: int = 0,
                    fit_kwargs: dict | None = None) -> np.ndarray:
    """Parametric bootstrap of ||P (theta_b - theta_hat)||_{Sigma_D}: labels of the SAME pairs redrawn from
    Bradley-Terry at theta_hat, refit with the same ridge. Data only (no theta*)."""
    # salted: a bootstrap seed equal to the data seed must not replay the data's own uniforms
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB0075]))
    dpsi = (trajectory_features(features, data.first) - trajectory_features(features, data.second)) @ fit.theta
    p = 1.0 / (1.0 + np.exp(-dpsi))
    kw = {"ridge": fit.ridge, "norm_bound": fit.norm_bound, **(fit_kwargs or {})}
    out = []
    for _ in range(n_boot):
        lab = rng.random(data.n) < p
        fb = fit_token_mle(PreferenceData(data.first, data.second, lab), features, **kw)
        cs = ConfidenceSet(fit.theta, fb.sigma_D, 0.0, basis)
        out.append(cs.radius(fb.theta))
    return np.asarray(out)


def theory_rho(d: int, delta: float, H: int, L: float, B: float, ridge: float = 0.0, C: float = 1.0) -> dict:
    """The paper's order rho = C sqrt((d + log(1/delta)) / Upsilon^2 + lambda B^2), with
    Upsilon = 1/(2 + exp(-2HLB) + exp(2HLB)) (the smallest Bradley-Terry slope over return gaps <= 2HLB);
    C = 1 (unspecified in the theorem). L = max ||phi||, B = ||theta*|| (or the ball radius)."""
    x = 2.0 * H * L * B
    ups = 1.0 / (2.0 + np.exp(-x) + np.exp(x))
    return {"upsilon": float(ups), "rho": float(C * np.sqrt((d + np.log(1 / delta)) / ups**2 + ridge * B**2))}


def asymptotic_rho(d_eff: int, delta: float, slope: float) -> float:
    """Large-N (1 - delta) quantile of ||theta_hat - theta*||_{Sigma_D}: sqrt(chi2_{1-delta}(d_eff) / s)
    (the Fisher information is ~ s Sigma_D with s the mean Bradley-Terry slope over the pairs)."""
    return float(np.sqrt(chi2.ppf(1 - delta, d_eff) / slope))


def plugin_rho(fit, basis: np.ndarray, delta: float, n_draws: int = 20_000, seed: int = 0) -> float:
    """Data-only (1 - delta) quantile of ||P (theta_hat - theta*)||_{Sigma_D} (no theta*): the MLE's large-N law
    with the Fisher information plugged in at theta_hat. In the identifiable subspace (basis U) the penalized
    log-likelihood's Hessian at theta_hat is F_U = U^T (sum_i c_i sigma'(<Delta_i, theta_hat>) Delta_i Delta_i^T
    + lambda I) U, P(theta_hat - theta*) ~ N(0, F_U^-1), and the squared radius is sum_j l_j Z_j^2 with l_j the
    eigenvalues of S^{1/2} F_U^{-1} S^{1/2}, S = U^T Sigma_D U (all l_j ~ 1/s when the slopes sigma' are equal:
    `asymptotic_rho`). The quantile of that weighted chi-square is taken from `n_draws` fixed-seed draws."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if fit.sigma_D is None:
        raise ValueError("fit.sigma_D is None (d too large for a dense Sigma_D)")
    U = np.asarray(basis, float)
    D = fit.design
    z = np.asarray(D @ fit.theta).ravel()
    s = 1.0 / (1.0 + np.exp(-z))
    w = fit.counts * s * (1.0 - s)
    F = np.asarray((D.T @ D.multiply(w[:, None])).todense()) + fit.ridge * np.eye(len(fit.theta))
    FU = U.T @ F @ U
    S = U.T @ fit.sigma_D @ U
    L = np.linalg.cholesky((S + S.T) / 2)
    lam = np.clip(np.linalg.eigvalsh(L.T @ np.linalg.solve((FU + FU.T) / 2, L)), 0.0, None)
    draws = (np.random.default_rng(seed).standard_normal((n_draws, len(lam))) ** 2) @ lam
    return float(np.sqrt(np.quantile(draws, 1 - delta)))

