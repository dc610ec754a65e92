"""Linear token-reward classes r(s, a) = <phi(s, a), theta> (docs/theory.md sections 1 and 3).

A feature map is stored sparsely per layer: `index[h]` (n_h, A, m) int and `value[h]` (n_h, A, m)
float, so phi(s, a) = sum_j value[h][s, a, j] * e_{index[h][s, a, j]} in R^d. The trajectory feature is
psi(y) = sum_h phi(s_h, a_h) and R(y) = <psi(y), theta>.

Classes (d for a uniform reference and no EOS):
    unigram       stationary token reward r(a)                    d = A
    positional    r(h, a)                                         d = H A
    bigram        r(last token, a) (needs last-token states)      d = (A + 1) A
    random        Gaussian features of dimension d per (s, a)     d given
    tabular       one free parameter per (state, token)           d = #(s, a); on the tree this is the
                  "tree-tabular" control: only A^H - 1 identifiable directions, like the bandit
    terminal      sentence reward: one parameter per terminal (s, a) (the last token or EOS); on the
                  tree this is the one-hot bandit arm e_y
    user          the caller's own features: `make_features(mdp, "user", phi=...)` (see `user_features`)
Absorbing states get phi = 0 (zero reward after EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .exact import Enumeration, return_moments
from .mdp import Layered, TokenMDP

FEATURE_KINDS = ("unigram", "positional", "bigram", "random", "tabular", "tree_tabular", "terminal")


@dataclass
class FeatureMap:
    """Sparse linear features; see module docstring. `kind` names the reward class."""

    kind: str
    d: int
    index: Layered      # H arrays (n_h, A, m) int64
    value: Layered      # H arrays (n_h, A, m) float

    def check_theta(self, theta) -> np.ndarray:
        try:
            theta = np.asarray(theta, dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"theta must be a vector of d={self.d} numbers ({e})") from None
        if theta.shape != (self.d,):
            raise ValueError(f"theta has shape {theta.shape} but the '{self.kind}' features have dimension "
                             f"d={self.d}: pass a vector of shape ({self.d},)")
        bad = np.flatnonzero(~np.isfinite(theta))
        if bad.size:
            raise ValueError(f"theta has NaN or infinite entries at indices {bad[:10].tolist()}: every reward "
                             "parameter must be a finite number")
        return theta

    def token_reward(self, theta) -> Layered:
        """r(s, a) = <phi(s, a), theta> as a layered (n_h, A) list."""
        theta = self.check_theta(theta)
        return [(v * theta[i]).sum(axis=-1) for i, v in zip(self.index, self.value)]

    def psi(self, enum: Enumeration) -> sp.csr_matrix:
        """(N, d) sparse trajectory features psi(y) = sum_h phi(s_h, a_h) of enumerated responses."""
        rows, cols, vals = [], [], []
        N = len(enum)
        for h in range(enum.actions.shape[1]):
            i = self.index[h][enum.states[:, h], enum.actions[:, h]]     # (N, m)
            v = self.value[h][enum.states[:, h], enum.actions[:, h]]
            rows.append(np.repeat(np.arange(N), i.shape[1]))
            cols.append(i.ravel())
            vals.append(v.ravel())
        m = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, self.d))
        m = m.tocsr()
        m.sum_duplicates()
        m.eliminate_zeros()
        return m

    def dense(self, h: int) -> np.ndarray:
        """(n_h, A, d) dense phi for layer h (small d only)."""
        out = np.zeros(self.index[h].shape[:2] + (self.d,))
        n, A, m = self.index[h].shape
        s, a = np.meshgrid(np.arange(n), np.arange(A), indexing="ij")
        for j in range(m):
            np.add.at(out, (s, a, self.index[h][:, :, j]), self.value[h][:, :, j])
        return out


def make_features(mdp: TokenMDP, kind: str, d: int | None = None, seed: int | None = 0, phi=None) -> FeatureMap:
    """Build the feature map of a reward class on `mdp` (see module docstring). kind="user" takes the
    caller's features from `phi` (an array or a callable; see `user_features`)."""
    if kind == "user":
        if phi is None:
            raise ValueError("kind='user' needs phi=: a list of H arrays (n_h, A, d), one (A, d) table, a flat "
                             "(sum_h n_h * A, d) array or a callable phi(h, s, a) -> (d,)")
        return user_features(mdp, phi)
    if phi is not None:
        raise ValueError(f"phi= is only read with kind='user', got kind={kind!r}: pass kind='user' to use your "
                         "own features, or drop phi")
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown reward class {kind!r}; choose one of {FEATURE_KINDS} or 'user' (with phi=)")
    A, H = mdp.A, mdp.H
    idx, val = [], []
    if kind == "random":
        if d is None or int(d) < 1:
            raise ValueError("d (feature dimension) must be given and >= 1 for kind='random'")
        d = int(d)
        rng = np.random.default_rng(seed)
        for h in range(H):
            idx.append(np.broadcast_to(np.arange(d), (mdp.n_states[h], A, d)).copy())
            val.append(rng.standard_normal((mdp.n_states[h], A, d)))
    elif kind in ("tabular", "tree_tabular", "terminal"):
        offset = 0
        for h in range(H):
            n = mdp.n_states[h]
            live = ~mdp.absorbing[h]
            used = np.repeat(live[:, None], A, axis=1)
            if kind == "terminal" and h < H - 1:     # only the final token or EOS carries reward
                used &= (np.arange(A) == mdp.eos)[None, :] if mdp.eos is not None else False
            ids = np.full((n, A), 0, np.int64)
            ids[used] = offset + np.arange(used.sum())
            offset += int(used.sum())
            idx.append(ids[:, :, None])
            val.append(used[:, :, None].astype(float))
        d = offset
    else:
        for h in range(H):
            n = mdp.n_states[h]
            a = np.broadcast_to(np.arange(A), (n, A))
            if kind == "unigram":
                ids, dd = a, A
            elif kind == "positional":
                ids, dd = h * A + a, H * A
            else:  # bigram
                last = mdp.last_token[h]
                if np.any(last == -2):
                    raise ValueError("kind='bigram' needs states that know their last token; this automaton "
                                     "merges prefixes with different last tokens: use TokenMDP.tree or "
                                     "TokenMDP.last_token_automaton")
                ids, dd = (last[:, None] + 1) * A + a, (A + 1) * A
            idx.append(np.ascontiguousarray(ids, dtype=np.int64)[:, :, None])
            val.append(np.repeat((~mdp.absorbing[h])[:, None], A, axis=1)[:, :, None].astype(float))
        d = dd
    for h in range(H):                      # phi = 0 after EOS
        val[h] = val[h] * (~mdp.absorbing[h])[:, None, None]
    if d != int(d) or d < 1:
        raise ValueError(f"feature class {kind!r} has no parameters on this MDP")
    return FeatureMap(kind=kind, d=int(d), index=idx, value=val)


def _user_layers(mdp: TokenMDP, phi) -> list[np.ndarray]:
    """The dense (n_h, A, d) layers of a user feature argument (see `user_features`), shapes checked."""
    A, H, n = mdp.A, mdp.H, mdp.n_states
    forms = (f"a list of H={H} arrays of shape (n_h, A, d) with n_h = {n}, one ({A}, d) table (stationary), "
             f"a flat ({sum(n) * A}, d) array (rows: layer by layer, state-major, then token) or a callable "
             "phi(h, s, a) -> (d,)")
    if callable(phi):
        layers = []
        for h in range(H):
            rows = []
            for s in range(n[h]):
                for a in range(A):
                    if mdp.absorbing[h][s]:
                        rows.append(None)           # phi = 0 after EOS: the callable is not asked
                        continue
                    v = np.asarray(phi(h, s, a))
                    if v.ndim != 1:
                        raise ValueError(f"phi(h={h}, s={s}, a={a}) returned shape {v.shape}: the callable must "
                                         "return a 1-D vector of length d")
                    rows.append(v)
            layers.append(rows)
        dims = {len(v) for rows in layers for v in rows if v is not None}
        if len(dims) != 1:
            raise ValueError(f"phi(h, s, a) returned vectors of lengths {sorted(dims)}: every call must return "
                             "the same dimension d")
        d = dims.pop()
        out = []
        for h, rows in enumerate(layers):
            z = [np.zeros(d) if v is None else v for v in rows]
            out.append(_as_float(np.stack(z), f"phi(h={h}, ...)").reshape(n[h], A, d))
        return out
    if isinstance(phi, (list, tuple)):
        if len(phi) != H:
            raise ValueError(f"phi has {len(phi)} layers but the MDP has H={H}: pass {forms}")
        out = [_as_float(x, f"phi[{h}]") for h, x in enumerate(phi)]
        for h, x in enumerate(out):
            if x.ndim != 3 or x.shape[:2] != (n[h], A):
                raise ValueError(f"phi[{h}] has shape {x.shape}, expected ({n[h]}, {A}, d): pass {forms}")
        if len({x.shape[2] for x in out}) != 1:
            raise ValueError(f"phi layers have different dimensions {[x.shape[2] for x in out]}: use one d")
        return out
    x = _as_float(phi, "phi")
    if x.ndim == 3 and H == 1 and x.shape[:2] == (n[0], A):
        return [x]
    if x.ndim == 2 and x.shape[0] == sum(n) * A:        # flat, matched to the (h, s, a) pairs
        ends = np.cumsum([0] + [k * A for k in n])
        return [x[ends[h]:ends[h + 1]].reshape(n[h], A, -1) for h in range(H)]
    if x.ndim == 2 and x.shape[0] == A:                 # stationary (A, d) table
        return [np.broadcast_to(x, (n[h], A, x.shape[1])).copy() for h in range(H)]
    raise ValueError(f"phi has shape {x.shape}, which matches no accepted form: pass {forms}")


def _as_float(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:    # ragged input
        raise ValueError(f"{name} is not a rectangular numeric array ({e}); pass a float array") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} has dtype {arr.dtype}: pass real numbers (a float array)")
    arr = arr.astype(float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has NaN or infinite entries: every feature must be a finite number")
    return arr


def user_features(mdp: TokenMDP, phi) -> FeatureMap:
    """A FeatureMap (kind 'user') from the caller's own features phi(s, a) in R^d, in one of four forms:

        list of H arrays (n_h, A, d)    per layer, row s of layer h = state s of `mdp`
        array (A, d)                    stationary: phi(s, a) = phi[a] in every state
        array (sum_h n_h * A, d)        flat, one row per state-action pair: layer by layer, state-major,
                                        token-minor (row = offset_h + s * A + a)
        callable phi(h, s, a) -> (d,)   called once per live (h, s, a)

    (For one prompt and H = 1 the (A, d) and flat forms coincide.) Checked at the boundary: shape, real
    finite values, d >= 1; absorbing (post-EOS) states get phi = 0 as for every class. Stored densely
    (index = arange(d)), so the returned map works with `token_reward`, `psi`, `draw_theta` and the learners."""
    layers = _user_layers(mdp, phi)
    d = layers[0].shape[2]
    if d < 1:
        raise ValueError("phi has feature dimension d = 0: give at least one feature per (s, a)")
    val = [x * (~mdp.absorbing[h])[:, None, None] for h, x in enumerate(layers)]
    idx = [np.broadcast_to(np.arange(d), x.shape).copy() for x in val]
    return FeatureMap(kind="user", d=int(d), index=idx, value=val)


def draw_theta(mdp: TokenMDP, features: FeatureMap, return_var: float = 0.25, policy: Layered | None = None,
               seed: int | None = 0) -> np.ndarray:
    """theta* ~ N(0, I) rescaled so that E_x Var_{y ~ policy}(R(y) | x) = return_var (policy defaults to
    pi_ref). Fixing this variance keeps the Bradley-Terry slope comparable across sizes."""
    if not return_var > 0:
        raise ValueError(f"return_var must be > 0, got {return_var}")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(features.d)
    policy = mdp.pi_ref if policy is None else policy
    _, var = return_moments(mdp, policy, features.token_reward(theta))
    v = float(mdp.rho @ var)
    if v <= 1e-300:
        raise ValueError(f"the '{features.kind}' reward has zero return variance under this policy; it cannot "
                         "be scaled (choose another class or policy)")
    return theta * np.sqrt(return_var / v)
