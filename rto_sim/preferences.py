"""Pairwise preference data under Bradley-Terry (docs/theory.md sections 1 and 4).

For each pair i a prompt x_i ~ rho is drawn, two responses y_i^1, y_i^2 ~ mu(.|x_i) are drawn from a
behaviour policy mu (default pi_ref), and the label is SAMPLED from Bradley-Terry on the true returns,

    P(y^1 > y^2 | x) = sigmoid(R(y^1) - R(y^2)),        R(y) = sum_h r(s_h, a_h),

never the argmax (argmax labels make the data separable and the MLE diverge).

Behaviour policies `mu` accepted by `sample_preferences`:
    None                      pi_ref of the MDP
    layered policy            a list of H arrays (n_h, A)
    Mixture(weights, policies)
                              each response independently picks component c ~ weights (per="response",
                              default) or both responses of a pair share one component (per="pair")
    callable (rng, n) -> (first, second)
                              any custom coverage law returning two `Trajectories` with equal prompts

`trajectory_features(features, traj)` gives psi(y) = sum_h phi(s_h, a_h) of sampled responses as a
scipy.sparse (n, d) matrix (tokens outside the response mask contribute nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from .features import FeatureMap
from .mdp import Layered, TokenMDP
from .sampling import Trajectories, sample_trajectories

__all__ = ["Mixture", "PreferenceData", "sample_preferences", "trajectory_features", "take", "select",
           "response_codes"]


def take(traj: Trajectories, idx) -> Trajectories:
    """Rows `idx` (index array or boolean mask) of a `Trajectories` batch."""
    return Trajectories(prompt=traj.prompt[idx], actions=traj.actions[idx], states=traj.states[idx],
                        mask=traj.mask[idx])


def select(cond: np.ndarray, a: Trajectories, b: Trajectories) -> Trajectories:
    """Row-wise `a if cond else b` for two batches of equal length; cond (n,) bool."""
    c1, c2 = cond, cond[:, None]
    return Trajectories(prompt=np.where(c1, a.prompt, b.prompt), actions=np.where(c2, a.actions, b.actions),
                        states=np.where(c2, a.states, b.states), mask=np.where(c2, a.mask, b.mask))


def concat(parts: Sequence[Trajectories]) -> Trajectories:
    return Trajectories(prompt=np.concatenate([p.prompt for p in parts]),
                        actions=np.concatenate([p.actions for p in parts]),
                        states=np.concatenate([p.states for p in parts]),
                        mask=np.concatenate([p.mask for p in parts]))


def response_codes(prompt: np.ndarray, actions: np.ndarray, A: int) -> np.ndarray:
    """(n,) int64 code identifying a complete response of a prompt: prompt * A^H + sum_h a_h A^(H-1-h).
    Responses are EOS-padded after the first EOS (both in `Trajectories` and `Enumeration`), so equal
    responses get equal codes. Raises ValueError when P * A^H does not fit in int64."""
    H = actions.shape[1]
    if (H * np.log2(A) + np.log2(max(int(prompt.max(initial=0)) + 1, 1))) > 62:
        raise ValueError(f"responses of length H={H} over A={A} tokens cannot be coded in int64; "
                         "use a smaller H or A")
    w = (A ** np.arange(H - 1, -1, -1, dtype=np.int64)).astype(np.int64)
    return prompt.astype(np.int64) * np.int64(A) ** H + actions.astype(np.int64) @ w


@dataclass
class Mixture:
    """Behaviour mixture mu = sum_c weights[c] * policies[c].

    per: "response" (default) draws the component independently for each response of a pair;
    "pair" draws one component per pair (both responses from the same policy)."""

    weights: Sequence[float]
    policies: Sequence[Layered]
    per: str = "response"

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=float)
        if w.ndim != 1 or len(w) != len(self.policies) or len(w) == 0:
            raise ValueError("Mixture: weights and policies must be non-empty and of equal length")
        if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("Mixture: weights must be finite, non-negative and not all zero")
        if self.per not in ("response", "pair"):
            raise ValueError(f"Mixture.per must be 'response' or 'pair', got {self.per!r}")
        self.weights = w / w.sum()


@dataclass
class PreferenceData:
    """N preference pairs sharing a prompt.

    first, second: Trajectories of length N (same prompts, row by row)
    first_preferred: (N,) bool, the sampled Bradley-Terry label
    return_first, return_second: (N,) true returns R(y) (kept for diagnostics such as the BT slope)
    seed: the seed the data was drawn with (None for data built by hand)."""

    first: Trajectories
    second: Trajectories
    first_preferred: np.ndarray
    return_first: np.ndarray | None = None
    return_second: np.ndarray | None = None
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.first)
        if len(self.second) != n or np.shape(self.first_preferred) != (n,):
            raise ValueError("PreferenceData: first, second and first_preferred must have the same length N")
        if n < 1:
            raise ValueError("PreferenceData: N must be >= 1")
        if not np.array_equal(self.first.prompt, self.second.prompt):
            raise ValueError("PreferenceData: both responses of a pair must share the prompt (first.prompt == "
                             "second.prompt)")
        self.first_preferred = np.asarray(self.first_preferred, dtype=bool)

    @property
    def n(self) -> int:
        return len(self.first)

    @property
    def chosen(self) -> Trajectories:
        """The preferred response y_w of each pair."""
        return select(self.first_preferred, self.first, self.second)

    @property
    def rejected(self) -> Trajectories:
        """The dispreferred response y_l of each pair."""
        return select(self.first_preferred, self.second, self.first)

    def subset(self, idx) -> PreferenceData:
        """The pairs `idx` (index array, slice or mask)."""
        idx = np.arange(self.n)[idx]
        rf = None if self.return_first is None else self.return_first[idx]
        rs = None if self.return_second is None else self.return_second[idx]
        return PreferenceData(take(self.first, idx), take(self.second, idx), self.first_preferred[idx], rf, rs,
                              self.seed, dict(self.meta))

    def bt_slope(self) -> float:
        """s = mean over pairs of sigmoid'(R(y^1) - R(y^2)) (the Bradley-Terry slope of docs/theory.md S2)."""
        if self.return_first is None:
            raise ValueError("bt_slope needs the true returns (data built by sample_preferences)")
        p = expit(self.return_first - self.return_second)
        return float(np.mean(p * (1 - p)))


def _sample_from(mdp: TokenMDP, behaviour, prompt: np.ndarray, rng: np.random.Generator,
                 comp: np.ndarray | None) -> Trajectories:
    """Responses for the given prompts from a policy or (with `comp`) from mixture components."""
    if not isinstance(behaviour, Mixture):
        return sample_trajectories(mdp, behaviour, len(prompt), rng, prompt=prompt)
    n = len(prompt)
    out = Trajectories(prompt=prompt.copy(), actions=np.zeros((n, mdp.H), np.int64),
                       states=np.zeros((n, mdp.H), np.int64), mask=np.zeros((n, mdp.H), bool))
    for c, pol in enumerate(behaviour.policies):
        rows = np.flatnonzero(comp == c)
        if len(rows) == 0:
            continue
        t = sample_trajectories(mdp, pol, len(rows), rng, prompt=prompt[rows])
        out.actions[rows], out.states[rows], out.mask[rows] = t.actions, t.states, t.mask
    return out


def sample_preferences(mdp: TokenMDP, reward: Layered, n_pairs: int, seed, behaviour=None) -> PreferenceData:
    """Draw `n_pairs` Bradley-Terry preference pairs (see module docstring).

    mdp: the token MDP; reward: true token reward r* (layered (n_h, A)); n_pairs: N >= 1;
    seed: int or numpy Generator; behaviour: mu (None = pi_ref, a layered policy, a `Mixture`, or a
    callable (rng, n) -> (first, second)). Labels: first_preferred ~ Bernoulli(sigmoid(R1 - R2))."""
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"n_pairs (N) must be an integer >= 1, got {n_pairs!r}")
    reward = mdp.check_reward(reward, "reward")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = int(n_pairs)
    if callable(behaviour) and not isinstance(behaviour, (list, tuple, Mixture)):
        first, second = behaviour(rng, n)
        if not isinstance(first, Trajectories) or not isinstance(second, Trajectories):
            raise ValueError("behaviour callable must return two Trajectories (first, second)")
        if len(first) != n or len(second) != n:
            raise ValueError(f"behaviour callable returned {len(first)} and {len(second)} responses, expected {n}")
    else:
        if behaviour is None:
            behaviour = mdp.pi_ref
        elif not isinstance(behaviour, Mixture):
            behaviour = mdp.check_policy(behaviour, "behaviour")
        prompt = rng.choice(mdp.n_prompts, size=n, p=mdp.rho)
        comp1 = comp2 = None
        if isinstance(behaviour, Mixture):
            behaviour = Mixture(behaviour.weights, [mdp.check_policy(p, "Mixture.policies") for p in
                                                    behaviour.policies], behaviour.per)
            comp1 = rng.choice(len(behaviour.weights), size=n, p=behaviour.weights)
            comp2 = comp1 if behaviour.per == "pair" else rng.choice(len(behaviour.weights), size=n,
                                                                     p=behaviour.weights)
        first = _sample_from(mdp, behaviour, prompt, rng, comp1)
        second = _sample_from(mdp, behaviour, prompt, rng, comp2)
    r1, r2 = first.returns(reward), second.returns(reward)
    label = rng.random(n) < expit(r1 - r2)
    return PreferenceData(first=first, second=second, first_preferred=label, return_first=r1, return_second=r2,
                          seed=seed if isinstance(seed, (int, np.integer)) else None)


def trajectory_features(features: FeatureMap, traj) -> sp.csr_matrix:
    """psi(y) = sum_h phi(s_h, a_h) over the response mask, as scipy.sparse CSR of shape (n, d).
    Accepts `Trajectories` or an `Enumeration` (all tokens counted; phi = 0 after EOS anyway)."""
    states, actions = traj.states, traj.actions
    mask = getattr(traj, "mask", None)
    n, H = actions.shape
    if len(features.index) != H:
        raise ValueError(f"features are for H={len(features.index)} layers but the trajectories have H={H}")
    rows, cols, vals = [], [], []
    for h in range(H):
        i = features.index[h][states[:, h], actions[:, h]]          # (n, m)
        v = features.value[h][states[:, h], actions[:, h]]
        if mask is not None:
            v = v * mask[:, h, None]
        rows.append(np.repeat(np.arange(n), i.shape[1]))
        cols.append(i.ravel())
        vals.append(v.ravel())
    m = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, features.d)).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m
