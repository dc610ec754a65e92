"""Sequence-coordinate solvers for the tabular fits on a prefix tree (`solver="tree"` of `fit_tabular_dpo` and
`fit_token_mle`, rto_sim/learners.py).

On a tree every tabular policy or reward is fixed by one value per complete response (leaf), so both
objectives become the sentence bandit's well-conditioned likelihood plus a tree-coupled ridge; the class
docstrings derive each objective and its gradient. The learners check the answer against the logit (or theta)
objective and polish it there if needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_softmax

from .core import dpo_loss
from .features import FeatureMap
from .mdp import TokenMDP
from .preferences import PreferenceData


def leaf_ids(leaf_masks: list, offset: np.ndarray) -> list:
    """Per layer h an (n_h, A) int64 array: the leaf number (offset[h] + rank among the layer's leaves) of every
    (state, token) in `leaf_masks[h]`, -1 elsewhere."""
    out = []
    for h, mask in enumerate(leaf_masks):
        ids = np.full(mask.shape, -1, np.int64)
        ids[mask] = offset[h] + np.arange(int(mask.sum()))
        out.append(ids)
    return out


def leaf_of(leaf_id: list, t, idx: np.ndarray, what: str) -> np.ndarray:
    """Leaf number of each response t[idx] (its token at the last masked position); a response that ends
    `what` (no leaf) is an error."""
    end = t.mask[idx].sum(1) - 1
    rows = np.arange(len(idx))
    s, a = t.states[idx][rows, end], t.actions[idx][rows, end]
    out = np.full(len(idx), -1, np.int64)
    for h in np.unique(end):
        m = end == h
        out[m] = leaf_id[h][s[m], a[m]]
    if (out < 0).any():
        raise ValueError(f"a response ends {what}")
    return out


@dataclass
class Result:
    x: np.ndarray
    fun: float
    nit: int
    success: bool
    message: str


class TreeDPO:
    """Tabular DPO on a prefix tree in sequence coordinates (`fit_tabular_dpo(solver="tree")`).

    On a tree every policy is pi(y) ∝ pi_ref(y) exp(q(y)) for one value q(y) per complete response (leaf:
    the last token, or the EOS token, of a live prefix), unique up to a constant per prompt. With the subtree
    values W(n) = log sum_{y below n} pi_ref(y | n) exp(q(y)) (W(leaf) = q) the policy is
    pi(a|s) = pi_ref(a|s) exp(W(s a) - W(s)), so the logits that the ridge of `fit_tabular_dpo` penalizes are,
    after the per-state shift that the ridge optimum picks, u(s, a) = W(s a) - mean_b W(s b) (free tokens b),
    and the DPO margin of a pair is beta (q(y_w) - q(y_l)). The objective

        sum_i w_i dpo_loss(beta (q(y_w^i) - q(y_l^i))) + (lambda / 2) sum_s sum_a (W(s a) - mean_b W(s b))^2

    is therefore the logit objective in other coordinates: the loss term is the sentence bandit's (well
    conditioned), and only the ridge couples the leaves, through the W recursion. Gradient: the ridge's
    d/dW(s a) flows to the leaves below s a with weights pi(.|.) (d W(s) / d W(s a) = pi(a|s))."""

    def __init__(self, mdp: TokenMDP, data: PreferenceData, idx: np.ndarray, counts: np.ndarray, beta: float,
                 ridge: float):
        H, A = mdp.H, mdp.A
        self.mdp, self.H, self.A, self.beta, self.ridge = mdp, H, A, beta, ridge
        self.n_states = mdp.n_states
        self.logref = [np.asarray(lr, float) for lr in mdp.log_pi_ref]
        live = [~a for a in mdp.absorbing]
        self.free = [np.isfinite(lr) & lv[:, None] for lr, lv in zip(self.logref, live)]
        nfree = [f.sum(1) for f in self.free]
        self.lr_safe, self.cmask, self.inv_n = [], [], []
        self.leaf_flat, self.inner_flat, self.inner_child, self.parent = [], [], [], [None]
        sizes, leaf_masks = [], []
        for h in range(H):
            f = self.free[h]
            lrs = np.where(f, self.logref[h], -np.inf)
            lrs[nfree[h] == 0, 0] = 0.0                   # rows without parameters: finite, unused
            self.lr_safe.append(lrs)
            self.cmask.append((f & (nfree[h] > 1)[:, None]).astype(float))
            self.inv_n.append((1.0 / np.maximum(nfree[h], 1))[:, None])
            end = np.ones_like(f) if h == H - 1 else mdp.absorbing[h + 1][mdp.next_state[h]]
            leaf = f & end
            leaf_masks.append(leaf)
            sizes.append(int(leaf.sum()))
            self.leaf_flat.append(np.flatnonzero(leaf.ravel()))
            inner = np.flatnonzero((f & ~end).ravel())
            self.inner_flat.append(inner)
            self.inner_child.append(mdp.next_state[h].ravel()[inner] if h < H - 1 else inner[:0])
            if h > 0:                                     # parent edge of each live state; -1 -> a zero slot
                par = np.full(mdp.n_states[h], -1, np.int64)
                par[self.inner_child[h - 1]] = self.inner_flat[h - 1]
                self.parent.append(par)
        self.offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.K = int(self.offset[-1])
        self.leaf_id = leaf_ids(leaf_masks, self.offset)
        ch, rj = data.chosen, data.rejected
        what = "on a token with pi_ref = 0 or in an absorbing state"
        lw, ll = leaf_of(self.leaf_id, ch, idx, what), leaf_of(self.leaf_id, rj, idx, what)
        keep = lw != ll                                    # identical responses carry no information
        self.lw, self.ll, self.w = lw[keep], ll[keep], torch.tensor(counts[keep])
        self.scale = 1.0 / float(counts.sum())
        self.zero = torch.zeros(int(keep.sum()), dtype=torch.float64)

    def _values(self, q: np.ndarray) -> tuple[list, list]:
        """Per layer the edge values E (n_h, A) (0 on tokens that are not free) and the implied policy pi
        (n_h, A), bottom-up through W(s) = log sum_a pi_ref(a|s) exp(E(s, a))."""
        H = self.H
        E, pol = [None] * H, [None] * H
        W = None
        for h in range(H - 1, -1, -1):
            n = self.n_states[h]
            e = np.zeros(n * self.A)
            e[self.leaf_flat[h]] = q[self.offset[h]:self.offset[h + 1]]
            if h < H - 1:
                e[self.inner_flat[h]] = W[self.inner_child[h]]
            e = e.reshape(n, self.A)
            a = self.lr_safe[h] + e
            mx = a.max(axis=1, keepdims=True)
            ex = np.exp(a - mx)
            tot = ex.sum(axis=1, keepdims=True)
            W = (mx + np.log(tot))[:, 0]
            E[h], pol[h] = e, ex / tot
        return E, pol

    def _centred(self, h: int, e: np.ndarray) -> np.ndarray:
        """u = E - mean over the free tokens, on live states with >= 2 free tokens (0 elsewhere)."""
        return (e - e.sum(axis=1, keepdims=True) * self.inv_n[h]) * self.cmask[h]

    def objective(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        """(mean objective, gradient) at the leaf values q."""
        E, pol = self._values(q)
        margin = torch.tensor(q[self.lw] - q[self.ll], requires_grad=True)
        losses, _, _ = dpo_loss(margin, self.zero, self.zero, self.zero, beta=self.beta)
        f = (self.w * losses).sum()
        (gm,) = torch.autograd.grad(f, (margin,))
        gm = gm.numpy()
        grad = np.bincount(self.lw, gm, minlength=self.K) - np.bincount(self.ll, gm, minlength=self.K)
        val = float(f.detach())
        above = None
        for h in range(self.H):
            u = self._centred(h, E[h])
            val += 0.5 * self.ridge * float((u * u).sum())
            g = self.ridge * u
            if h > 0:
                g += np.append(above.ravel(), 0.0)[self.parent[h]][:, None] * pol[h]
            grad[self.offset[h]:self.offset[h + 1]] += g.ravel()[self.leaf_flat[h]]
            above = g
        return val * self.scale, grad * self.scale

    def solve(self, q0: np.ndarray | None, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
        x0 = np.zeros(self.K) if q0 is None else q0
        res = minimize(self.objective, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": int(max_iter), "gtol": tol, "ftol": tol * 1e-6, "maxcor": 30})
        return res.x, int(res.nit)

    def logits(self, q: np.ndarray) -> np.ndarray:
        """(S, A) flat logits log pi_ref + u (u centred per state; log pi_ref where not free)."""
        E, _ = self._values(q)
        return np.concatenate([np.where(self.free[h], self.logref[h] + self._centred(h, E[h]), self.logref[h])
                               for h in range(self.H)])

    def leaf_values(self, flat_logits: np.ndarray) -> np.ndarray:
        """q of the policy softmax(flat_logits): the sequence log-ratio log pi(y)/pi_ref(y) at every leaf."""
        offs = np.concatenate([[0], np.cumsum(self.mdp.n_states)]).astype(np.int64)
        q = np.zeros(self.K)
        acc = np.zeros(self.mdp.n_states[0])
        for h in range(self.H):
            lp = log_softmax(flat_logits[offs[h]:offs[h + 1]], axis=1)
            ratio = np.where(self.free[h], lp - self.logref[h], 0.0) + acc[:, None]
            q[self.offset[h]:self.offset[h + 1]] = ratio.ravel()[self.leaf_flat[h]]
            if h < self.H - 1:
                acc = np.append(ratio.ravel(), 0.0)[self.parent[h + 1]]
        return q


class TreeTabularMLE:
    """Token MLE with tabular features on a prefix tree in sequence coordinates (`fit_token_mle(solver="tree")`).

    With one parameter theta_e per (prefix, token) edge e, R(y) is the sum of theta along y's path, so the
    likelihood sees theta only through the response values q(y) = R(y), and for given q the ridge picks the
    minimum-norm theta: Q(q) = min {||theta||^2 : path sums = q}. On a tree that minimum is a recursion: bottom
    up, an edge into a leaf has weight a = 1 and value m = q(y); an edge into a state c has a = alpha_c / (1 +
    alpha_c) and m = m_c, where alpha_s = sum_e a_e and m_s = sum_e a_e m_e / alpha_s over the edges of s; top
    down from c = 0 at the prompt, theta_e = a_e (m_e - c) and the child's c is c + theta_e. Q = ||theta||^2 and
    dQ/dq(y) = 2 theta(leaf edge of y) (the Lagrange multiplier of y's constraint). The objective

        sum_i w_i log(1 + exp(-(q(y_w^i) - q(y_l^i)))) + (lambda / 2) Q(q)

    is the sentence bandit's likelihood with a tree-coupled quadratic ridge: strictly convex, the same optimum
    as the problem on theta, and well conditioned where the theta coordinates are not."""

    def __init__(self, mdp: TokenMDP, features: FeatureMap, data: PreferenceData, idx: np.ndarray,
                 counts: np.ndarray, ridge: float):
        H, A = mdp.H, mdp.A
        self.mdp, self.H, self.A, self.ridge, self.d = mdp, H, A, ridge, features.d
        self.n_states = mdp.n_states
        live = [~a for a in mdp.absorbing]
        self.leaf, self.inner_child, self.fid = [], [], []
        for h in range(H):
            end = np.ones((self.n_states[h], A), bool) if h == H - 1 else mdp.absorbing[h + 1][mdp.next_state[h]]
            self.leaf.append(live[h][:, None] & end)
            self.inner_child.append(np.where(live[h][:, None] & ~end, mdp.next_state[h] if h < H - 1 else -1, -1))
            self.fid.append(np.where(features.value[h][:, :, 0] > 0, features.index[h][:, :, 0], -1))
            if not np.array_equal(self.fid[h] >= 0, live[h][:, None] & np.ones((1, A), bool)):
                raise ValueError("solver='tree' needs one tabular feature per (live state, token)")
        sizes = [int(lf.sum()) for lf in self.leaf]
        offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.leaf_id = leaf_ids(self.leaf, offset)
        ch, rj = data.chosen, data.rejected
        lw, ll = leaf_of(self.leaf_id, ch, idx, "in an absorbing state"), leaf_of(self.leaf_id, rj, idx,
                                                                                "in an absorbing state")
        keep = lw != ll                                  # identical responses carry no information
        # only responses in the data are constrained: the minimum-norm theta is 0 on every edge whose subtree
        # holds none, so unseen leaves are not variables (their edges get weight a = 0)
        seen, inv = np.unique(np.concatenate([lw[keep], ll[keep]]), return_inverse=True)
        n = int(keep.sum())
        self.lw, self.ll, self.w = inv[:n], inv[n:], counts[keep]
        self.K = len(seen)
        self.scale = 1.0 / max(float(counts.sum()), 1.0)
        self.seen = []                                   # per layer: flat positions of seen leaves, in q order
        pos = np.full(int(offset[-1]), -1, np.int64)
        pos[seen] = np.arange(self.K)
        for h in range(H):
            ids = self.leaf_id[h]
            flat = np.flatnonzero((ids >= 0).ravel() & (pos[np.maximum(ids, 0)].ravel() >= 0))
            order = pos[ids.ravel()[flat]]
            self.seen.append((flat, order))
        # structural weights: alpha_s and the edge weights a_e (bottom up; independent of q)
        self.a = [None] * H
        alpha_next = None
        for h in range(H - 1, -1, -1):
            a = np.zeros(self.leaf[h].size)
            a[self.seen[h][0]] = 1.0
            a = a.reshape(self.leaf[h].shape)
            inner = self.inner_child[h] >= 0
            if h < H - 1:
                al = alpha_next[np.maximum(self.inner_child[h], 0)]
                a = np.where(inner, al / (1.0 + al), a)
            self.a[h] = a
            alpha_next = a.sum(axis=1)
        self.alpha = [a.sum(axis=1) for a in self.a]

    def edge_theta(self, q: np.ndarray) -> list:
        """The minimum-norm theta (per layer, (n_h, A); 0 on absorbing rows) whose path sums are q."""
        H = self.H
        m_edge = [None] * H
        m_next = None
        for h in range(H - 1, -1, -1):
            m = np.zeros(self.leaf[h].size)
            flat, order = self.seen[h]
            m[flat] = q[order]
            m = m.reshape(self.leaf[h].shape)
            inner = self.inner_child[h] >= 0
            if h < H - 1:
                m = np.where(inner, m_next[np.maximum(self.inner_child[h], 0)], m)
            m_edge[h] = m
            m_next = (self.a[h] * m).sum(axis=1) / np.where(self.alpha[h] > 0, self.alpha[h], 1.0)
        theta = [None] * H
        c = np.zeros(self.n_states[0])
        for h in range(H):
            th = self.a[h] * (m_edge[h] - c[:, None])
            theta[h] = th
            if h < H - 1:
                c_next = np.zeros(self.n_states[h + 1])
                inner = self.inner_child[h] >= 0
                c_next[self.inner_child[h][inner]] = (c[:, None] + th)[inner]
                c = c_next
        return theta

    def objective(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        z = q[self.lw] - q[self.ll]
        f = float(self.w @ np.logaddexp(0.0, -z))
        g = -self.w * expit(-z)
        grad = np.bincount(self.lw, g, minlength=self.K) - np.bincount(self.ll, g, minlength=self.K)
        theta = self.edge_theta(q)
        f += 0.5 * self.ridge * sum(float((t * t).sum()) for t in theta)
        for h in range(self.H):
            flat, order = self.seen[h]
            grad[order] += self.ridge * theta[h].ravel()[flat]
        return f * self.scale, grad * self.scale

    def to_features(self, theta: list) -> np.ndarray:
        out = np.zeros(self.d)
        for h in range(self.H):
            ok = self.fid[h] >= 0
            out[self.fid[h][ok]] = theta[h][ok]
        return out

    def solve(self, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
        """(theta in feature space, iterations) of the sequence-coordinate problem."""
        res = minimize(self.objective, np.zeros(self.K), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(max_iter), "gtol": tol, "ftol": tol * 1e-6, "maxcor": 30})
        return self.to_features(self.edge_theta(res.x)), int(res.nit)

