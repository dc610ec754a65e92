"""Small finite-horizon MDPs with STOCHASTIC transitions, solved exactly (RTO Appendix C).

The token MDP of docs/theory.md section 1 has deterministic transitions; this module drops that assumption
for small instances, to measure two things the deterministic simulator cannot show:

* **Markov versus predetermined policies (RTO Proposition C.2).** With stochastic transitions a policy that
  reacts to the realized state can beat every policy fixed in advance (`proposition_c2`: 1 against 0.5).
* **The residual of the DPO identity.** docs/theory.md identity 2 becomes, with s' ~ P(.|s,a),
  beta log(pi*/pi_ref)(a|s) = r(s,a) + E_{s'}V*(s') - V*(s), so the implicit reward equals
  r(s,a) + V*(s') - V*(s) only in expectation over s' (`dpo_residuals`; docs/theory.md section 9 lists
  this as a pitfall).

Layout (like `TokenMDP`, layer by layer, h = 0..H-1; layer 0 holds the prompts):

    A                      number of actions (tokens)
    rho                    (n_0,) initial distribution over layer-0 states (zeros allowed, sums to 1)
    P[h]                   (n_h, A, n_{h+1}) transition law P(s'|s,a), h < H-1; rows are distributions.
                           After the last layer the episode ends and V = 0.
    log_pi_ref[h]          (n_h, A) log reference policy (-inf where pi_ref = 0: the action is forbidden)

A Markov policy and a token reward are layered lists of (n_h, A) arrays, as in mdp.py. There is no EOS
convention here: an absorbing state is just a state whose rows of P stay in an absorbing state with
pi_ref = delta_EOS and zero reward (`StochasticMDP.from_token_mdp` keeps the TokenMDP's ones).

Everything is a backward or forward recursion with dense transition tensors: meant for small instances
(hundreds of states per layer); `best_predetermined` enumerates the A^H action sequences per prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from .exact import SoftSolution, soft_backward
from .mdp import Layered, TokenMDP, check_beta, layered_arrays, row_sum_errors, safe_log

MAX_SEQUENCE_ENTRIES = 2**24   # (prompts x action sequences x states) that `predetermined_returns` accepts


# ---------------------------------------------------------------------- the model
@dataclass(eq=False)
class StochasticMDP:
    """Layered finite-horizon MDP with stochastic transitions; see the module docstring. Build it with the
    constructor (validated), `StochasticMDP.random` or `StochasticMDP.from_token_mdp`."""

    A: int
    rho: np.ndarray          # (n_0,)
    P: list                  # H-1 arrays (n_h, A, n_{h+1})
    log_pi_ref: list         # H arrays (n_h, A)

    def __post_init__(self):
        if not isinstance(self.A, (int, np.integer)) or self.A < 1:
            raise ValueError(f"A (number of actions) must be an integer >= 1, got {self.A!r}")
        if not isinstance(self.log_pi_ref, (list, tuple)) or len(self.log_pi_ref) < 1:
            raise ValueError("log_pi_ref must be a list of H >= 1 arrays of shape (n_h, A)")
        self.log_pi_ref = [np.asarray(x, dtype=float) for x in self.log_pi_ref]
        H = len(self.log_pi_ref)
        if not isinstance(self.P, (list, tuple)) or len(self.P) != H - 1:
            raise ValueError(f"P must be a list of H-1={H - 1} transition tensors (n_h, A, n_h+1), one per layer "
                             "but the last")
        self.P = [np.asarray(p, dtype=float) for p in self.P]
        for h, lp in enumerate(self.log_pi_ref):
            if lp.ndim != 2 or lp.shape[1] != self.A or lp.shape[0] < 1:
                raise ValueError(f"log_pi_ref[{h}] must have shape (n_{h}, {self.A}) with n_{h} >= 1, got {lp.shape}")
            if np.any(np.isnan(lp)) or np.any(lp == np.inf):
                raise ValueError(f"log_pi_ref[{h}] has NaN or +inf entries")
            err = np.abs(np.exp(lp).sum(axis=1) - 1.0).max()
            if err > 1e-8:
                raise ValueError(f"log_pi_ref[{h}]: exp(log_pi_ref) rows must sum to 1 (max error {err:.3g}); "
                                 "normalize the reference policy")
        for h, p in enumerate(self.P):
            want = (self.n_states[h], self.A, self.n_states[h + 1])
            if p.shape != want:
                raise ValueError(f"P[{h}] must have shape {want} (n_h, A, n_h+1), got {p.shape}")
            err = row_sum_errors(p, f"P[{h}]", axis=2).max()
            if err > 1e-8:
                raise ValueError(f"P[{h}]: every P[{h}][s, a, :] must sum to 1 (max error {err:.3g}); normalize "
                                 "over the last axis")
        self.rho = np.asarray(self.rho, dtype=float)
        if self.rho.shape != (self.n_states[0],):
            raise ValueError(f"rho must have shape ({self.n_states[0]},) (one mass per layer-0 state), got "
                             f"{self.rho.shape}")
        if np.any(~np.isfinite(self.rho)) or np.any(self.rho < 0) or abs(self.rho.sum() - 1.0) > 1e-8:
            raise ValueError("rho must be non-negative and sum to 1")

    # ------------------------------------------------------------------ structure
    @property
    def H(self) -> int:
        return len(self.log_pi_ref)

    @property
    def n_states(self) -> list[int]:
        return [len(x) for x in self.log_pi_ref]

    @property
    def pi_ref(self) -> Layered:
        return [np.exp(lp) for lp in self.log_pi_ref]

    @property
    def is_deterministic(self) -> bool:
        """True when every P(.|s,a) is a point mass."""
        return all(np.all((p == 0) | (p == 1)) for p in self.P)

    def allowed(self, h: int) -> np.ndarray:
        """(n_h, A) bool: actions the reference allows (pi_ref > 0)."""
        return self.log_pi_ref[h] > -np.inf

    def expected_next(self, h: int, V_next: np.ndarray | None) -> np.ndarray:
        """(n_h, A) E_{s' ~ P(.|s,a)} V(s'); zeros after the last layer. V_next: (n_{h+1},)."""
        if h == self.H - 1:
            return np.zeros((self.n_states[h], self.A))
        return self.P[h] @ V_next

    def check_policy(self, policy, name: str = "policy") -> Layered:
        """Validate a layered Markov policy: H arrays (n_h, A) of non-negative rows summing to 1."""
        out = self._layered(policy, name)
        for h, p in enumerate(out):
            err = row_sum_errors(p, f"{name}[{h}]").max()
            if err > 1e-8:
                raise ValueError(f"{name}[{h}] has a row summing to {1 + err:.6g} or {1 - err:.6g}, not 1: normalize "
                                 "each row")
        return out

    def check_reward(self, reward, name: str = "reward") -> Layered:
        """Validate a layered token reward: H finite arrays (n_h, A)."""
        out = self._layered(reward, name)
        for h, r in enumerate(out):
            if np.any(~np.isfinite(r)):
                raise ValueError(f"{name}[{h}] has non-finite entries")
        return out

    def _layered(self, x, name: str) -> list[np.ndarray]:
        return layered_arrays(x, self.n_states, self.A, name)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_mdp(cls, mdp: TokenMDP) -> StochasticMDP:
        """The same (deterministic) MDP with one-hot transition tensors: P[h][s, a, next_state[h][s, a]] = 1.
        Absorbing states keep pi_ref = delta_EOS; pass the reward through `mdp.check_reward` first so that it
        is zero there, as the TokenMDP convention requires."""
        P = []
        for h in range(mdp.H - 1):
            n, m = mdp.n_states[h], mdp.n_states[h + 1]
            t = np.zeros((n, mdp.A, m))
            s, a = np.meshgrid(np.arange(n), np.arange(mdp.A), indexing="ij")
            t[s, a, mdp.next_state[h]] = 1.0
            P.append(t)
        return cls(A=mdp.A, rho=mdp.rho.copy(), P=P, log_pi_ref=[lp.copy() for lp in mdp.log_pi_ref])

    @classmethod
    def random(cls, A: int, n_states: list[int], seed: int | None = 0, concentration: float = 1.0,
               branching: int | None = None, ref_temperature: float = 1.0) -> StochasticMDP:
        """Random instance: layer sizes `n_states` (len H), rho uniform over layer 0, each P(.|s,a) a
        Dirichlet(concentration) law on `branching` random successors (all of layer h+1 if None), pi_ref =
        softmax(z / ref_temperature) with z ~ N(0, 1)."""
        if len(n_states) < 1 or any(int(n) < 1 for n in n_states):
            raise ValueError(f"n_states must list H >= 1 positive layer sizes, got {n_states!r}")
        if not concentration > 0 or not ref_temperature > 0:
            raise ValueError("concentration and ref_temperature must be > 0")
        rng = np.random.default_rng(seed)
        P = []
        for h in range(len(n_states) - 1):
            n, m = int(n_states[h]), int(n_states[h + 1])
            k = m if branching is None else int(min(max(branching, 1), m))
            t = np.zeros((n, A, m))
            for s in range(n):
                for a in range(A):
                    succ = rng.choice(m, size=k, replace=False)
                    t[s, a, succ] = rng.dirichlet(np.full(k, concentration))
            P.append(t)
        logp = []
        for n in n_states:
            z = rng.standard_normal((int(n), A)) / ref_temperature
            logp.append(z - logsumexp(z, axis=1, keepdims=True))
        return cls(A=A, rho=np.full(int(n_states[0]), 1.0 / int(n_states[0])), P=P, log_pi_ref=logp)


def random_reward(mdp: StochasticMDP, seed: int | None = 0, scale: float = 1.0) -> Layered:
    """A generic token reward r(s, a) ~ N(0, scale^2), layered (n_h, A)."""
    rng = np.random.default_rng(seed)
    return [scale * rng.standard_normal((n, mdp.A)) for n in mdp.n_states]


# ---------------------------------------------------------------------- exact recursions
def soft_bellman_stochastic(mdp: StochasticMDP, reward: Layered, beta: float) -> SoftSolution:
    """The KL-regularized optimum over Markov policies (it is optimal among all history-dependent policies
    too), by backward recursion from V*(after the last layer) = 0:

        Q*(s,a) = r(s,a) + E_{s' ~ P(.|s,a)} V*(s')                              (n_h, A)
        V*(s)   = beta log sum_a pi_ref(a|s) exp(Q*(s,a)/beta)                   (n_h,)
        pi*(a|s) = pi_ref(a|s) exp((Q*(s,a) - V*(s))/beta)                      (n_h, A)

    Returns `exact.SoftSolution` (V, Q, log_policy layered). With one-hot P it equals `exact.soft_bellman`."""
    beta = check_beta(beta)
    return soft_backward(mdp.log_pi_ref, mdp.check_reward(reward), beta, mdp.expected_next)


@dataclass
class OptimalMarkov:
    """Unregularized optimum (beta = 0) over Markov policies: V[h] (n_h,), Q[h] (n_h, A) (-inf on forbidden
    actions), policy[h] (n_h, A) deterministic greedy (ties to the lowest action), value = rho @ V[0]."""

    V: Layered
    Q: Layered
    policy: Layered
    value: float


def bellman_optimal(mdp: StochasticMDP, reward: Layered) -> OptimalMarkov:
    """Best Markov policy for the plain expected return E R (no KL), over the actions pi_ref allows:
    V(s) = max_{a: pi_ref(a|s) > 0} r(s,a) + E_{s'} V(s')."""
    reward = mdp.check_reward(reward)
    V: list = [None] * mdp.H
    Q: list = [None] * mdp.H
    pol: list = [None] * mdp.H
    V_next = None
    for h in range(mdp.H - 1, -1, -1):
        Q[h] = np.where(mdp.allowed(h), reward[h] + mdp.expected_next(h, V_next), -np.inf)
        pol[h] = np.eye(mdp.A)[Q[h].argmax(axis=1)]
        V[h] = Q[h].max(axis=1)
        V_next = V[h]
    return OptimalMarkov(V=V, Q=Q, policy=pol, value=float(mdp.rho @ V[0]))


@dataclass
class MarkovValue:
    """Exact value of a Markov policy: J = E R - beta KL, with KL the trajectory-level KL(P^pi || P^ref)
    = E_pi sum_h KL(pi(.|s_h) || pi_ref(.|s_h)) (the transition factors cancel). Scalars are rho-weighted;
    V[h] (n_h,) is the KL-regularized value, J_per_start (n_0,)."""

    J: float
    expected_return: float
    kl: float
    J_per_start: np.ndarray
    V: Layered


def evaluate_markov(mdp: StochasticMDP, policy: Layered, reward: Layered, beta: float = 0.0) -> MarkovValue:
    """Backward recursion for the return, the KL and J_beta of a Markov policy (beta = 0 allowed).
    KL is +inf where the policy puts mass on an action pi_ref forbids."""
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    policy = mdp.check_policy(policy)
    reward = mdp.check_reward(reward)
    Vr = Vk = None
    Vs: list = [None] * mdp.H
    for h in range(mdp.H - 1, -1, -1):
        p = policy[h]
        kl_tok = np.zeros_like(p)
        m = p > 0
        kl_tok[m] = p[m] * (safe_log(p)[m] - mdp.log_pi_ref[h][m])
        Vr = (p * (reward[h] + mdp.expected_next(h, Vr))).sum(axis=1)
        Vk = kl_tok.sum(axis=1) + (p * mdp.expected_next(h, Vk)).sum(axis=1)
        Vs[h] = Vr - beta * Vk if beta > 0 else Vr
    J0 = Vs[0]
    return MarkovValue(J=float(mdp.rho @ J0), expected_return=float(mdp.rho @ Vr), kl=float(mdp.rho @ Vk),
                       J_per_start=J0, V=Vs)


# ---------------------------------------------------------------------- predetermined policies
def predetermined_returns(mdp: StochasticMDP, reward: Layered,
                          max_entries: int = MAX_SEQUENCE_ENTRIES) -> np.ndarray:
    """(n_0, A^H) expected return E[R | s_1, a_1..a_H] of every open-loop action sequence from every start
    state; sequences in lexicographic order (sequence index = sum_h a_h A^(H-1-h)). A sequence that plays an
    action pi_ref forbids in a state it reaches with positive probability gets -inf. Forward recursion on the
    state law d_h(s | s_1, a_1..a_{h-1}) of each action prefix."""
    reward = mdp.check_reward(reward)
    n0, A, H = mdp.n_states[0], mdp.A, mdp.H
    if n0 * A**H * max(mdp.n_states) > max_entries:
        raise ValueError(f"{n0} starts x {A}^{H} sequences x {max(mdp.n_states)} states exceed max_entries="
                         f"{max_entries}: this instance is too large to enumerate predetermined policies")
    D = np.eye(n0)[:, None, :]              # (n0, prefixes, n_h): state law after each action prefix
    G = np.zeros((n0, 1))                   # expected return so far
    bad = np.zeros((n0, 1), bool)           # the prefix played a forbidden action somewhere reachable
    for h in range(H):
        forbidden = (~mdp.allowed(h)).astype(float)                    # (n_h, A)
        G = (G[:, :, None] + D @ reward[h]).reshape(n0, -1)            # (n0, prefixes * A)
        bad = (bad[:, :, None] | ((D @ forbidden) > 0)).reshape(n0, -1)
        if h < H - 1:
            D = np.einsum("pqs,sat->pqat", D, mdp.P[h]).reshape(n0, -1, mdp.n_states[h + 1])
    return np.where(bad, -np.inf, G)


@dataclass
class Predetermined:
    """Best predetermined policy: value = rho @ per_start (n_0,), sequences (n_0, H) the maximizing action
    sequence of each start state (lowest index on ties)."""

    value: float
    per_start: np.ndarray
    sequences: np.ndarray


def best_predetermined(mdp: StochasticMDP, reward: Layered) -> Predetermined:
    """Best *predetermined* policy for the plain expected return (no KL), by enumeration.

    Definition used here: a predetermined policy fixes its actions before the episode starts; it may depend on
    the prompt (the start state s_1) and on the step h, never on the realized states s_2..s_H. With one prompt
    it is an open-loop action sequence a_1..a_H; in a deterministic MDP every response is one, which is why the
    sentence-level (bandit) view loses nothing there. Randomizing over sequences (or over actions independently
    per step) cannot help: E R is linear in the mixture (multilinear in per-step choices), so the best
    deterministic sequence is optimal among randomized predetermined policies too."""
    G = predetermined_returns(mdp, reward)
    best = G.argmax(axis=1)
    digits = (best[:, None] // mdp.A ** np.arange(mdp.H - 1, -1, -1)[None, :]) % mdp.A
    per = G[np.arange(len(best)), best]
    return Predetermined(value=float(mdp.rho @ per), per_start=per, sequences=digits.astype(np.int64))


# ---------------------------------------------------------------------- RTO Proposition C.2
def proposition_c2_instance(p: float = 0.5) -> tuple[StochasticMDP, Layered]:
    """The 3-state instance of RTO Proposition C.2 (A = 2, H = 2, pi_ref uniform).

    The paper's appendix text was not available where this module was written, so this is the smallest
    instance with the stated property (best Markov value 1, best predetermined value 0.5), reconstructed:

        states   layer 0: s0 (the prompt);  layer 1: s1, s2
        step 1   from s0 either action a in {0, 1} leads to s1 with probability p and to s2 with 1 - p;
                 r(s0, a) = 0
        step 2   r(s1, 0) = 1, r(s1, 1) = 0;  r(s2, 0) = 0, r(s2, 1) = 1; then the episode ends

    The Markov policy "play 0 in s1, 1 in s2" earns 1 surely. An open-loop sequence (a1, a2) earns
    p [a2 = 0] + (1 - p) [a2 = 1], at most max(p, 1 - p) = 0.5 at p = 0.5. With p in {0, 1} (deterministic
    transitions) the two values coincide, which is the check's failing case."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (probability of reaching s1) must lie in [0, 1], got {p!r}")
    P0 = np.array([[[p, 1 - p], [p, 1 - p]]])                       # (1, 2, 2)
    log_ref = [np.log(np.full((1, 2), 0.5)), np.log(np.full((2, 2), 0.5))]
    mdp = StochasticMDP(A=2, rho=np.array([1.0]), P=[P0], log_pi_ref=log_ref)
    reward = [np.zeros((1, 2)), np.array([[1.0, 0.0], [0.0, 1.0]])]
    return mdp, reward


PROPOSITION_C2_PAPER = (1.0, 0.5)   # (best Markov value, best predetermined value) stated by RTO Prop. C.2


def proposition_c2(p: float = 0.5) -> tuple[float, float]:
    """Measured (best Markov value, best predetermined value) on `proposition_c2_instance(p)`: two
    independent computations (backward Bellman recursion over states; forward enumeration of open-loop
    action sequences). The paper's pair is `PROPOSITION_C2_PAPER` = (1, 0.5) at p = 0.5."""
    mdp, reward = proposition_c2_instance(p)
    return bellman_optimal(mdp, reward).value, best_predetermined(mdp, reward).value


def markov_predetermined_gap(mdp: StochasticMDP, reward: Layered) -> tuple[float, float]:
    """(best Markov value, best predetermined value) of any instance; the first is always >= the second,
    with equality on deterministic MDPs."""
    return bellman_optimal(mdp, reward).value, best_predetermined(mdp, reward).value


# ---------------------------------------------------------------------- the DPO identity's residual
@dataclass
class DPOResiduals:
    """Residual of docs/theory.md identity 2 under stochastic transitions, for allowed (s, a) (pi_ref > 0):

        e(s,a,s') = beta log(pi/pi_ref)(a|s) - (r(s,a) + V*(s') - V*(s))     for P(s'|s,a) > 0
        mean(s,a) = sum_s' P(s'|s,a) e(s,a,s')

    With pi = pi*_beta, mean = 0 (the identity holds in expectation over s') and e(s,a,s') =
    E[V*(s')|s,a] - V*(s'), which is 0 only when P(.|s,a) is a point mass (or V* is constant on its
    support). In the last layer there is no s' and e = mean. Layered: mean[h] (n_h, A), pointwise[h]
    (n_h, A, n_{h+1}) (NaN where P = 0 or the action is forbidden; (n_h, A, 1) in the last layer)."""

    max_abs_mean: float
    max_abs_pointwise: float
    mean: Layered
    pointwise: Layered


def dpo_residuals(mdp: StochasticMDP, reward: Layered, beta: float,
                  log_policy: Layered | None = None) -> DPOResiduals:
    """The residuals above for `log_policy` (default: the exact optimum pi*_beta of `soft_bellman_stochastic`;
    pass another policy to see the check fail). V* always comes from the soft-Bellman recursion; the implicit
    reward is read from the policy, so the mean residual tests the policy against the expected-value identity."""
    beta = check_beta(beta)
    reward = mdp.check_reward(reward)
    sol = soft_bellman_stochastic(mdp, reward, beta)
    if log_policy is None:
        log_policy = sol.log_policy
    log_policy = mdp._layered(log_policy, "log_policy")
    means, points = [], []
    for h in range(mdp.H):
        ok = mdp.allowed(h)
        implicit = np.where(ok, beta * (log_policy[h] - np.where(ok, mdp.log_pi_ref[h], 0.0)), np.nan)
        base = implicit - reward[h] + sol.V[h][:, None]                     # (n_h, A)
        if h < mdp.H - 1:
            e = base[:, :, None] - sol.V[h + 1][None, None, :]               # (n_h, A, n_{h+1})
            mean = np.einsum("sat,sat->sa", mdp.P[h], np.where(mdp.P[h] > 0, e, 0.0))
            e = np.where(mdp.P[h] > 0, e, np.nan)
        else:
            e, mean = base[:, :, None], base
        means.append(np.where(ok, mean, np.nan))
        points.append(np.where(ok[:, :, None], e, np.nan))

    def amax(xs):
        vals = [np.abs(x[~np.isnan(x)]) for x in xs]
        return float(max((v.max() for v in vals if v.size), default=0.0))
    return DPOResiduals(max_abs_mean=amax(means), max_abs_pointwise=amax(points), mean=means, pointwise=points)


def residual_check(seed: int = 0, A: int = 3, n_states: tuple[int, ...] = (2, 4, 4, 3), beta: float = 0.5,
                   deterministic_H: int = 3) -> dict:
    """The identity-style numbers for the (*) residual, on a seeded random stochastic instance and on a random
    deterministic one (a `TokenMDP.tree` converted with `from_token_mdp`):

        stochastic_mean, stochastic_pointwise        max |mean residual| (~1e-15) and max |pointwise| (> 0)
        deterministic_mean, deterministic_pointwise  both ~0
        deterministic_vs_exact                       max |V*, pi*| difference to `exact.soft_bellman` (~1e-15)"""
    from .exact import soft_bellman

    smdp = StochasticMDP.random(A, list(n_states), seed=seed)
    sres = dpo_residuals(smdp, random_reward(smdp, seed=seed + 1), beta)
    tok = TokenMDP.tree(A, deterministic_H, n_prompts=2, eos=True, seed=seed)
    rng = np.random.default_rng(seed + 2)
    r_tok = tok.check_reward([rng.standard_normal((n, A)) for n in tok.n_states])
    dmdp = StochasticMDP.from_token_mdp(tok)
    dres = dpo_residuals(dmdp, r_tok, beta)
    a, b = soft_bellman(tok, r_tok, beta), soft_bellman_stochastic(dmdp, r_tok, beta)
    diff = max(max(np.abs(x - y).max() for x, y in zip(a.V, b.V)),
               max(np.abs(np.exp(x) - np.exp(y)).max() for x, y in zip(a.log_policy, b.log_policy)))
    return {"stochastic_mean": sres.max_abs_mean, "stochastic_pointwise": sres.max_abs_pointwise,
            "deterministic_mean": dres.max_abs_mean, "deterministic_pointwise": dres.max_abs_pointwise,
            "deterministic_vs_exact": float(diff)}


def all_sequences(A: int, H: int) -> np.ndarray:
    """(A^H, H) every action sequence, in the order of `predetermined_returns`' columns."""
    return np.array(list(itertools.product(range(A), repeat=H)), dtype=np.int64).reshape(-1, H)
