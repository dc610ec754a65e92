"""The token MDP (docs/theory.md section 1).

A prompt x ~ rho is the initial state s_1; the state after h tokens is s_{h+1} = (x, y_1..y_h), or an
aggregated automaton state f(prefix); the transition is deterministic. We store the MDP *layered*:
layer h (0-based, h = 0..H-1) holds the states in which token y_{h+1} is chosen.

    n_states[h]            number of states in layer h (layer 0 = the prompts)
    next_state[h]          (n_h, A) int, index of the successor in layer h+1 (h < H-1 only;
                           after the last layer the episode is over and V = 0)
    absorbing[h]           (n_h,) bool, states reached after EOS: pi = pi_ref = delta_EOS, r = 0, KL = 0
    last_token[h]          (n_h,) int, the token that led here (-1 at prompts, -2 if the automaton
                           merges prefixes with different last tokens)
    prompt_of[h]           (n_h,) int, the prompt of the state (-1 if the automaton merges prompts)
    log_pi_ref[h]          (n_h, A) log reference policy (-inf where pi_ref = 0)

A policy is a list of H arrays of shape (n_h, A) (rows are distributions); a token reward is a list of
H arrays of shape (n_h, A). Both the full prefix tree (the LLM picture, one state per prefix) and
aggregated automata (where parameters are shared) use this one representation.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

Layered = list  # list of H numpy arrays, one per layer

_ABSORB = ("<absorbing>",)


# Largest number of (state, token) entries summed over the layers that the constructors build (each layered
# table, e.g. next_state or log pi_ref, holds this many numbers: 2**25 float64 entries = 256 MiB per table).
# Raise it (rto_sim.mdp.MAX_TABLE_ENTRIES = ...) on a machine with the memory for more.
MAX_TABLE_ENTRIES = 2**25
MAX_HORIZON = 100_000       # every recursion loops over the layers in Python


def _check_sizes(A: int, H: int, n_prompts: int) -> None:
    if isinstance(A, bool) or not isinstance(A, (int, np.integer)) or A < 2:
        raise ValueError(f"A (vocabulary size) must be an integer >= 2, got {A!r}; use A=2 or more")
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
        raise ValueError(f"H (horizon) must be an integer >= 1, got {H!r}; use H=1 or more")
    if H > MAX_HORIZON:
        raise ValueError(f"H={H:,} layers is more than the limit MAX_HORIZON = {MAX_HORIZON:,} (every recursion loops "
                         "over the layers): use a smaller H, or raise rto_sim.mdp.MAX_HORIZON")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be an integer >= 1, got {n_prompts!r}")


def _check_table_size(what: str, n_states: int, A: int, fix: str) -> None:
    """Refuse, before allocating, an MDP whose layered tables would exceed MAX_TABLE_ENTRIES entries."""
    entries = int(n_states) * int(A)
    if entries > MAX_TABLE_ENTRIES:
        def big(n: int) -> str:
            return f"{n:,}" if n < 10**15 else f"~10^{len(str(n)) - 1}"
        # ~4 float64 tables: next_state, log pi_ref and the reference-policy temporaries
        gib = "~" + big(entries * 8 * 4 // 2**30).lstrip("~")
        raise ValueError(f"{what} would have {big(n_states)} states, i.e. {big(entries)} (state, token) entries per "
                         f"layered table ({gib} GiB), more than the limit MAX_TABLE_ENTRIES = {MAX_TABLE_ENTRIES:,}; "
                         f"{fix}, or raise rto_sim.mdp.MAX_TABLE_ENTRIES on a machine with the memory")


def _tree_states(P: int, b: int, H: int, eos: bool) -> int:
    """Number of states of the prefix tree (P prompts, branching b, horizon H, one absorbing state per layer
    with EOS), computed without building it (exact big-int arithmetic; capped for absurd H)."""
    extra = H - 1 if eos else 0
    if b == 1:
        return P * H + extra
    if H * np.log2(b) > 4096:
        return P * 2**4096
    return P * (b**H - 1) // (b - 1) + extra


def _check_rho(rho, n_prompts: int) -> np.ndarray:
    if rho is None:
        return np.full(n_prompts, 1.0 / n_prompts)
    rho = np.asarray(rho, dtype=float)
    if rho.shape != (n_prompts,):
        raise ValueError(f"rho must have shape ({n_prompts},) (one mass per prompt), got {rho.shape}")
    if np.any(~np.isfinite(rho)) or np.any(rho < 0):
        raise ValueError("rho must be finite and non-negative; fix the prompt distribution")
    if np.any(rho == 0):
        bad = np.flatnonzero(rho == 0).tolist()
        raise ValueError(f"rho has prompts with zero mass at indices {bad}: drop those prompts or give "
                         "them positive mass")
    if abs(rho.sum() - 1.0) > 1e-8:
        raise ValueError(f"rho must sum to 1, got {rho.sum():.6g}; normalize it (rho / rho.sum())")
    return rho


@dataclass(eq=False)
class TokenMDP:
    """Layered deterministic token MDP with a reference policy. Build it with `TokenMDP.tree`,
    `TokenMDP.last_token_automaton`, `TokenMDP.position` or `TokenMDP.from_automaton`."""

    A: int
    H: int
    rho: np.ndarray                       # (P,) prompt distribution, strictly positive
    next_state: list                      # H-1 arrays (n_h, A) int64
    absorbing: list                       # H arrays (n_h,) bool
    last_token: list                      # H arrays (n_h,) int64
    prompt_of: list                       # H arrays (n_h,) int64
    eos: int | None = None                # EOS token id (A - 1) or None
    kind: str = "automaton"               # "tree", "last_token", "position" or "automaton"
    log_pi_ref: list = field(default_factory=list)   # H arrays (n_h, A)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tree(cls, A: int, H: int, n_prompts: int = 1, eos: bool = False, rho=None, pi_ref=None,
             ref_temperature: float = 1.0, seed: int | None = 0) -> TokenMDP:
        """Full prefix tree: one state per (prompt, prefix). With `eos`, token A-1 is EOS and every
        prefix that emitted it goes to one absorbing state per layer. Vectorized."""
        _check_sizes(A, H, n_prompts)
        P = int(n_prompts)
        b = A - 1 if eos else A                    # branching of live prefixes
        _check_table_size(f"TokenMDP.tree(A={A}, H={H}, n_prompts={P}, eos={eos})", _tree_states(P, b, H, eos), A,
                          "use a smaller A, H or n_prompts, or an aggregated automaton (TokenMDP.last_token_automaton, "
                          "TokenMDP.position), whose recursions cost the same per state")
        live = [P * b**h for h in range(H)]
        n = [live[0]] + [live[h] + (1 if eos else 0) for h in range(1, H)]
        nxt, absorbing, last, prompt = [], [], [], []
        for h in range(H):
            s = np.arange(n[h])
            is_abs = s >= live[h]
            absorbing.append(is_abs)
            last.append(np.full(n[h], -1) if h == 0 else np.where(is_abs, A - 1, s % b))
            prompt.append(np.where(is_abs, -1, s // b**h))
            if h < H - 1:
                t = np.zeros((n[h], A), dtype=np.int64)
                t[:, :b] = s[:, None] * b + np.arange(b)[None, :]
                if eos:
                    t[:, A - 1] = live[h + 1]
                    t[is_abs, :] = live[h + 1]
                nxt.append(t)
        mdp = cls(A=A, H=H, rho=_check_rho(rho, P), next_state=nxt, absorbing=absorbing,
                  last_token=[x.astype(np.int64) for x in last],
                  prompt_of=[x.astype(np.int64) for x in prompt], eos=A - 1 if eos else None, kind="tree")
        return mdp._init_reference(pi_ref, ref_temperature, seed)

    @classmethod
    def last_token_automaton(cls, A: int, H: int, n_prompts: int = 1, eos: bool = False, rho=None, pi_ref=None,
                   ref_temperature: float = 1.0, seed: int | None = 0) -> TokenMDP:
        """Aggregated state q = (prompt, h, last token): a bigram automaton. State (p, EOS) is
        absorbing. Vectorized."""
        _check_sizes(A, H, n_prompts)
        P = int(n_prompts)
        _check_table_size(f"TokenMDP.last_token_automaton(A={A}, H={H}, n_prompts={P})", P + (H - 1) * P * A, A,
                          "use a smaller A, H or n_prompts")
        nxt, absorbing, last, prompt = [], [], [], []
        for h in range(H):
            if h == 0:
                absorbing.append(np.zeros(P, bool))
                last.append(np.full(P, -1, np.int64))
                prompt.append(np.arange(P, dtype=np.int64))
                if H > 1:
                    nxt.append(np.arange(P)[:, None] * A + np.arange(A)[None, :])
                continue
            s = np.arange(P * A)
            p, l = s // A, s % A
            is_abs = (l == A - 1) if eos else np.zeros(P * A, bool)
            absorbing.append(is_abs)
            last.append(l.astype(np.int64))
            prompt.append(p.astype(np.int64))
            if h < H - 1:
                t = p[:, None] * A + np.arange(A)[None, :]
                t[is_abs, :] = (p[is_abs] * A + A - 1)[:, None]
                nxt.append(t.astype(np.int64))
        mdp = cls(A=A, H=H, rho=_check_rho(rho, P), next_state=nxt, absorbing=absorbing, last_token=last,
                  prompt_of=prompt, eos=A - 1 if eos else None, kind="last_token")
        return mdp._init_reference(pi_ref, ref_temperature, seed)

    @classmethod
    def position(cls, A: int, H: int, n_prompts: int = 1, eos: bool = False, **kw) -> TokenMDP:
        """Aggregated state q = (prompt, h): the coarsest automaton (positional rewards only)."""
        mdp = cls.from_automaton(A, H, initial=list(range(n_prompts)), step=lambda q, a: q, eos=eos, **kw)
        mdp.kind = "position"
        return mdp

    @classmethod
    def from_automaton(cls, A: int, H: int, initial: Sequence[Hashable],
                       step: Callable[[Hashable, int], Hashable], eos: bool = False, rho=None, pi_ref=None,
                       ref_temperature: float = 1.0, seed: int | None = 0) -> TokenMDP:
        """Any deterministic automaton: `initial[p]` is the state of prompt p and `step(q, a)` the
        successor of q under a non-EOS token a. With `eos`, token A-1 leads to an absorbing state.
        The state must be a function of (prompt, prefix) only: that is what makes it an automaton."""
        _check_sizes(A, H, len(initial))
        P = len(initial)
        if len(set(initial)) != P:
            raise ValueError("initial: prompt states must be distinct (one state per prompt)")
        fix = "use a smaller A or H, or an automaton with fewer states"
        _check_table_size(f"TokenMDP.from_automaton(A={A}, H={H}) with {P} prompts", P + H - 1, A, fix)
        total = P
        keys = list(initial)
        last = [np.full(P, -1, np.int64)]
        prompt = [np.arange(P, dtype=np.int64)]
        absorbing = [np.zeros(P, bool)]
        nxt = []
        for h in range(H - 1):
            # the next layer has at most len(keys) * A states: refuse before building it (Python objects per state)
            _check_table_size(f"TokenMDP.from_automaton(A={A}, H={H}) (layer {h + 2} may reach {len(keys) * A:,} "
                              "states)", total + len(keys) * A, A, fix)
            new_keys: list = []
            new_index: dict = {}
            new_last: list = []
            new_prompt: list = []
            t = np.zeros((len(keys), A), dtype=np.int64)
            for i, q in enumerate(keys):
                for a in range(A):
                    if q == _ABSORB or (eos and a == A - 1):
                        child, tok = _ABSORB, A - 1
                    else:
                        child, tok = step(q, a), a
                    j = new_index.get(child)
                    if j is None:
                        j = new_index[child] = len(new_keys)
                        new_keys.append(child)
                        new_last.append(tok)
                        new_prompt.append(prompt[h][i])
                    else:
                        if new_last[j] != tok:
                            new_last[j] = -2
                        if new_prompt[j] != prompt[h][i]:
                            new_prompt[j] = -1
                    t[i, a] = j
            nxt.append(t)
            keys = new_keys
            total += len(keys)
            last.append(np.array(new_last, np.int64))
            prompt.append(np.array(new_prompt, np.int64))
            absorbing.append(np.array([k == _ABSORB for k in keys], bool))
        mdp = cls(A=A, H=H, rho=_check_rho(rho, P), next_state=nxt, absorbing=absorbing, last_token=last,
                  prompt_of=prompt, eos=A - 1 if eos else None, kind="automaton")
        return mdp._init_reference(pi_ref, ref_temperature, seed)

    # ------------------------------------------------------------------ reference policy
    def _init_reference(self, pi_ref, temperature: float, seed) -> TokenMDP:
        if pi_ref is None:
            pi_ref = self.random_policy(temperature=temperature, seed=seed)
        self.log_pi_ref = [safe_log(p) for p in self.check_policy(pi_ref, "pi_ref")]
        return self

    def random_policy(self, temperature: float = 1.0, seed: int | None = 0) -> Layered:
        """softmax(z / temperature) with z ~ N(0, 1) per (state, token); delta_EOS in absorbing states."""
        if not temperature > 0:
            raise ValueError(f"ref_temperature must be > 0, got {temperature}")
        rng = np.random.default_rng(seed)
        out = []
        for h in range(self.H):
            z = rng.standard_normal((self.n_states[h], self.A)) / temperature
            p = np.exp(z - z.max(axis=1, keepdims=True))
            out.append(p / p.sum(axis=1, keepdims=True))
        return self.force_absorbing(out)

    def with_reference(self, pi_ref: Layered) -> TokenMDP:
        """A copy of this MDP with another reference policy (structure shared)."""
        new = TokenMDP(A=self.A, H=self.H, rho=self.rho, next_state=self.next_state, absorbing=self.absorbing,
                       last_token=self.last_token, prompt_of=self.prompt_of, eos=self.eos, kind=self.kind)
        new.log_pi_ref = [safe_log(p) for p in new.check_policy(pi_ref, "pi_ref")]
        return new

    @property
    def pi_ref(self) -> Layered:
        return [np.exp(lp) for lp in self.log_pi_ref]

    # ------------------------------------------------------------------ structure helpers
    @property
    def n_states(self) -> list[int]:
        return [len(a) for a in self.absorbing]

    @property
    def n_prompts(self) -> int:
        return len(self.rho)

    @property
    def num_responses(self) -> int:
        """Number of distinct complete responses per prompt (K)."""
        if self.eos is None:
            return self.A**self.H
        b = self.A - 1
        return sum(b**k for k in range(self.H)) + b**self.H   # EOS after k live tokens, or none

    def states_of(self, prompt: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(n, H) layer-wise states s_1..s_H visited by the token sequences `actions` (n, H) from the prompts
        `prompt` (n,) (the deterministic transition, applied layer by layer)."""
        actions = np.asarray(actions, np.int64)
        states = np.zeros_like(actions)
        states[:, 0] = prompt
        for h in range(self.H - 1):
            states[:, h + 1] = self.next_state[h][states[:, h], actions[:, h]]
        return states

    def flat_offsets(self) -> np.ndarray:
        """Offsets of each layer in a flat state index (for gymnasium observations)."""
        return np.concatenate([[0], np.cumsum(self.n_states)]).astype(np.int64)

    def force_absorbing(self, policy: Layered) -> Layered:
        """Return the policy with delta_EOS rows in absorbing states (copies)."""
        out = []
        for h, p in enumerate(policy):
            p = np.array(p, dtype=float, copy=True)
            if self.absorbing[h].any():
                p[self.absorbing[h]] = 0.0
                p[self.absorbing[h], self.eos] = 1.0
            out.append(p)
        return out

    def _layered_arrays(self, layered, name: str) -> list[np.ndarray]:
        return layered_arrays(layered, self.n_states, self.A, name)

    def check_policy(self, policy, name: str = "policy") -> Layered:
        """Validate a layered policy (shapes, non-negative rows summing to 1); absorbing rows are forced
        to delta_EOS as the model requires."""
        out = []
        for h, p in enumerate(self._layered_arrays(policy, name)):
            live = ~self.absorbing[h]
            err = row_sum_errors(p, f"{name}[{h}]")[live]
            if err.size and err.max() > 1e-8:
                row = int(np.flatnonzero(live)[np.argmax(err)])
                raise ValueError(f"{name}[{h}] row {row} sums to {p[row].sum():.6g}, not 1: normalize each "
                                 "row (p / p.sum(axis=1, keepdims=True))")
            out.append(p)
        return self.force_absorbing(out)

    def check_reward(self, reward, name: str = "reward") -> Layered:
        out = []
        for h, r in enumerate(self._layered_arrays(reward, name)):
            bad = ~np.isfinite(r)
            if np.any(bad):
                s, a = (int(i[0]) for i in np.nonzero(bad))
                raise ValueError(f"{name}[{h}] has non-finite entries ({r[s, a]} at state {s}, token {a}): rewards "
                                 "must be finite numbers; look for NaN or infinity in theta or the reward table")
            r = r.copy()
            r[self.absorbing[h]] = 0.0          # absorbing: zero reward
            out.append(r)
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "A": self.A, "H": self.H, "n_prompts": self.n_prompts,
                "eos": self.eos is not None, "n_states": int(sum(self.n_states)),
                "responses_per_prompt": self.num_responses}


def layered_arrays(layered, n_states: list[int], A: int, name: str) -> list[np.ndarray]:
    """The H float arrays of a layered table, each checked to have shape (n_states[h], A)."""
    H = len(n_states)
    if not isinstance(layered, (list, tuple)) or len(layered) != H:
        raise ValueError(f"{name} must be a list of H={H} arrays of shape (n_h, A)")
    out = [np.asarray(x, dtype=float) for x in layered]
    for h, x in enumerate(out):
        if x.shape != (n_states[h], A):
            raise ValueError(f"{name}[{h}] must have shape ({n_states[h]}, {A}), got {x.shape}")
    return out


def row_sum_errors(p: np.ndarray, name: str, axis: int = -1) -> np.ndarray:
    """|sum over `axis` - 1| of a table of distributions `p`; negative or non-finite entries are an error naming
    `name`."""
    if np.any(~np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{name} has negative or non-finite entries: rows must be distributions")
    return np.abs(p.sum(axis=axis) - 1.0)


def gather(layered: Layered, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """(n, H) values layered[h][states[:, h], actions[:, h]]: a layered (n_h, A) table read along n responses
    (the one implementation of this look-up)."""
    return np.stack([layered[h][states[:, h], actions[:, h]] for h in range(states.shape[1])], axis=1)


@dataclass
class Responses:
    """Responses on a layered MDP: prompt (n,) prompt index, actions (n, H) tokens y_1..y_H (EOS-padded after
    the first EOS), states (n, H) layer-wise state indices s_1..s_H. The base of `exact.Enumeration` (every
    response) and `sampling.Trajectories` (sampled responses, with a mask)."""

    prompt: np.ndarray
    actions: np.ndarray
    states: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def gather(self, layered: Layered) -> np.ndarray:
        """(n, H) values layered[h][s_h, a_h]."""
        return gather(layered, self.states, self.actions)

    def returns(self, reward: Layered) -> np.ndarray:
        """(n,) R(y) = sum_h r(s_h, a_h)."""
        return self.gather(reward).sum(axis=1)


def safe_log(p: np.ndarray) -> np.ndarray:
    """log p with log 0 = -inf and no warning."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, -np.inf)
    np.log(p, out=out, where=p > 0)
    return out


def is_real_number(x) -> bool:
    """A real number (Python or numpy scalar, or a 0-d numeric array); not a bool or a string."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, numbers.Real):
        return True
    return isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf"


def check_beta(beta: float, name: str = "beta") -> float:
    if not is_real_number(beta):
        raise ValueError(f"{name} must be a positive number (KL coefficient), got {beta!r}")
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"{name} must be > 0 (KL coefficient), got {beta!r}; for the unregularized argmax "
                         "use a small positive beta or `argmax_policy`")
    return float(beta)
