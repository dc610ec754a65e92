"""The instances of E1 and E1b: everything fixed per (reward class, A, H, ...) -- the MDP, features, theta*,
r*, pi*, the enumeration of all responses, mu weights and the exact metrics (centred-return MSE, Fisher
quadratic form, plug-in gaps) -- built once per process and cached (`instance_of(cell)`).

Environment per reward class (`MDP_OF_CLASS`): the automaton on which the class is naturally tabular, so
that tabular DPO on its states is the "aggregated states" case of docs/theory.md section 4 (on a tree, tabular
DPO has one free logit per prefix: sentence-level complexity, like the bandit).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.special import expit, logsumexp

from ..exact import enumerate_responses, evaluate, soft_bellman, soft_value, sub_optimality
from ..features import draw_theta, make_features
from ..mdp import TokenMDP
from ..preferences import trajectory_features

REWARD_CLASSES = ("unigram", "positional", "bigram", "random", "tree_tabular")
MDP_OF_CLASS = {"unigram": "position", "positional": "position", "bigram": "last_token", "random": "tree",
                "tree_tabular": "tree"}


class Instance:
    """Everything fixed per (class, H): MDP, features, theta*, r*, pi*, enumeration, mu weights and the
    pair-weight matrix W[y, y'] = mu(y) mu(y') sigmoid'(R*(y) - R*(y')) (same prompt only)."""

    def __init__(self, reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d,
                 return_var, beta):
        seed = int(instance_seed) * 1009 + 31 * H + REWARD_CLASSES.index(reward_class)
        kind = MDP_OF_CLASS[reward_class]
        build = {"position": TokenMDP.position, "last_token": TokenMDP.last_token_automaton,
                 "tree": TokenMDP.tree}[kind]
        mdp = build(A, H, n_prompts=n_prompts, seed=seed, ref_temperature=ref_temperature)
        if reference == "uniform":
            mdp = mdp.with_reference([np.full((n, A), 1.0 / A) for n in mdp.n_states])
        self.mdp = mdp
        self.features = make_features(mdp, reward_class, d=random_d if reward_class == "random" else None,
                                      seed=seed + 1)
        self.theta = draw_theta(mdp, self.features, return_var=return_var, seed=seed + 2)
        self.reward = self.features.token_reward(self.theta)
        self.beta = beta
        self.star = soft_bellman(mdp, self.reward, beta)
        self.mdp_star = mdp.with_reference(self.star.policy)
        self.zero = [np.zeros((n, A)) for n in mdp.n_states]
        self.enum = enumerate_responses(mdp)
        e = self.enum
        self.log_mu = e.log_prob(mdp.log_pi_ref)
        self.w = np.exp(self.log_mu) * mdp.rho[e.prompt]             # joint weight rho(x) mu(y|x)
        self.R = e.returns(self.reward)
        self.K = mdp.num_responses
        self.P = mdp.n_prompts
        self._W = None
        # d_eff by SVD; for tabular features on a TREE above max_dim the SVD is skipped and the value
        # P (K - 1) of the tree-tabular identity (docs/theory.md section 3) is used (the SVD confirms it
        # wherever it runs, see tests/rto_sim/experiments/test_e1.py).
        self.d_eff_bandit = int(self.P * (self.K - 1))
        self.d_eff = weighted_rank(trajectory_features(self.features, e), self.w, e.prompt, self.P)
        if self.d_eff < 0:
            assert reward_class == "tree_tabular"
            self.d_eff = self.d_eff_bandit
        tab = make_features(mdp, "tabular")
        self.d_eff_dpo = weighted_rank(trajectory_features(tab, e), self.w, e.prompt, self.P)
        if self.d_eff_dpo < 0:
            assert mdp.kind == "tree"
            self.d_eff_dpo = self.d_eff_bandit

    @property
    def W(self) -> np.ndarray:
        """(P, K, K) rho(x) mu(y|x) mu(y'|x) sigmoid'(R*(y) - R*(y')), built on first use."""
        if self._W is None:
            R = self.R.reshape(self.P, self.K)
            mu = np.exp(self.log_mu).reshape(self.P, self.K)
            p = expit(R[:, :, None] - R[:, None, :])
            self._W = self.mdp.rho[:, None, None] * mu[:, :, None] * mu[:, None, :] * p * (1 - p)
        return self._W

    @functools.cached_property
    def asymptotic_trace(self) -> float:
        """tr(Sigma_psi I^+): the exact first-order asymptotic centred-return MSE of the (unregularized)
        token MLE is this / N, with Sigma_psi = E_x Cov_mu(psi | x) and I the per-pair Fisher at theta*
        (no constant-slope approximation). NaN for d > 64 (not needed there)."""
        d = self.features.d
        if d > 64:
            return float("nan")
        P, K = self.P, self.K
        Psi = trajectory_features(self.features, self.enum).toarray().reshape(P, K, d)
        mu = np.exp(self.log_mu).reshape(P, K)
        W = self.W
        fisher = 2 * (np.einsum("pk,pkd,pke->de", W.sum(axis=2), Psi, Psi) - np.einsum("pkd,pkl,ple->de", Psi, W, Psi))
        C = Psi - np.einsum("pk,pkd->pd", mu, Psi)[:, None, :]
        sigma = np.einsum("p,pk,pkd,pke->de", self.mdp.rho, mu, C, C)
        return float(np.trace(sigma @ np.linalg.pinv(fisher, rcond=1e-10, hermitian=True)))

    def bt_slope_exact(self, scale: float = 1.0) -> float:
        """E_x E_{y, y' ~ mu} sigmoid'(scale (R*(y) - R*(y'))): the population BT slope."""
        R = scale * self.R.reshape(self.P, self.K)
        mu = np.exp(self.log_mu).reshape(self.P, self.K)
        p = expit(R[:, :, None] - R[:, None, :])
        return float(self.mdp.rho @ np.einsum("pk,pkl,pl->p", mu, p * (1 - p), mu))

    # --- metrics
    def centred(self, x: np.ndarray) -> np.ndarray:
        m = np.bincount(self.enum.prompt, weights=np.exp(self.log_mu) * x, minlength=self.P)
        return x - m[self.enum.prompt]

    def mse(self, R_hat: np.ndarray) -> float:
        return float(self.w @ self.centred(R_hat - self.R) ** 2)

    def fisher_quadratic(self, R_hat: np.ndarray) -> float:
        """e^T I e, I the per-pair Fisher at theta* in return space: sum_{y,y'} W (e_y - e_y')^2."""
        u = (R_hat - self.R).reshape(self.P, self.K)
        rowsum = self.W.sum(axis=2)
        return float(2 * (np.sum(rowsum * u**2) - np.einsum("pk,pkl,pl->", u, self.W, u)))

    def gibbs_gap(self, R_hat: np.ndarray) -> tuple[float, float]:
        """Sequence level: (J_beta(pi*) - J_beta(pi_hat), beta KL(pi_hat || pi*)) for the Gibbs plug-in
        pi_hat(y|x) ~ mu(y|x) exp(R_hat(y) / beta), by enumeration."""
        return self.sequence_gap(self.log_mu + R_hat / self.beta)

    def sequence_gap(self, log_unnorm: np.ndarray) -> tuple[float, float]:
        b = self.beta
        P, K = self.P, self.K
        lq = log_unnorm.reshape(P, K)
        lq = lq - logsumexp(lq, axis=1, keepdims=True)
        lmu = self.log_mu.reshape(P, K)
        R = self.R.reshape(P, K)
        q = np.exp(lq)
        J_hat = (q * (R - b * (lq - lmu))).sum(1)
        J_star, _ = soft_value(lmu, R, b)              # beta log Z(x): the sequence-level soft optimum
        ls = lmu + R / b - J_star[:, None] / b          # log pi*(y|x) (identity 1)
        kl = (q * (lq - ls)).sum(1)
        return float(self.mdp.rho @ (J_star - J_hat)), float(b * (self.mdp.rho @ kl))

    def engine_gap(self, policy) -> tuple[float, float]:
        """Token recursions: (sub_optimality, beta * sequence KL(pi_hat || pi*) via evaluate)."""
        gap = sub_optimality(self.mdp, policy, self.reward, self.beta)
        kl = evaluate(self.mdp_star, policy, self.zero, 0.0).kl
        return gap, self.beta * kl


def weighted_rank(Psi, w: np.ndarray, prompt: np.ndarray, P: int, rtol: float = 1e-9, max_dim: int = 800) -> int:
    """d_eff = rank of E_x Cov_mu(psi | x) (the feature-difference covariance under mu, up to a factor 2),
    from enumerated psi (N, d) and joint weights w (N,) by SVD; returns -1 when min(N, d) > max_dim
    (too costly: the caller substitutes the known value)."""
    Psi = Psi.toarray() if hasattr(Psi, "toarray") else np.asarray(Psi)
    Psi = Psi[:, np.abs(Psi).sum(0) > 0]
    if Psi.shape[1] == 0:
        return 0
    if min(Psi.shape) > max_dim:
        return -1
    wx = np.bincount(prompt, weights=w, minlength=P)
    mean = np.zeros((P, Psi.shape[1]))
    np.add.at(mean, prompt, w[:, None] * Psi)
    mean /= wx[:, None]
    C = np.sqrt(w)[:, None] * (Psi - mean[prompt])
    s = np.linalg.svd(C, compute_uv=False)
    return int(np.sum(s > rtol * max(s.max(), 1e-300) * max(C.shape)))


@functools.lru_cache(maxsize=3)
def get_instance(reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d, return_var,
                 beta) -> Instance:
    return Instance(reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d,
                    return_var, beta)


def instance_of(cell: dict) -> Instance:
    return get_instance(cell["reward_class"], cell["A"], cell["H"], cell.get("n_prompts", 1),
                        cell.get("reference", "uniform"), float(cell.get("ref_temperature", 1.0)),
                        cell.get("instance_seed", 0), cell.get("random_d", 8), float(cell.get("return_var", 0.25)),
                        float(cell.get("beta", 1.0)))
