"""Reward / policy learners from preference data (docs/theory.md sections 3 and 4).

Long because its three learners share the logistic-regression core and the ridge convention stated once in this
docstring (the tree solvers are in tree_solvers.py).

Three learners see the same `PreferenceData`:

* `fit_token_mle`   linear token reward r(s, a) = <phi(s, a), theta>. The Bradley-Terry likelihood only
  sees psi(y) = sum_h phi(s_h, a_h), so this is logistic regression on the design
  Delta_i = psi(y_w^i) - psi(y_l^i) (rows (N, d), sparse):

      theta_hat = argmax_theta  sum_i log sigmoid(<Delta_i, theta>) - (lambda / 2) ||theta||^2
                  subject to ||theta|| <= B (optional)

  RIDGE CONVENTION: the log-likelihood is a SUM over pairs (not a mean) and lambda = `ridge` is the same
  lambda as in Sigma_D = sum_i Delta_i Delta_i^T + lambda I (docs/theory.md section 4), so the penalty's
  weight relative to the data shrinks like 1/N. The ball constraint is solved exactly through its KKT
  condition: the constrained optimum is the ridge solution with lambda + mu, mu >= 0 found by
  root-finding on ||theta(mu)|| = B (each solve is L-BFGS with the analytic gradient).

* `fit_bandit_mle`  the sentence-level bandit: one free parameter per complete response (arm) of each
  prompt, one-hot design e_{y_w} - e_{y_l} (sparse, two non-zeros per row), same ridge convention.
  Only arms that occur in the data are stored; unseen arms keep the prior value 0. On a tree MDP the
  fitted arm values ARE a token reward of the 'terminal' class (reward on the last token or EOS of each
  response): `BanditFit.token_reward(tree)`. On a non-tree MDP (an automaton merges prefixes, so a
  terminal (state, token) no longer identifies the response) a sentence reward is not a token reward
  of that MDP: `BanditFit.planning_problem(mdp)` lifts the MDP to its prefix tree (same pi_ref, via
  `lift_to_tree`) and returns (tree, token reward) to plan on.

* `fit_tabular_dpo` optimizes per-state policy logits directly with the DPO loss
  (`rto_sim.core.dpo_loss`, torch float64) by scipy L-BFGS. With ridge = 0 the minimizer is the
  tabular token MLE on the MDP's states followed by exact soft planning (any tabular reward is
  beta log pi/pi_ref up to potential shaping), when that MLE exists. When it does not (separable
  directions, small N) the optimum is at infinite logits and the result depends on where the optimizer
  stops: `max_iter` and `tol` act as (implicit) regularization, like early stopping in real DPO; use
  `ridge` > 0 (penalty (lambda/2) ||z - log pi_ref||^2 on the free logits, same SUM convention) for a
  well-defined answer. The fit reports `n_iter` and `converged`.

Identical pairs are collapsed (with counts) before fitting: the objectives are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import brentq, minimize
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import splu
from scipy.special import expit, log_softmax

from .core import dpo_loss
from .exact import implicit_token_reward
from .features import FeatureMap
from .mdp import Layered, TokenMDP, check_beta, gather
from .preferences import PreferenceData, response_codes, take, trajectory_features
from .tree_solvers import Result, TreeDPO, TreeTabularMLE

__all__ = ["FitInfo", "TokenMLEFit", "BanditFit", "DPOFit", "fit_token_mle", "fit_bandit_mle", "fit_tabular_dpo",
           "bandit_mle_exists", "logistic_objective", "lift_to_tree", "DENSE_SIGMA_MAX_D"]

DENSE_SIGMA_MAX_D = 2048     # Sigma_D is stored dense when d <= this


# ---------------------------------------------------------------------- shared logistic regression
def _check_ridge(ridge: float, name: str = "ridge") -> float:
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name} (lambda) must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _check_data(data) -> PreferenceData:
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData (from sample_preferences), got {type(data).__name__}")
    return data


def _collapse(data: PreferenceData, A: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of distinct (chosen, rejected) pairs and their counts."""
    ch, rj = data.chosen, data.rejected
    keys = np.stack([response_codes(ch.prompt, ch.actions, A), response_codes(rj.prompt, rj.actions, A)], axis=1)
    _, first, counts = np.unique(keys, axis=0, return_index=True, return_counts=True)
    return first, counts.astype(float)


def logistic_objective(theta: np.ndarray, X, w: np.ndarray, ridge: float) -> tuple[float, np.ndarray]:
    """f(theta) = sum_i w_i log(1 + exp(-<X_i, theta>)) + (ridge/2) ||theta||^2 and its gradient
    -X^T (w * sigmoid(-X theta)) + ridge theta. X (n, d) sparse or dense, w (n,) pair counts."""
    z = X @ theta
    f = float(w @ np.logaddexp(0.0, -z)) + 0.5 * ridge * float(theta @ theta)
    g = -(X.T @ (w * expit(-z))) + ridge * theta
    return f, np.asarray(g).ravel()


def _lbfgs(X, w, ridge, x0, max_iter, tol):
    """Minimize logistic_objective / sum(w) (same minimizer, scale-free tolerances) by L-BFGS-B."""
    scale = 1.0 / max(float(w.sum()), 1.0)

    def fun(t):
        f, g = logistic_objective(t, X, w, ridge)
        return f * scale, g * scale

    res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": int(max_iter), "gtol": tol, "ftol": tol * 1e-6, "maxcor": 30})
    g = fun(res.x)[1]
    gnorm = float(np.abs(g).max()) if g.size else 0.0
    return res.x, int(res.nit), bool(res.success or gnorm <= tol), float(res.fun / scale), gnorm, str(res.message)


# ---------------------------------------------------------------------- fit results
@dataclass
class FitInfo:
    """What every fit reports (the fields come first in each result): ridge lambda (SUM convention, module
    doc), n_iter, converged, loss (the minimized objective, a sum), grad_norm (max |grad| of the mean loss at
    the end), n (number of pairs N)."""

    ridge: float
    n_iter: int
    converged: bool
    loss: float
    grad_norm: float
    n: int


# ---------------------------------------------------------------------- token MLE
@dataclass
class TokenMLEFit(FitInfo):
    """Token-level MLE of theta (docs/theory.md section 4).

    theta: (d,) estimate; features: the FeatureMap; ridge: lambda (SUM convention, see module doc);
    norm_bound: B or None; design: Delta (N_unique, d) CSR, rows psi(y_w) - psi(y_l) of the distinct
    pairs, with `counts` (N_unique,) multiplicities (Sigma_D uses them); sigma_D: dense (d, d)
    sum_i Delta_i Delta_i^T + lambda I when d <= DENSE_SIGMA_MAX_D, else None (use the methods);
    n_iter, converged, loss (negative penalized log-likelihood, a sum), grad_norm (max |grad| of the
    mean loss at the end), n (number of pairs N)."""

    theta: np.ndarray
    features: FeatureMap
    design: sp.csr_matrix
    counts: np.ndarray
    sigma_D: np.ndarray | None
    norm_bound: float | None = None
    message: str = ""
    _factor: object = field(default=None, repr=False)

    def token_reward(self) -> Layered:
        """r_hat(s, a) = <phi(s, a), theta_hat>, layered (n_h, A)."""
        return self.features.token_reward(self.theta)

    def returns(self, traj) -> np.ndarray:
        """(n,) R_hat(y) = <psi(y), theta_hat> for Trajectories or an Enumeration."""
        return trajectory_features(self.features, traj) @ self.theta

    def sigma_matvec(self, v: np.ndarray) -> np.ndarray:
        """Sigma_D v = Delta^T diag(counts) Delta v + lambda v (v (d,) or (d, k))."""
        if self.sigma_D is not None:
            return self.sigma_D @ v
        Dv = self.design @ v
        Dv = Dv * (self.counts if Dv.ndim == 1 else self.counts[:, None])
        return self.design.T @ Dv + self.ridge * v

    def quadratic(self, v: np.ndarray) -> float:
        """||v||^2_{Sigma_D} = v^T Sigma_D v."""
        v = np.asarray(v, float)
        return float(v @ self.sigma_matvec(v))

    def _solve(self, B: np.ndarray) -> np.ndarray:
        if self._factor is None:
            if self.sigma_D is not None:
                self._factor = ("dense", cho_factor(self.sigma_D))
            else:
                S = (self.design.T @ sp.diags(self.counts) @ self.design + self.ridge * sp.eye(self.features.d)).tocsc()
                if self.ridge == 0:
                    raise ValueError("Sigma_D is singular with ridge=0; refit with ridge > 0")
                self._factor = ("sparse", splu(S))
        kind, fac = self._factor
        return cho_solve(fac, B) if kind == "dense" else fac.solve(np.asarray(B, float))

    def inv_quadratic(self, X) -> np.ndarray:
        """Row-wise ||x||^2_{Sigma_D^-1} = x^T Sigma_D^{-1} x for X (m, d) (dense or sparse) or x (d,);
        returns (m,) or a float. Needs ridge > 0 or a non-singular Sigma_D."""
        one = np.ndim(X) == 1 and not sp.issparse(X)
        Xd = np.atleast_2d(X.toarray() if sp.issparse(X) else np.asarray(X, float))
        Y = self._solve(Xd.T)                    # (d, m)
        q = np.einsum("md,dm->m", Xd, Y)
        return float(q[0]) if one else q


def fit_token_mle(data: PreferenceData, features: FeatureMap, ridge: float = 1e-3, norm_bound: float | None = None,
                  max_iter: int = 5000, tol: float = 1e-9, x0: np.ndarray | None = None, solver: str = "lbfgs",
                  mdp: TokenMDP | None = None) -> TokenMLEFit:
    """Token-level Bradley-Terry MLE (logistic regression on Delta = psi(y_w) - psi(y_l)).

    ridge: lambda >= 0 (default 1e-3; SUM convention, module doc); norm_bound: B > 0 or None (ball
    ||theta|| <= B); max_iter / tol: L-BFGS-B iterations and gradient tolerance on the MEAN loss
    (default 1e-9); x0: start (default 0). ridge = 0 is allowed but the MLE may not exist (separable
    data): then `converged` may be False and theta is where the optimizer stopped.

    solver: "lbfgs" (on theta), or "tree" / "auto" for tabular features on a prefix tree (`mdp` required):
    the same strictly convex problem solved over one value per response (`tree_solvers.TreeTabularMLE`), then checked --
    and if needed finished -- on theta with the same criterion. "auto" uses "tree" when ridge > 0, no ball,
    `mdp` is a tree and the features are its tabular ones, else "lbfgs". With a ridge the optimum is unique, so
    both give the same theta to the tolerance; near MLE non-existence "tree" needs ~10x fewer iterations."""
    if solver not in ("lbfgs", "tree", "auto"):
        raise ValueError(f"solver must be 'lbfgs', 'tree' or 'auto', got {solver!r}")
    tree_ok = (mdp is not None and mdp.kind == "tree" and isinstance(features, FeatureMap)
               and features.kind in ("tabular", "tree_tabular") and norm_bound is None and ridge > 0
               and len(features.index) == mdp.H and features.index[0].shape[:2] == (mdp.n_states[0], mdp.A))
    if solver == "tree" and not tree_ok:
        raise ValueError("solver='tree' needs mdp= a prefix tree, its tabular features, ridge > 0 and no norm_bound")
    use_tree = solver == "tree" or (solver == "auto" and tree_ok)
    data = _check_data(data)
    if not isinstance(features, FeatureMap):
        raise ValueError("features must be a FeatureMap (from make_features)")
    ridge = _check_ridge(ridge)
    if norm_bound is not None and not (np.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound (B) must be > 0 or None, got {norm_bound!r}")
    A = features.index[0].shape[1]
    idx, counts = _collapse(data, A)
    ch, rj = data.chosen, data.rejected
    D = (trajectory_features(features, take(ch, idx)) - trajectory_features(features, take(rj, idx))).tocsr()
    D.eliminate_zeros()
    d = features.d
    theta0 = np.zeros(d) if x0 is None else np.asarray(x0, float).copy()
    nit0 = 0
    if use_tree:
        tree = TreeTabularMLE(mdp, features, data, idx, counts, ridge)
        theta0, nit0 = tree.solve(max_iter, tol / 100)
    theta, nit, conv, loss, gnorm, msg = _lbfgs(D, counts, ridge, theta0, max(max_iter - nit0, 1), tol)
    nit += nit0
    if use_tree and not conv:       # rare (float precision near the optimum): fall back to the plain path
        theta, nit2, conv, loss, gnorm, msg = _lbfgs(D, counts, ridge, np.zeros(d) if x0 is None else
                                                     np.asarray(x0, float).copy(), max_iter, tol)
        nit += nit2
    if norm_bound is not None and np.linalg.norm(theta) > norm_bound:
        # KKT: grad + mu theta = 0 with ||theta|| = B, i.e. the ridge solution at lambda + mu.
        cache = {}

        def gap(log_mu):
            t, *rest = _lbfgs(D, counts, ridge + np.exp(log_mu), cache.get("x", theta), max_iter, tol)
            cache["x"], cache["res"] = t, (t, *rest)
            return np.linalg.norm(t) - norm_bound

        lo, hi = np.log(max(ridge, 1e-8)) - 5, np.log(max(ridge, 1e-8)) + 5
        while gap(hi) > 0:
            hi += 5
        brentq(gap, lo, hi, xtol=1e-10, rtol=1e-12)
        theta, nit2, conv, _, gnorm, msg = cache["res"]
        nit += nit2
        theta = theta * min(1.0, norm_bound / max(np.linalg.norm(theta), 1e-300))
        loss = logistic_objective(theta, D, counts, ridge)[0]
    sigma = None
    if d <= DENSE_SIGMA_MAX_D:
        sigma = (D.T @ sp.diags(counts) @ D).toarray() + ridge * np.eye(d)
    return TokenMLEFit(theta=theta, features=features, ridge=ridge, design=D, counts=counts, sigma_D=sigma,
                       n_iter=nit, converged=conv, loss=loss, grad_norm=gnorm, n=data.n, norm_bound=norm_bound,
                       message=msg)


# ---------------------------------------------------------------------- sentence-level bandit
def lift_to_tree(mdp: TokenMDP) -> tuple[TokenMDP, list]:
    """The prefix tree of `mdp` with the same pi_ref (pi_ref(.|prefix) = pi_ref(.|automaton state of the
    prefix)), and state_map[h] (n_h^tree,) giving the automaton state of each tree state."""
    tree = TokenMDP.tree(mdp.A, mdp.H, n_prompts=mdp.n_prompts, eos=mdp.eos is not None, rho=mdp.rho, seed=0)
    smap = [np.arange(mdp.n_prompts)]
    for h in range(mdp.H - 1):
        m = np.zeros(tree.n_states[h + 1], np.int64)
        m[tree.next_state[h]] = mdp.next_state[h][smap[h][:, None], np.arange(mdp.A)[None, :]]
        smap.append(m)
    pi = [np.exp(mdp.log_pi_ref[h][smap[h]]) for h in range(mdp.H)]
    return tree.with_reference(pi), smap


@dataclass
class BanditFit(FitInfo):
    """Sentence-level (one-hot arm) Bradley-Terry MLE.

    arm_codes: (K_obs,) sorted codes (`response_codes`) of the arms seen in the data; values: (K_obs,)
    fitted rewards R_hat(y); arm_prompt (K_obs,), arm_actions (K_obs, H), arm_length (K_obs,) one
    representative of each arm; unseen arms have R_hat = 0 (the ridge prior). ridge, n_iter, converged,
    loss, grad_norm as in TokenMLEFit; A, H of the MDP; num_arms = P * K arms in total."""

    arm_codes: np.ndarray
    values: np.ndarray
    arm_prompt: np.ndarray
    arm_actions: np.ndarray
    arm_length: np.ndarray
    A: int
    H: int
    num_arms: int

    def returns(self, traj) -> np.ndarray:
        """(n,) R_hat(y) for Trajectories or an Enumeration (0 for arms never seen)."""
        codes = response_codes(traj.prompt, traj.actions, self.A)
        pos = np.clip(np.searchsorted(self.arm_codes, codes), 0, len(self.arm_codes) - 1)
        hit = self.arm_codes[pos] == codes
        return np.where(hit, self.values[pos], 0.0)

    def token_reward(self, tree: TokenMDP) -> Layered:
        """The fitted sentence reward as a 'terminal' token reward on a TREE MDP: r(s, a) = R_hat(y) at the
        last token (or EOS) of each response y, 0 elsewhere."""
        if tree.kind != "tree":
            raise ValueError("BanditFit.token_reward needs a tree MDP (on an automaton a terminal (state, token) "
                             "does not identify the response); use planning_problem(mdp) to lift it to its tree")
        if (tree.A, tree.H) != (self.A, self.H):
            raise ValueError(f"tree has A={tree.A}, H={tree.H} but the fit was made with A={self.A}, H={self.H}")
        out = [np.zeros((n, tree.A)) for n in tree.n_states]
        s = self.arm_prompt.copy()
        last = self.arm_length - 1
        for h in range(tree.H):
            end = last == h
            out[h][s[end], self.arm_actions[end, h]] = self.values[end]
            if h < tree.H - 1:
                s = tree.next_state[h][s, self.arm_actions[:, h]]
        return tree.check_reward(out)

    def planning_problem(self, mdp: TokenMDP) -> tuple[TokenMDP, Layered]:
        """(tree, token reward) on which to plan with the fitted sentence reward: `mdp` itself if it is a
        tree, else its prefix tree with the same pi_ref (`lift_to_tree`)."""
        tree = mdp if mdp.kind == "tree" else lift_to_tree(mdp)[0]
        return tree, self.token_reward(tree)


def fit_bandit_mle(data: PreferenceData, mdp: TokenMDP, ridge: float = 1e-3, max_iter: int = 20000,
                   tol: float = 1e-9) -> BanditFit:
    """One-hot sentence-level Bradley-Terry MLE: arms = complete responses of each prompt, design rows
    e_{y_w} - e_{y_l} (sparse), objective as `fit_token_mle` (ridge = lambda, SUM convention; pairs
    with y_w = y_l carry no information and drop out)."""
    data = _check_data(data)
    ridge = _check_ridge(ridge)
    if data.first.actions.shape[1] != mdp.H:
        raise ValueError(f"data has H={data.first.actions.shape[1]} but mdp.H={mdp.H}")
    A = mdp.A
    idx, counts = _collapse(data, A)
    ch, rj = data.chosen, data.rejected
    cw = response_codes(ch.prompt[idx], ch.actions[idx], A)
    cl = response_codes(rj.prompt[idx], rj.actions[idx], A)
    arms, first, inv = np.unique(np.concatenate([cw, cl]), return_index=True, return_inverse=True)
    m = len(idx)
    iw, il = inv[:m], inv[m:]
    keep = iw != il
    rows = np.flatnonzero(keep)
    k = len(rows)
    D = sp.csr_matrix((np.concatenate([np.ones(k), -np.ones(k)]),
                       (np.concatenate([np.arange(k), np.arange(k)]), np.concatenate([iw[rows], il[rows]]))),
                      shape=(k, len(arms)))
    w = counts[rows]
    if k == 0:
        values, nit, conv, loss, gnorm = np.zeros(len(arms)), 0, True, 0.0, 0.0
    else:
        values, nit, conv, loss, gnorm, _ = _lbfgs(D, w, ridge, np.zeros(len(arms)), max_iter, tol)
    both_p = np.concatenate([ch.prompt[idx], rj.prompt[idx]])[first]
    both_a = np.concatenate([ch.actions[idx], rj.actions[idx]])[first]
    both_l = np.concatenate([ch.mask[idx].sum(1), rj.mask[idx].sum(1)])[first]
    return BanditFit(arm_codes=arms, values=values, arm_prompt=both_p, arm_actions=both_a, arm_length=both_l,
                     ridge=ridge, n_iter=nit, converged=conv, loss=loss, grad_norm=gnorm, n=data.n, A=A, H=mdp.H,
                     num_arms=mdp.n_prompts * mdp.num_responses)


def bandit_mle_exists(data: PreferenceData, mdp: TokenMDP, require_all_arms: bool = False) -> bool:
    """Whether the unregularized sentence-level BT MLE exists (finite, unique up to one constant per
    prompt): for each prompt, the directed comparison graph winner -> loser over the arms seen must be
    strongly connected (Zermelo 1929 / Ford 1957); otherwise a group of arms that never loses to the
    rest can be pushed to +infinity. With require_all_arms, every one of the K responses of every prompt
    must also have been seen (needed to identify all K - 1 centred returns, e.g. for S7)."""
    data = _check_data(data)
    ch, rj = data.chosen, data.rejected
    cw, cl = response_codes(ch.prompt, ch.actions, mdp.A), response_codes(rj.prompt, rj.actions, mdp.A)
    arms, inv = np.unique(np.concatenate([cw, cl]), return_inverse=True)
    n = len(arms)
    if require_all_arms and n < mdp.n_prompts * mdp.num_responses:
        return False
    g = sp.csr_matrix((np.ones(len(cw)), (inv[:len(cw)], inv[len(cw):])), shape=(n, n))
    n_comp, labels = connected_components(g, directed=True, connection="strong")
    prompt_of_arm = arms // np.int64(mdp.A) ** mdp.H
    # one strong component per prompt that occurs
    return n_comp == len(np.unique(prompt_of_arm)) and all(
        len(np.unique(labels[prompt_of_arm == p])) == 1 for p in np.unique(prompt_of_arm))


# ---------------------------------------------------------------------- tabular DPO
@dataclass
class DPOFit(FitInfo):
    """Tabular DPO policy. log_policy: layered (n_h, A) log pi_hat; beta: DPO temperature; ridge:
    lambda on ||z - log pi_ref||^2 of the free logits (SUM convention); n_iter, converged (max |grad|
    of the mean loss <= tol), loss (sum of DPO losses + penalty), grad_norm; mdp: the MDP it lives on."""

    log_policy: Layered
    beta: float
    mdp: TokenMDP = field(repr=False)
    message: str = ""

    @property
    def policy(self) -> Layered:
        return [np.exp(lp) for lp in self.log_policy]

    def implicit_reward(self) -> Layered:
        """beta * log(pi_hat / pi_ref), layered (the DPO implicit token reward)."""
        return implicit_token_reward(self.mdp, self.policy, self.beta)

    def returns(self, traj) -> np.ndarray:
        """(n,) sum_h beta log(pi_hat/pi_ref)(a_h|s_h) = R_hat(y) - V_hat(x) for Trajectories/Enumeration."""
        r = self.implicit_reward()
        g = gather(r, traj.states, traj.actions)
        mask = getattr(traj, "mask", None)
        return (g if mask is None else np.where(mask, g, 0.0)).sum(axis=1)


def fit_tabular_dpo(data: PreferenceData, mdp: TokenMDP, beta: float, ridge: float = 0.0, max_iter: int = 5000,
                    tol: float = 1e-9, init: Layered | None = None, solver: str = "logits") -> DPOFit:
    """Tabular DPO: minimize sum_i dpo_loss(pi_z; y_w^i, y_l^i) + (lambda/2) ||z - log pi_ref||^2 over
    per-state logits z (pi_z = softmax(z) per state), with `rto_sim.core.dpo_loss` in torch float64 and
    scipy L-BFGS-B. Convergence: stops when max |grad| of the MEAN loss <= tol (default 1e-9) or after
    max_iter iterations (default 5000); see the module doc on why this matters. init: starting policy
    (default pi_ref). Absorbing rows and tokens with pi_ref = 0 are not parameters.

    solver: "logits" (L-BFGS-B on the per-state logits) or "tree" / "auto" (on a prefix tree: the same
    objective minimized over one value per complete response, `tree_solvers.TreeDPO`, then checked -- and if needed
    finished -- on the logits with the same criterion; "auto" uses "tree" when mdp.kind == "tree", else
    "logits"). Both stop on the same first-order condition of the same objective; near MLE non-existence the
    logit parametrization is badly conditioned (the depth couples every prefix) and "tree" needs 3-10x fewer
    iterations. The ridge objective is not convex: where it has several local minima (small N, near MLE
    non-existence) the two solvers can stop in different ones (docs/sim_preference_learning.md, "DPO local
    minima"). n_iter counts the iterations of every stage."""
    if solver not in ("logits", "tree", "auto"):
        raise ValueError(f"solver must be 'logits', 'tree' or 'auto', got {solver!r}")
    if solver == "auto":
        solver = "tree" if mdp.kind == "tree" else "logits"
    if solver == "tree" and mdp.kind != "tree":
        raise ValueError(f"solver='tree' needs a prefix-tree MDP (mdp.kind == 'tree'), got kind {mdp.kind!r}")
    data = _check_data(data)
    beta = check_beta(beta)
    ridge = _check_ridge(ridge)
    if data.first.actions.shape[1] != mdp.H:
        raise ValueError(f"data has H={data.first.actions.shape[1]} but mdp.H={mdp.H}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    H, A = mdp.H, mdp.A
    offs = np.concatenate([[0], np.cumsum(mdp.n_states)]).astype(np.int64)
    logref = np.concatenate(mdp.log_pi_ref)                        # (S, A)
    absorbing = np.concatenate(mdp.absorbing)
    free = np.isfinite(logref) & ~absorbing[:, None]
    idx, counts = _collapse(data, A)
    ch, rj = data.chosen, data.rejected

    def flat(t):
        s = t.states[idx] + offs[:H][None, :]
        return s * A + t.actions[idx], t.mask[idx]

    fc, mc = flat(ch)
    fr, mr = flat(rj)
    lr_flat = logref.ravel()
    ref_c = np.where(mc, lr_flat[fc], 0.0).sum(1)
    ref_r = np.where(mr, lr_flat[fr], 0.0).sum(1)
    if not (np.isfinite(ref_c).all() and np.isfinite(ref_r).all()):
        raise ValueError("data contain tokens with pi_ref = 0: DPO's log-ratio is undefined; sample the data "
                         "from a behaviour policy absolutely continuous w.r.t. pi_ref")
    start = logref if init is None else np.concatenate([np.log(np.maximum(p, 1e-300))
                                                          for p in mdp.check_policy(init, "init")])
    z0 = start[free].copy()
    zref = logref[free]
    S = len(logref)
    n_u = len(idx)

    def counts_matrix(f, m):
        """(n_u, S*A) sparse: row i counts the (state, token) pairs of response i (its sequence log-prob
        under any policy is this row times the flat log-policy)."""
        rows = np.repeat(np.arange(n_u), H)
        return sp.csr_matrix((m.ravel().astype(float), (rows, f.ravel())), shape=(n_u, S * A))

    Cc, Cr = counts_matrix(fc, mc), counts_matrix(fr, mr)
    t_ref_c, t_ref_r = torch.tensor(ref_c), torch.tensor(ref_r)
    w = torch.tensor(counts)
    scale = 1.0 / float(counts.sum())

    def logpol(x):
        z = np.where(np.isfinite(logref), logref, -np.inf)
        z[free] = x
        return log_softmax(z, axis=1)

    def fun(x):
        # sequence log-probs are linear in the flat log-policy (sparse counts); the DPO loss itself and
        # its gradient w.r.t. the sequence log-probs come from rto_sim.core.dpo_loss (torch autograd),
        # the chain rule through the per-state log-softmax is done here.
        lp = logpol(x)
        flat_lp = np.where(np.isfinite(lp), lp, 0.0).ravel()
        pc = torch.tensor(Cc @ flat_lp, requires_grad=True)
        pr = torch.tensor(Cr @ flat_lp, requires_grad=True)
        losses, _, _ = dpo_loss(pc, pr, t_ref_c, t_ref_r, beta=beta)
        f = (w * losses).sum()
        gc, gr = torch.autograd.grad(f, (pc, pr))
        g_lp = (Cc.T @ gc.numpy() + Cr.T @ gr.numpy()).reshape(S, A)
        g_z = g_lp - np.exp(lp) * g_lp.sum(axis=1, keepdims=True)
        dx = x - zref
        val = float(f.detach()) + 0.5 * ridge * float(dx @ dx)
        return val * scale, (g_z[free] + ridge * dx) * scale

    # one intra-op thread: these tensors are tiny, and thread hand-offs on a shared machine cost ~100x
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nit0 = 0
        if solver == "tree":
            tree = TreeDPO(mdp, data, idx, counts, beta, ridge)
            q, nit0 = tree.solve(None if init is None else tree.leaf_values(start), max_iter, tol / 10)
            z0 = tree.logits(q)[free]
            f0, g0 = fun(z0)
        if solver == "tree" and float(np.abs(g0).max(initial=0.0)) <= tol:
            res = Result(x=z0, fun=f0, nit=0, success=True, message="tree solver: converged on the logits")
            g = g0
        else:
            res = minimize(fun, z0, jac=True, method="L-BFGS-B",
                           options={"maxiter": max(int(max_iter) - nit0, 1), "gtol": tol, "ftol": tol * 1e-6,
                                    "maxcor": 30})
            g = fun(res.x)[1]
            if solver == "tree" and not (res.success or float(np.abs(g).max(initial=0.0)) <= tol):
                # rare: the finish on the logits did not converge; fall back to the logit path from the start
                nit0 += int(res.nit)
                res = minimize(fun, start[free].copy(), jac=True, method="L-BFGS-B",
                               options={"maxiter": int(max_iter), "gtol": tol, "ftol": tol * 1e-6, "maxcor": 30})
                g = fun(res.x)[1]
    finally:
        torch.set_num_threads(n_threads)
    lp = logpol(res.x)
    gnorm = float(np.abs(g).max()) if g.size else 0.0
    log_policy = [lp[offs[h]:offs[h + 1]].copy() for h in range(H)]
    for h in range(H):                       # absorbing rows: delta_EOS exactly
        if mdp.absorbing[h].any():
            log_policy[h][mdp.absorbing[h]] = mdp.log_pi_ref[h][mdp.absorbing[h]]
    return DPOFit(log_policy=log_policy, beta=beta, ridge=ridge, n_iter=nit0 + int(res.nit),
                  converged=bool(res.success or gnorm <= tol), loss=float(res.fun) / scale, grad_norm=gnorm,
                  n=data.n, mdp=mdp, message=str(res.message))
