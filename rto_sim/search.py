"""Reward-query search for the most likely response (RTO Proposition 3.2, docs/theory.md section 5).

One prompt, the full A-ary prefix tree of depth H (no EOS), an evaluator policy pi_e. The learner wants
y* = argmax_y pi_e(y) and pays one unit per *full-response query*:

    sentence oracle   query(y) -> r_s(y) = log pi_e(y)                     (one number per response)
    token oracle      query(y) -> (r_t(s_h, y_h))_h = (log pi_e(y_h | y_<h))_h   (H numbers: every
                      prefix probability P(y_1..y_h) on the queried path becomes known)

Learners (each returns a `SearchResult` with the exact number of oracle queries):

    sentence_search   black-box enumeration: a generic sentence reward can hide the maximum in any
                      response not yet queried, so certifying the argmax takes all A^H queries.
    token_search      pruning search. A known prefix v is *pruned* once its upper bound on any leaf
                      below it is <= best (the best full response found so far); every query is a
                      full path through unpruned nodes; the search stops when no such path is left,
                      so the result is the exact argmax (certified, not guessed).
                      strategy "best_first": extend the known unpruned node with the largest upper
                      bound (the node reached first by its lowest-index unknown child, the rest of the
                      path by token 0); "dfs": lexicographic depth-first order.
                      rule "known": the upper bound of an unknown child of v is P(v) (the learner only
                      uses prefix probabilities, the paper's learner); "residual": P(v) minus the mass
                      of v's known children (also uses that pi_e(.|v) sums to one).

Bounds (xi = -log_A max_y pi_e(y) is the real-valued, smallest xi satisfying RTO Assumption 3.1):

    paper_bound(A, H, xi)      = A^min(xi+1, H)                     (the count RTO Prop. 3.2 states)
    corrected_bound(A, H, xi)  = min(A^H, H A^(xi+1) + A^xi)        (docs/theory.md section 5)
    instance_upper_bound(inst) = min(A^H, A * #{v : depth(v) < H, P(v) >= p*})
        holds for best_first under both rules: every query's first new node is a child of a known node
        v with upper bound > best, and best-first never extends a node with P(v) < p* (the deepest known
        node on y*'s path has P >= p* and an unknown child until y* is found). Since at most A^xi
        prefixes of one depth have probability >= p* = A^-xi, this is <= A (1 + (H-1) A^xi) <=
        corrected_bound.
    instance_lower_bound(inst) = max_k A * #{v : depth(v) = k < H, P(v) > p*}
        holds for the "known" rule under ANY strategy: at termination every node with P(v) > p* has all
        its children known, and one query reveals one node per depth.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from .exact import occupancy
from .mdp import Layered, TokenMDP, safe_log

STRATEGIES = ("best_first", "dfs")
RULES = ("known", "residual")
_EPS = 1e-12          # log-space slack: a prefix whose bound is within _EPS of best cannot improve on it


# ---------------------------------------------------------------------- instance
@dataclass
class SearchInstance:
    """An evaluator policy on the full A-ary tree of depth H.

    log_cond[k]:   (A^k, A) log pi_e(a | prefix) at depth k (k = 0..H-1; prefix index in base A)
    log_prefix[k]: (A^k,)  log P(prefix) for k = 0..H (k = H: the responses, log pi_e(y))
    y_star:        (H,) tokens of argmax_y pi_e(y) (lowest index on ties); p_star = pi_e(y_star)
    xi:            -log_A p_star (real-valued; the smallest xi with max_y pi_e(y) >= A^-xi)."""

    A: int
    H: int
    log_cond: Layered
    log_prefix: list
    family: str = "custom"

    @classmethod
    def from_policy(cls, mdp: TokenMDP, policy: Layered, family: str = "custom") -> SearchInstance:
        """pi_e given as a layered policy on `TokenMDP.tree(A, H, n_prompts=1, eos=False)`."""
        if mdp.kind != "tree" or mdp.eos is not None or mdp.n_prompts != 1:
            raise ValueError("mdp must be TokenMDP.tree(A, H, n_prompts=1, eos=False): Proposition 3.2 is stated "
                             "for one prompt on the full A-ary tree")
        policy = mdp.check_policy(policy, "pi_e")
        d = occupancy(mdp, policy)                       # prefix probabilities, depth 0..H-1
        log_prefix = [safe_log(x) for x in d]
        leaf = d[-1][:, None] * policy[-1]
        log_prefix.append(safe_log(leaf.ravel()))
        return cls(A=mdp.A, H=mdp.H, log_cond=[safe_log(p) for p in policy], log_prefix=log_prefix, family=family)

    @property
    def num_responses(self) -> int:
        return self.A**self.H

    @property
    def log_p_star(self) -> float:
        return float(self.log_prefix[-1].max())

    @property
    def p_star(self) -> float:
        return math.exp(self.log_p_star)

    @property
    def xi(self) -> float:
        return -self.log_p_star / math.log(self.A)

    @property
    def y_star(self) -> np.ndarray:
        return index_to_tokens(int(np.argmax(self.log_prefix[-1])), self.A, self.H)

    def log_prob(self, tokens) -> float:
        return float(self.log_prefix[-1][tokens_to_index(tokens, self.A)])


def index_to_tokens(index: int, A: int, H: int) -> np.ndarray:
    """Base-A digits of a depth-H node index (most significant = first token)."""
    return (index // A ** np.arange(H - 1, -1, -1)) % A


def tokens_to_index(tokens, A: int) -> int:
    idx = 0
    for t in np.asarray(tokens, dtype=np.int64):
        idx = idx * A + int(t)
    return idx


def make_instance(A: int, H: int, family: str = "softmax", temperature: float = 1.0, q: float = 0.9,
                  m: int = 1, seed: int = 0) -> SearchInstance:
    """Evaluator policies with controllable peakedness (which sets xi).

    softmax   pi_e(.|v) = softmax(z_v / temperature), z ~ N(0, 1) per node (small temperature = peaked)
    uniform   pi_e uniform (xi = H: the hardest case)
    spike     a random path gets conditional probability q at every step, the other tokens share 1 - q
              uniformly (xi = -H log_A q: long paths of near-certain tokens)
    tail      softmax(z) (temperature 1) for the first m tokens, then a deterministic token (pi_e = 1) at
              every later step: many prefixes tie with their best completion"""
    mdp = TokenMDP.tree(A, H, seed=seed)
    rng = np.random.default_rng(seed)
    if family == "softmax":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for family='softmax', got {temperature}")
        pol = mdp.random_policy(temperature=temperature, seed=seed)
    elif family == "uniform":
        pol = [np.full((n, A), 1.0 / A) for n in mdp.n_states]
    elif family == "spike":
        if not 0 < q < 1:
            raise ValueError(f"q (spike probability) must be in (0, 1), got {q}")
        path = rng.integers(0, A, size=H)
        pol = []
        for h in range(H):
            p = np.full((mdp.n_states[h], A), (1 - q) / (A - 1))
            p[:, path[h]] = q
            pol.append(p)
    elif family == "tail":
        if not 0 <= m <= H:
            raise ValueError(f"m (random prefix length) must be in [0, H], got {m}")
        pol = mdp.random_policy(temperature=1.0, seed=seed)
        for h in range(m, H):
            tok = rng.integers(0, A, size=mdp.n_states[h])
            pol[h] = np.eye(A)[tok]
    else:
        raise ValueError(f"unknown family {family!r}; use softmax, uniform, spike or tail")
    return SearchInstance.from_policy(mdp, pol, family=family)


# ---------------------------------------------------------------------- oracles
class SentenceOracle:
    """r_s(y) = log pi_e(y) for full responses; counts every response queried (`queries`)."""

    def __init__(self, inst: SearchInstance):
        self._inst = inst
        self.queries = 0

    def query(self, tokens: np.ndarray) -> np.ndarray:
        """tokens: (n, H) responses -> (n,) log pi_e(y)."""
        tokens = np.atleast_2d(np.asarray(tokens, dtype=np.int64))
        A, H = self._inst.A, self._inst.H
        if tokens.shape[1] != H or tokens.min() < 0 or tokens.max() >= A:
            raise ValueError(f"a query is a full response: shape (n, {H}) with tokens in [0, {A})")
        self.queries += len(tokens)
        idx = tokens @ (A ** np.arange(H - 1, -1, -1))
        return self._inst.log_prefix[-1][idx]


class TokenOracle:
    """r_t(s_h, y_h) = log pi_e(y_h | y_<h) along one full response; counts queries (`queries`)."""

    def __init__(self, inst: SearchInstance):
        self._inst = inst
        self.queries = 0

    def query(self, tokens) -> np.ndarray:
        """tokens: (H,) one response -> (H,) token rewards."""
        tokens = np.asarray(tokens, dtype=np.int64)
        A, H = self._inst.A, self._inst.H
        if tokens.shape != (H,) or tokens.min() < 0 or tokens.max() >= A:
            raise ValueError(f"a query is one full response: shape ({H},) with tokens in [0, {A})")
        self.queries += 1
        out = np.empty(H)
        node = 0
        for h in range(H):
            out[h] = self._inst.log_cond[h][node, tokens[h]]
            node = node * A + int(tokens[h])
        return out


@dataclass
class SearchResult:
    """y: (H,) returned response; log_value: its log pi_e; queries: oracle calls (full responses)."""

    y: np.ndarray
    log_value: float
    queries: int


# ---------------------------------------------------------------------- learners
def sentence_search(oracle: SentenceOracle, A: int, H: int, batch: int = 65536) -> SearchResult:
    """Black-box argmax of a sentence reward: query every response (vectorized in batches)."""
    best, best_idx = -np.inf, 0
    K = A**H
    for start in range(0, K, batch):
        idx = np.arange(start, min(K, start + batch))
        toks = (idx[:, None] // A ** np.arange(H - 1, -1, -1)[None, :]) % A
        v = oracle.query(toks)
        j = int(np.argmax(v))
        if v[j] > best:
            best, best_idx = float(v[j]), int(idx[j])
    return SearchResult(y=index_to_tokens(best_idx, A, H), log_value=best, queries=oracle.queries)


def sentence_mass_aware_count(inst: SearchInstance) -> int:
    """Queries of a sentence learner that ALSO knows r_s is the log of a normalized distribution: in
    lexicographic order it can stop once the unqueried mass 1 - sum(queried) is <= the best found.
    (Not part of the paper's black-box model; reported to show what the A^H count assumes.)"""
    p = np.exp(inst.log_prefix[-1])
    rest = 1.0 - np.cumsum(p)
    best = np.maximum.accumulate(p)
    stop = np.flatnonzero(rest <= best * (1 + 1e-12))
    return int(stop[0]) + 1 if stop.size else len(p)


class _Tree:
    """The token learner's knowledge: known prefixes, their log-probabilities and known-children mass."""

    def __init__(self, A: int, H: int, rule: str):
        self.A, self.H, self.rule = A, H, rule
        self.known = [np.zeros(A**k, bool) for k in range(H + 1)]
        self.logp = [np.full(A**k, -np.inf) for k in range(H + 1)]
        self.child_mass = [np.zeros(A**k) for k in range(H)]
        self.n_known_children = [np.zeros(A**k, np.int64) for k in range(H)]
        self.known[0][0] = True
        self.logp[0][0] = 0.0
        self.best, self.best_idx = -np.inf, -1

    def bound(self, k: int, v: int) -> float:
        """Upper bound on log P of any leaf reached through an UNKNOWN child of node v at depth k."""
        if self.rule == "known":
            return float(self.logp[k][v])
        rest = math.exp(self.logp[k][v]) - self.child_mass[k][v]
        return math.log(rest) if rest > 0 else -np.inf

    def open(self, k: int, v: int) -> bool:
        """v has an unknown child that could still beat the best response."""
        return self.n_known_children[k][v] < self.A and self.bound(k, v) > self.best + _EPS

    def reveal(self, oracle: TokenOracle, tokens: np.ndarray) -> list:
        """Query a full path; record every prefix probability; return the newly known (depth, node)."""
        r = oracle.query(tokens)
        lp = np.concatenate([[0.0], np.cumsum(r)])
        new, node = [], 0
        for k in range(1, self.H + 1):
            parent, node = node, node * self.A + int(tokens[k - 1])
            if not self.known[k][node]:
                self.known[k][node] = True
                self.logp[k][node] = lp[k]
                self.n_known_children[k - 1][parent] += 1
                self.child_mass[k - 1][parent] += math.exp(lp[k])
                new.append((k, node))
        if lp[-1] > self.best:
            self.best, self.best_idx = float(lp[-1]), node
        return new

    def path(self, k: int, v: int, a: int) -> np.ndarray:
        """Tokens of prefix v (depth k), then a, then token 0 down to depth H."""
        return np.concatenate([index_to_tokens(v, self.A, k), [a], np.zeros(self.H - k - 1, np.int64)]).astype(
            np.int64)

    def first_unknown_child(self, k: int, v: int) -> int:
        kids = self.known[k + 1][v * self.A:(v + 1) * self.A]
        return int(np.flatnonzero(~kids)[0])


def token_search(oracle: TokenOracle, A: int, H: int, strategy: str = "best_first", rule: str = "known",
                 max_queries: int | None = None) -> SearchResult:
    """Exact pruning search with token rewards (see module docstring). Returns the certified argmax."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    cap = A**H if max_queries is None else int(max_queries)
    t = _Tree(A, H, rule)
    if strategy == "best_first":
        heap = [(-0.0, 0, 0)]                       # (-bound, depth, node)
        while heap and oracle.queries < cap:
            negb, k, v = heapq.heappop(heap)
            if -negb <= t.best + _EPS:              # keys only over-estimate bounds: nothing left can beat best
                break
            if not t.open(k, v):
                continue
            b = t.bound(k, v)
            if b < -negb - 1e-15:                   # stale key (residual mass shrank): re-queue
                heapq.heappush(heap, (-b, k, v))
                continue
            new = t.reveal(oracle, t.path(k, v, t.first_unknown_child(k, v)))
            for kk, u in new:
                if kk < H:
                    heapq.heappush(heap, (-t.bound(kk, u), kk, u))
            if t.n_known_children[k][v] < A:
                heapq.heappush(heap, (-t.bound(k, v), k, v))
    else:
        _dfs(t, oracle, 0, 0, cap)
    return SearchResult(y=index_to_tokens(t.best_idx, A, H), log_value=t.best, queries=oracle.queries)


def _dfs(t: _Tree, oracle: TokenOracle, k: int, v: int, cap: int) -> None:
    """Lexicographic depth-first pruning search below the known node v (depth k < H)."""
    for a in range(t.A):
        if oracle.queries >= cap:
            return
        u = v * t.A + a
        if not t.known[k + 1][u]:
            if t.bound(k, v) <= t.best + _EPS:
                continue
            t.reveal(oracle, t.path(k, v, a))
        if k + 1 < t.H and t.logp[k + 1][u] > t.best + _EPS:
            _dfs(t, oracle, k + 1, u, cap)


# ---------------------------------------------------------------------- bounds
def paper_bound(A: int, H: int, xi: float) -> float:
    """RTO Proposition 3.2's token-query count A^min(xi+1, H)."""
    return float(A) ** min(xi + 1.0, H)


def corrected_bound(A: int, H: int, xi: float) -> float:
    """min(A^H, H A^(xi+1) + A^xi) (docs/theory.md section 5)."""
    return min(float(A) ** H, H * float(A) ** (xi + 1.0) + float(A) ** xi)


def instance_upper_bound(inst: SearchInstance, rel_tol: float = 1e-9) -> int:
    """min(A^H, A * #{prefixes v of depth < H with P(v) >= p*}) (best-first token search, any rule)."""
    thr = inst.log_p_star + math.log1p(-rel_tol)
    n = sum(int((lp >= thr).sum()) for lp in inst.log_prefix[:-1])
    return min(inst.A**inst.H, inst.A * n)


def instance_lower_bound(inst: SearchInstance, rel_tol: float = 1e-9) -> int:
    """max over depths k < H of A * #{v at depth k with P(v) > p*} ("known" rule, any strategy), >= 1."""
    thr = inst.log_p_star + math.log1p(rel_tol)
    return max(1, max(inst.A * int((lp > thr).sum()) for lp in inst.log_prefix[:-1]))


def run_instance(inst: SearchInstance, strategies=STRATEGIES, rules=RULES) -> dict:
    """All learners on one instance: query counts, exactness and the bounds (one results row)."""
    A, H = inst.A, inst.H
    row = {"A": A, "H": H, "family": inst.family, "K": A**H, "p_star": inst.p_star, "xi": inst.xi,
           "xi_ceil": math.ceil(inst.xi - 1e-9)}
    so = SentenceOracle(inst)
    res = sentence_search(so, A, H)
    row["sentence_queries"] = res.queries
    row["sentence_exact"] = bool(abs(res.log_value - inst.log_p_star) <= 1e-9)
    row["sentence_mass_aware_queries"] = sentence_mass_aware_count(inst)
    for s in strategies:
        for r in rules:
            to = TokenOracle(inst)
            res = token_search(to, A, H, strategy=s, rule=r)
            row[f"token_{s}_{r}_queries"] = res.queries
            row[f"token_{s}_{r}_exact"] = bool(res.log_value >= inst.log_p_star - 1e-9)
    row["paper_bound"] = paper_bound(A, H, inst.xi)
    row["paper_bound_ceil"] = paper_bound(A, H, row["xi_ceil"])
    row["corrected_bound"] = corrected_bound(A, H, inst.xi)
    row["instance_upper_bound"] = instance_upper_bound(inst)
    row["instance_lower_bound"] = instance_lower_bound(inst)
    return row
