"""Actors and critics for the simulator's PPO (`rto_sim.tabular_ppo`), and the exact quantities of a policy that
the experiments compare them with (docs/theory.md section 10, experiment E7).

Actors (softmax per state over a layered `TokenMDP`; both start at pi_ref):

    TabularPolicy     one logit per (layer, state, token): logits = z[s, a], z initialized at log pi_ref
    LogLinearPolicy   shared parameters: logits = log pi_ref(a|s) + <phi(s, a), w>, w in R^d initialized at 0,
                      phi from the simulator's feature classes (`rto_sim.features`: bigram, positional, ...,
                      concatenated). One w moves the policy of every state that shares a feature, so its
                      updates couple states: a potential added to the reward is no longer a per-state offset.

Critics (values of the layered states; V after the last token is 0):

    TabularCritic     one value per state (the control: on the prefix tree it absorbs any potential, section 10)
    LinearCritic      V(s) = <f(s), w> + offset(s) over fixed state features f; `critic_features(mdp, kind)`
                      builds f: "tabular" (one-hot state), "position_last_token" (one-hot position h plus
                      one-hot last token: ADDITIVE in (h, last token), so it cannot represent their interaction)
                      or "position" (one-hot h only: a per-position baseline)

Exact quantities, by the layered recursions (never sampled):

    evaluate_many     J_beta and the expected returns of one policy under several reward tables in one pass
    exact_advantage   A^pi(s, a) = r(s, a) - beta log(pi/pi_ref)(a|s) + V^pi(s') - V^pi(s): the advantage of the
                      per-token reward PPO optimizes (the k1 KL penalty in the token's reward)
    exact_objective   J_beta(pi) as a differentiable torch function of the actor's parameters (forward
                      occupancy recursion); `exact_gradient` is its gradient, `class_optimum` maximizes it over
                      the actor's class (L-BFGS from pi_ref; the global optimum for the tabular class is
                      `exact.soft_bellman`, which the tests compare it with)

The identity of docs/theory.md section 10 (shaping by a potential on the critic's states = moving the critic's
start by that potential) holds for a LinearCritic exactly when the potential lies in the span of f plus the
offset; `tabular_ppo.shaping_is_critic_offset` checks it through the whole trainer on the prefix tree.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .exact import evaluate
from .features import FeatureMap
from .mdp import Layered, TokenMDP

DTYPE = torch.float64
_NEG = -1e9           # logit of tokens pi_ref forbids (exp underflows to exactly 0 in float64)

__all__ = ["TabularPolicy", "LogLinearPolicy", "TabularCritic", "LinearCritic", "critic_features", "make_actor",
           "make_critic", "ACTORS", "CRITICS", "flat_table", "evaluate_many", "exact_advantage", "exact_objective",
           "exact_gradient", "class_optimum", "ExactObjective", "MultiEvaluator"]

ACTORS = ("tabular", "loglinear")
CRITICS = ("tabular", "position_last_token", "position", "none")


def flat_table(layered: Layered) -> np.ndarray:
    """(S, ...) rows of a layered table stacked layer by layer (the flat state index offsets[h] + s)."""
    return np.concatenate([np.asarray(x, float) for x in layered], axis=0)


# ---------------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------------


class _SoftmaxPolicy(torch.nn.Module):
    """Softmax policy over the layered states of `mdp`; subclasses define `logits(flat_states) -> (..., A)`."""

    def __init__(self, mdp: TokenMDP):
        super().__init__()
        self.mdp = mdp
        self.offsets = mdp.flat_offsets()
        allowed = np.concatenate(mdp.log_pi_ref, axis=0) > -np.inf
        self.register_buffer("allowed", torch.as_tensor(allowed))

    def logits(self, flat_states: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _masked_logits(self, flat_states: torch.Tensor) -> torch.Tensor:
        return torch.where(self.allowed[flat_states], self.logits(flat_states), torch.full((), _NEG, dtype=DTYPE))

    def log_probs_all(self, flat_states: torch.Tensor) -> torch.Tensor:
        """(..., A) log pi(. | s) for flat state indices of any shape."""
        return torch.log_softmax(self._masked_logits(flat_states), dim=-1)

    def log_probs(self, flat_states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, T) log pi(a_t | s_t): logits gathered then `core.gather_logprobs` (temperature 1)."""
        from . import core
        return core.gather_logprobs(self._masked_logits(flat_states), actions)

    @property
    def n_flat(self) -> int:
        return int(self.offsets[-1])

    @torch.no_grad()
    def layered_log_policy(self) -> Layered:
        """log pi as a layered list of (n_h, A) numpy arrays (absorbing rows forced to delta_EOS)."""
        lp = self.log_probs_all(torch.arange(self.n_flat)).numpy()
        out = [lp[self.offsets[h]:self.offsets[h + 1]].copy() for h in range(self.mdp.H)]
        for h, x in enumerate(out):
            x[x <= _NEG / 2] = -np.inf
            if self.mdp.absorbing[h].any():
                x[self.mdp.absorbing[h]] = -np.inf
                x[self.mdp.absorbing[h], self.mdp.eos] = 0.0
        return out

    def layered_policy(self) -> Layered:
        """pi as a layered list of (n_h, A) numpy arrays."""
        return [np.exp(x) for x in self.layered_log_policy()]


class TabularPolicy(_SoftmaxPolicy):
    """Softmax policy with one logit per (layer, state, token): pi(a | s) = softmax(logits[flat(s)])_a.

    z: parameter (S, A) of logits, S = sum_h n_h, initialized at log pi_ref (or `init_log_policy`);
    tokens with pi_ref(a|s) = 0 get a fixed -1e9 (probability exactly 0, no gradient).
    """

    def __init__(self, mdp: TokenMDP, init_log_policy: Layered | None = None):
        super().__init__(mdp)
        init = mdp.log_pi_ref if init_log_policy is None else init_log_policy
        lp = flat_table(init)
        ok = self.allowed.numpy() & np.isfinite(lp)
        self.z = torch.nn.Parameter(torch.as_tensor(np.where(ok, lp, 0.0), dtype=DTYPE))

    def logits(self, flat_states: torch.Tensor) -> torch.Tensor:
        return self.z[flat_states]


class LogLinearPolicy(_SoftmaxPolicy):
    """logits(s, a) = log pi_ref(a|s) + <phi(s, a), w>, w in R^d (initialized at 0: the policy starts at pi_ref).

    features: one FeatureMap or a sequence of them (concatenated), or a dense (S, A, d) array over flat states.
    The class {pi_ref exp(<phi, w>) / Z(s)} shares w across every state with the same features."""

    def __init__(self, mdp: TokenMDP, features):
        super().__init__(mdp)
        phi = dense_features(mdp, features)
        self.register_buffer("phi", torch.as_tensor(phi, dtype=DTYPE))
        base = flat_table(mdp.log_pi_ref)
        self.register_buffer("base", torch.as_tensor(np.where(np.isfinite(base), base, 0.0), dtype=DTYPE))
        self.w = torch.nn.Parameter(torch.zeros(phi.shape[-1], dtype=DTYPE))

    @property
    def d(self) -> int:
        return int(self.w.shape[0])

    def logits(self, flat_states: torch.Tensor) -> torch.Tensor:
        return self.base[flat_states] + self.phi[flat_states] @ self.w


def dense_features(mdp: TokenMDP, features) -> np.ndarray:
    """(S, A, d) dense actor features over flat states from a FeatureMap, a list of them, or an array."""
    if isinstance(features, np.ndarray):
        phi = np.asarray(features, float)
    else:
        maps = [features] if isinstance(features, FeatureMap) else list(features)
        if not maps or not all(isinstance(f, FeatureMap) for f in maps):
            raise ValueError("features must be a FeatureMap, a list of FeatureMaps or an (S, A, d) array")
        phi = np.concatenate([np.concatenate([f.dense(h) for h in range(mdp.H)], axis=0) for f in maps], axis=-1)
    S = int(mdp.flat_offsets()[-1])
    if phi.ndim != 3 or phi.shape[:2] != (S, mdp.A):
        raise ValueError(f"actor features must have shape ({S}, {mdp.A}, d), got {phi.shape}")
    return phi


def make_actor(mdp: TokenMDP, kind: str, features=None) -> _SoftmaxPolicy:
    """kind "tabular" or "loglinear" (needs `features`: FeatureMap(s) or an (S, A, d) array)."""
    if kind == "tabular":
        return TabularPolicy(mdp)
    if kind == "loglinear":
        if features is None:
            raise ValueError("actor 'loglinear' needs features (a FeatureMap, a list of them or an (S, A, d) array)")
        return LogLinearPolicy(mdp, features)
    raise ValueError(f"actor must be one of {ACTORS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------
# Critics
# ---------------------------------------------------------------------------------------------------


class TabularCritic(torch.nn.Module):
    """One value per (layer, state): V(s) = values[flat(s)], initialized at 0 or at `init` ((S,) flat or layered)."""

    def __init__(self, mdp: TokenMDP, init=None):
        super().__init__()
        S = int(mdp.flat_offsets()[-1])
        v0 = np.zeros(S) if init is None else _flat_values(init, S)
        self.values = torch.nn.Parameter(torch.as_tensor(v0, dtype=DTYPE))

    def forward(self, flat_states: torch.Tensor) -> torch.Tensor:
        return self.values[flat_states]


class LinearCritic(torch.nn.Module):
    """V(s) = <f(s), w> + offset(s): fixed state features f (S, k), trainable w (k,) initialized at 0, and a fixed
    offset (S,) (default 0; a starting potential that the parameters cannot move)."""

    def __init__(self, features: np.ndarray, offset=None):
        super().__init__()
        f = np.asarray(features, float)
        if f.ndim != 2:
            raise ValueError(f"critic features must be an (S, k) array, got shape {f.shape}")
        self.register_buffer("f", torch.as_tensor(f, dtype=DTYPE))
        self.register_buffer("offset", torch.as_tensor(np.zeros(len(f)) if offset is None else
                                                       _flat_values(offset, len(f)), dtype=DTYPE))
        self.w = torch.nn.Parameter(torch.zeros(f.shape[1], dtype=DTYPE))

    def forward(self, flat_states: torch.Tensor) -> torch.Tensor:
        return self.f[flat_states] @ self.w + self.offset[flat_states]


def _flat_values(values, S: int) -> np.ndarray:
    v = flat_table(values) if isinstance(values, (list, tuple)) else np.asarray(values, float)
    if v.shape != (S,):
        raise ValueError(f"critic values must have shape ({S},) (flat states) or be layered, got {v.shape}")
    return v


def critic_features(mdp: TokenMDP, kind: str) -> np.ndarray:
    """(S, k) state features of a linear critic (module docstring): "tabular", "position_last_token" (one-hot h
    concatenated with one-hot last token, -1 = prompt; k = H + A + 1) or "position" (one-hot h; k = H)."""
    S = int(mdp.flat_offsets()[-1])
    h_of = np.concatenate([np.full(n, h) for h, n in enumerate(mdp.n_states)])
    if kind == "tabular":
        return np.eye(S)
    pos = np.eye(mdp.H)[h_of]
    if kind == "position":
        return pos
    if kind == "position_last_token":
        last = np.concatenate(mdp.last_token)
        if np.any(last == -2):
            raise ValueError("critic 'position_last_token' needs states that know their last token (a tree or the "
                             "last-token automaton)")
        return np.concatenate([pos, np.eye(mdp.A + 1)[last + 1]], axis=1)
    raise ValueError(f"critic features must be 'tabular', 'position_last_token' or 'position', got {kind!r}")


def make_critic(mdp: TokenMDP, kind: str, init=None) -> torch.nn.Module | None:
    """kind in CRITICS: "tabular" (TabularCritic), "position_last_token" / "position" (LinearCritic) or "none"
    (no critic: REINFORCE++ advantages). init: starting values (tabular) or the fixed offset (linear)."""
    if kind == "none":
        return None
    if kind == "tabular":
        return TabularCritic(mdp, init)
    if kind in CRITICS:
        return LinearCritic(critic_features(mdp, kind), offset=init)
    raise ValueError(f"critic must be one of {CRITICS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------
# Exact quantities of a policy
# ---------------------------------------------------------------------------------------------------


class MultiEvaluator:
    """J_beta(pi) and E_pi R for several reward tables at once, by one backward recursion over the layers
    (the same recursion as `exact.evaluate`, vectorized over K tables; no input checks: built once per trainer).

    `__call__(policy)` -> (returns (K,), kl): rho-weighted expected return of each table and KL(pi || pi_ref)."""

    def __init__(self, mdp: TokenMDP, tables: list[Layered]):
        self.mdp = mdp
        self.K = len(tables)
        self.R = [np.stack([np.asarray(t[h], float) for t in tables], axis=-1) if tables else
                  np.zeros((n, mdp.A, 0)) for h, n in enumerate(mdp.n_states)]
        self.log_ref = mdp.log_pi_ref

    def __call__(self, policy: Layered) -> tuple[np.ndarray, float]:
        mdp = self.mdp
        Vr = Vk = None
        for h in range(mdp.H - 1, -1, -1):
            p = policy[h]
            with np.errstate(divide="ignore", invalid="ignore"):
                kl_tok = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.where(p > 0, self.log_ref[h], 0.0)),
                                  0.0)
            if h == mdp.H - 1:
                qr, qk = self.R[h], 0.0
            else:
                nxt = mdp.next_state[h]
                qr, qk = self.R[h] + Vr[nxt], Vk[nxt]
            Vr = np.einsum("sa,sak->sk", p, qr)
            Vk = kl_tok.sum(axis=1) + ((p * qk).sum(axis=1) if h < mdp.H - 1 else 0.0)
        return mdp.rho @ Vr, float(mdp.rho @ Vk)


def evaluate_many(mdp: TokenMDP, policy: Layered, tables: list[Layered], beta: float = 0.0) -> tuple[np.ndarray, float]:
    """(J_beta of each table (K,), KL(pi || pi_ref)): `MultiEvaluator` for a one-off call."""
    ret, kl = MultiEvaluator(mdp, tables)(policy)
    return ret - beta * kl, kl


def exact_advantage(mdp: TokenMDP, policy: Layered, reward: Layered, beta: float) -> Layered:
    """A^pi(s, a) = r(s, a) - beta log(pi/pi_ref)(a|s) + V^pi(s') - V^pi(s), layered (n_h, A); 0 where pi = 0.

    The token reward of PPO is r - beta2 k1 (k1 = log pi_old - log pi_ref), so this is the advantage its
    estimators target; E_{a ~ pi}[A^pi(s, a)] = 0 in every state. V^pi is `exact.evaluate`'s KL-regularized value."""
    ev = evaluate(mdp, policy, reward, beta)
    out = []
    for h in range(mdp.H):
        p = np.asarray(policy[h], float)
        live = p > 0
        lr = np.zeros_like(p)
        lr[live] = np.log(p[live]) - mdp.log_pi_ref[h][live]
        out.append(np.where(live, ev.Q[h] - beta * lr - ev.V[h][:, None], 0.0))
    return out


class ExactObjective:
    """J_beta(pi) = sum_h sum_s d_h(s) sum_a pi(a|s) [r(s, a) - beta log(pi/pi_ref)(a|s)] as a differentiable torch
    function of an actor (forward occupancy recursion from rho); the MDP's tensors are built once here."""

    def __init__(self, mdp: TokenMDP, reward: Layered, beta: float):
        self.mdp, self.beta = mdp, float(beta)
        lr = flat_table(mdp.log_pi_ref)
        self.ref = torch.as_tensor(np.where(np.isfinite(lr), lr, 0.0), dtype=DTYPE)
        self.absorbing = torch.as_tensor(np.concatenate(mdp.absorbing))
        self.r = torch.as_tensor(flat_table(mdp.check_reward(reward)), dtype=DTYPE)
        self.off = mdp.flat_offsets()
        self.rho = torch.as_tensor(mdp.rho, dtype=DTYPE)
        self.nxt = [torch.as_tensor(x.reshape(-1)) for x in mdp.next_state]
        eos_row = np.eye(mdp.A)[mdp.eos if mdp.eos is not None else 0]
        self.eos_row = torch.as_tensor(eos_row, dtype=DTYPE)
        self.states = torch.arange(int(self.off[-1]))

    def __call__(self, policy: _SoftmaxPolicy) -> torch.Tensor:
        mdp, off = self.mdp, self.off
        lp = policy.log_probs_all(self.states)
        pi = torch.exp(lp)
        zero = torch.zeros((), dtype=DTYPE)
        live = policy.allowed & ~self.absorbing[:, None]
        per_s = torch.where(live, pi * (self.r - self.beta * (lp - self.ref)), zero).sum(dim=1)
        pi = torch.where(self.absorbing[:, None], self.eos_row, pi)
        d = self.rho
        J = zero
        for h in range(mdp.H):
            J = J + d @ per_s[off[h]:off[h + 1]]
            if h < mdp.H - 1:
                flow = (d[:, None] * pi[off[h]:off[h + 1]]).reshape(-1)
                d = torch.zeros(mdp.n_states[h + 1], dtype=DTYPE).index_add_(0, self.nxt[h], flow)
        return J


def exact_objective(mdp: TokenMDP, policy: _SoftmaxPolicy, reward: Layered, beta: float) -> torch.Tensor:
    """J_beta(pi) of the actor as a differentiable torch scalar (`ExactObjective`)."""
    return ExactObjective(mdp, reward, beta)(policy)


def exact_gradient(mdp: TokenMDP, policy: _SoftmaxPolicy, reward: Layered, beta: float) -> torch.Tensor:
    """Flat gradient of `exact_objective` w.r.t. the actor's parameters (in `parameters()` order)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    g = torch.autograd.grad(exact_objective(mdp, policy, reward, beta), params)
    return torch.cat([x.reshape(-1) for x in g])


def class_optimum(mdp: TokenMDP, policy: _SoftmaxPolicy, reward: Layered, beta: float, max_iter: int = 200,
                  tol: float = 1e-8) -> tuple[float, Layered]:
    """Maximize J_beta over the actor's class by L-BFGS (scipy, with the exact torch gradient) on a copy of `policy`,
    started where it is (normally pi_ref). Returns (J, log-policy). For the tabular class on any layered MDP this
    reaches `soft_bellman`'s optimum (to ~1e-7 in J); for a log-linear class it is the best policy L-BFGS finds
    (J is not concave in w in general). tol: gradient tolerance (max |dJ/dw|)."""
    from scipy.optimize import minimize

    pol = copy.deepcopy(policy)
    objective = ExactObjective(mdp, reward, beta)
    params = [p for p in pol.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def load(x):
        with torch.no_grad():
            for p, chunk, shp in zip(params, np.split(x, np.cumsum(sizes)[:-1]), shapes):
                p.copy_(torch.as_tensor(chunk.reshape(shp), dtype=DTYPE))

    def fun(x):
        load(x)
        J = objective(pol)
        g = torch.autograd.grad(J, params)
        return -float(J.detach()), -torch.cat([t.reshape(-1) for t in g]).numpy()

    x0 = torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()
    res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": int(max_iter), "gtol": tol, "ftol": 1e-15, "maxcor": 30})
    load(res.x)
    with torch.no_grad():
        J = float(objective(pol))
    return J, pol.layered_log_policy()
