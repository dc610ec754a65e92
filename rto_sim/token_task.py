"""A token task with a gold reward, for training neural policies against exact truth (experiment E8).

A :class:`TokenTask` is a `TokenMDP` with EOS (`eos=True`: the last action id A-1 is EOS), a linear
feature map and a gold parameter theta*, so the gold reward of a response is R(y) = <psi(y), theta*>.
It adds what a text trainer needs: a word per action (task tokens, by default ``a0 .. a{A-2}`` and the
EOS word ``<eos>``) and a word per prompt (``p0 .. p{P-1}``), the prompt distribution rho, the horizon H and
the KL coefficient beta of the evaluation.

A **response** is a list of action ids, exactly as `enumerate_responses` lists them: either EOS-terminated
with at most H tokens in all (EOS last and only there), or exactly H non-EOS tokens (the horizon ran out,
as with ``max_new_tokens = H``). Anything else (empty, too long, tokens after EOS, fewer than H tokens
without EOS, ids outside [0, A)) is invalid and raises.

Functions: gold returns of any response (`gold_return`, `gold_returns`: a walk through `mdp.next_state`),
every valid response of every prompt with its gold R (`enumerate`), SFT rows sampled from the MDP's
pi_ref (`sample_responses`, `sft_rows`), Bradley-Terry labels sampled (never argmax) for given pairs
(`label_pairs`), the prefix-tree view of an automaton task (`lift_to_tree`) and `to_json` / `from_json`
(a ``task.json`` that rebuilds the task exactly and checks that it did).

Build one with :func:`make_token_task` (serializable); `TokenTask(mdp, features, theta, beta)` built from
objects works everywhere except `to_json`. numpy / scipy only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from .exact import MAX_ENUMERATED, Enumeration, enumerate_responses
from .features import FEATURE_KINDS, FeatureMap, draw_theta, make_features
from .mdp import Layered, TokenMDP
from .sampling import sample_categorical

FORMAT = "rto_token_task/1"
STRUCTURES = ("tree", "last_token", "position")
DEFAULT_EOS_WORD = "<eos>"
N_CHECK = 16          # responses whose gold R and log pi_ref are stored in task.json to verify a rebuild


def _check_words(words, n: int, field_name: str, fix: str) -> list[str]:
    words = list(words)
    if len(words) != n:
        raise ValueError(f"{field_name} must have {n} entries, got {len(words)}; {fix}")
    for w in words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"{field_name} entry {w!r} must be a non-empty string without whitespace (the "
                             "tokenizer splits on whitespace); rename it")
    if len(set(words)) != n:
        dup = sorted({w for w in words if words.count(w) > 1})
        raise ValueError(f"{field_name} has duplicate words {dup}; every word must be distinct")
    return words


@dataclass
class TaskResponses:
    """Every valid response of every prompt (rows = prompts x responses, the `enumerate_responses` order).

    prompt (N,) prompt index; actions (N, H) action ids, EOS-padded after the first EOS; length (N,) tokens
    of the response (through EOS; H without EOS); returns (N,) gold R; log_pi_ref (N,) log pi_ref(y|x) of
    the simulator's reference; enum: the underlying `Enumeration` (task states)."""

    prompt: np.ndarray
    actions: np.ndarray
    length: np.ndarray
    returns: np.ndarray
    log_pi_ref: np.ndarray
    enum: Enumeration

    def __len__(self) -> int:
        return len(self.prompt)

    def response(self, i: int) -> list[int]:
        """Row i as the token list of a response (EOS included when present)."""
        return self.actions[i, : self.length[i]].tolist()

    def responses(self) -> list[list[int]]:
        return [self.response(i) for i in range(len(self))]


@dataclass
class PairLabels:
    """Bradley-Terry labels of pairs: P(first > second) = sigmoid(R(first) - R(second)), label sampled."""

    prompt: np.ndarray          # (n,)
    chosen: list                # n token lists
    rejected: list              # n token lists
    chosen_return: np.ndarray   # (n,) gold R of the chosen response
    rejected_return: np.ndarray
    p_first: np.ndarray         # (n,) sigmoid(R(first) - R(second))
    first_preferred: np.ndarray  # (n,) bool: the sampled label

    def __len__(self) -> int:
        return len(self.prompt)


@dataclass(eq=False)
class TokenTask:
    """A token MDP with EOS, features, gold theta*, words and beta. See the module docstring."""

    mdp: TokenMDP
    features: FeatureMap
    theta: np.ndarray
    beta: float = 1.0
    token_words: list = None          # A words; the last one is the EOS word
    prompt_words: list = None         # P words
    recipe: dict | None = None        # how make_token_task built it (None: built from objects)
    reward: Layered = field(init=False, repr=False)

    def __post_init__(self):
        mdp = self.mdp
        if not isinstance(mdp, TokenMDP):
            raise ValueError(f"mdp must be a TokenMDP, got {type(mdp).__name__}")
        if mdp.eos is None or mdp.eos != mdp.A - 1:
            raise ValueError("mdp has no EOS action: build the TokenMDP with eos=True (the task's responses "
                             "end with EOS, which maps to the tokenizer's eos token)")
        if not isinstance(self.features, FeatureMap):
            raise ValueError(f"features must be a FeatureMap (make_features), got {type(self.features).__name__}")
        if len(self.features.index) != mdp.H or any(
                self.features.index[h].shape[:2] != (mdp.n_states[h], mdp.A) for h in range(mdp.H)):
            raise ValueError("features were not built on this mdp (layer shapes differ): call "
                             "make_features(mdp, kind) with this task's mdp")
        self.theta = self.features.check_theta(self.theta)
        if not np.all(np.isfinite(self.theta)):
            raise ValueError("theta has non-finite entries; draw it with draw_theta")
        if not (isinstance(self.beta, (int, float, np.floating)) and np.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta (KL coefficient of the evaluation) must be a finite number > 0, got {self.beta!r}")
        self.beta = float(self.beta)
        A, P = mdp.A, mdp.n_prompts
        if self.token_words is None:
            self.token_words = [f"a{i}" for i in range(A - 1)] + [DEFAULT_EOS_WORD]
        if self.prompt_words is None:
            self.prompt_words = [f"p{i}" for i in range(P)]
        self.token_words = _check_words(self.token_words, A, "token_words",
                                        f"give one word per action (A={A}), the EOS word last")
        self.prompt_words = _check_words(self.prompt_words, P, "prompt_words",
                                         f"give one word per prompt (n_prompts={P})")
        clash = sorted(set(self.token_words) & set(self.prompt_words))
        if clash:
            raise ValueError(f"token_words and prompt_words share {clash}: prompt words must differ from task "
                             "tokens (a response containing a prompt word is invalid)")
        self.reward = self.features.token_reward(self.theta)

    # ------------------------------------------------------------------ basic facts
    @property
    def A(self) -> int:
        return self.mdp.A

    @property
    def H(self) -> int:
        return self.mdp.H

    @property
    def n_prompts(self) -> int:
        return self.mdp.n_prompts

    @property
    def rho(self) -> np.ndarray:
        return self.mdp.rho

    @property
    def eos(self) -> int:
        return self.mdp.eos

    @property
    def eos_word(self) -> str:
        return self.token_words[self.eos]

    @property
    def num_responses(self) -> int:
        """Valid responses per prompt."""
        return self.mdp.num_responses

    # ------------------------------------------------------------------ responses and gold returns
    def check_response(self, tokens) -> list[int]:
        """Validate a response (see module docstring); returns it as a list of ints or raises ValueError."""
        try:
            toks = [int(t) for t in tokens]
        except (TypeError, ValueError) as e:
            raise ValueError(f"response must be a sequence of action ids, got {tokens!r}") from e
        if any(t < 0 or t >= self.A for t in toks):
            raise ValueError(f"response {toks} has ids outside [0, {self.A}): actions are 0..{self.A - 1} "
                             f"(EOS = {self.eos})")
        if not toks:
            raise ValueError("response is empty: a response ends with EOS or has exactly H tokens")
        if len(toks) > self.H:
            raise ValueError(f"response has {len(toks)} tokens, more than H={self.H}: cut it at H tokens")
        if self.eos in toks[:-1]:
            raise ValueError(f"response {toks} has tokens after EOS (id {self.eos}): cut it after the first EOS")
        if toks[-1] != self.eos and len(toks) != self.H:
            raise ValueError(f"response {toks} has {len(toks)} tokens and no EOS: a response ends with EOS or has "
                             f"exactly H={self.H} tokens")
        return toks

    def is_valid(self, tokens) -> bool:
        try:
            self.check_response(tokens)
            return True
        except ValueError:
            return False

    def _check_prompt(self, prompt) -> int:
        if not isinstance(prompt, (int, np.integer)) or not 0 <= int(prompt) < self.n_prompts:
            raise ValueError(f"prompt must be a prompt index in [0, {self.n_prompts}), got {prompt!r}")
        return int(prompt)

    def gold_return(self, prompt: int, tokens) -> float:
        """R(y) = sum_h r(s_h, y_h) along the walk from the prompt's state through `mdp.next_state`."""
        s = self._check_prompt(prompt)
        toks = self.check_response(tokens)
        R = 0.0
        for h, a in enumerate(toks):
            R += float(self.reward[h][s, a])
            if h < self.H - 1:
                s = int(self.mdp.next_state[h][s, a])
        return R

    def gold_returns(self, prompts, responses) -> np.ndarray:
        """(n,) gold returns of n (prompt, response) pairs."""
        prompts = list(prompts)
        responses = list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have equal length")
        return np.array([self.gold_return(p, y) for p, y in zip(prompts, responses)], dtype=float)

    def enumerate(self, max_rows: int = MAX_ENUMERATED) -> TaskResponses:
        """Every valid response of every prompt with its gold R and simulator log pi_ref (enumerate_responses)."""
        enum = enumerate_responses(self.mdp, max_rows=max_rows)
        return TaskResponses(prompt=enum.prompt, actions=enum.actions, length=enum.length,
                             returns=enum.returns(self.reward), log_pi_ref=enum.log_prob(self.mdp.log_pi_ref),
                             enum=enum)

    # ------------------------------------------------------------------ sampling and labelling
    def sample_responses(self, n: int, seed, prompts=None, policy: Layered | None = None):
        """Draw n (prompt, response) pairs: x ~ rho (or the given prompt indices), y ~ policy (default the
        MDP's pi_ref) by inverse-CDF per layer. Returns (prompts (n,), list of n token lists)."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (number of samples) must be an integer >= 1, got {n!r}")
        rng = np.random.default_rng(seed)
        pol = self.mdp.pi_ref if policy is None else self.mdp.check_policy(policy)
        if prompts is None:
            x = rng.choice(self.n_prompts, size=n, p=self.rho)
        else:
            x = np.asarray([self._check_prompt(p) for p in prompts], np.int64)
            if len(x) != n:
                raise ValueError(f"prompts has {len(x)} entries but n={n}")
        s = x.copy()
        actions = np.zeros((n, self.H), np.int64)
        for h in range(self.H):
            a = sample_categorical(pol[h][s], rng)
            actions[:, h] = a
            if h < self.H - 1:
                s = self.mdp.next_state[h][s, a]
        out = []
        for row in actions:
            hit = np.flatnonzero(row == self.eos)
            out.append(row[: hit[0] + 1].tolist() if hit.size else row.tolist())
        return x, out

    def label_pairs(self, prompts, first, second, seed) -> PairLabels:
        """Bradley-Terry labels on the gold return: first is chosen with probability sigmoid(R1 - R2), the
        label is drawn (never argmax, which would make the data separable)."""
        prompts = np.asarray(list(prompts), np.int64)
        first, second = list(first), list(second)
        if not (len(prompts) == len(first) == len(second)):
            raise ValueError(f"prompts, first and second must have equal length, got {len(prompts)}, "
                             f"{len(first)}, {len(second)}")
        if len(prompts) == 0:
            raise ValueError("no pairs to label: pass at least one (prompt, first, second) triple")
        R1, R2 = self.gold_returns(prompts, first), self.gold_returns(prompts, second)
        p = expit(R1 - R2)
        win = np.random.default_rng(seed).random(len(p)) < p
        chosen = [list(a) if w else list(b) for a, b, w in zip(first, second, win)]
        rejected = [list(b) if w else list(a) for a, b, w in zip(first, second, win)]
        return PairLabels(prompt=prompts, chosen=chosen, rejected=rejected, chosen_return=np.where(win, R1, R2),
                          rejected_return=np.where(win, R2, R1), p_first=p, first_preferred=win)

    # ------------------------------------------------------------------ text
    def prompt_text(self, prompt: int) -> str:
        return self.prompt_words[self._check_prompt(prompt)]

    def response_text(self, tokens) -> str:
        """Space-separated words of a valid response (the EOS word included when the response has EOS)."""
        return " ".join(self.token_words[a] for a in self.check_response(tokens))

    def parse_response(self, text: str) -> list[int]:
        """Inverse of `response_text`: words -> action ids (raises on unknown words or invalid responses)."""
        index = {w: i for i, w in enumerate(self.token_words)}
        bad = [w for w in text.split() if w not in index]
        if bad:
            raise ValueError(f"response text has words that are not task tokens: {bad[:5]}")
        return self.check_response([index[w] for w in text.split()])

    def sft_rows(self, n: int, seed) -> list[dict]:
        """n rows {"prompt", "response", "prompt_index", "R"} with x ~ rho and y ~ pi_ref of the MDP."""
        x, ys = self.sample_responses(n, seed)
        R = self.gold_returns(x, ys)
        return [{"prompt": self.prompt_words[p], "response": self.response_text(y), "prompt_index": int(p),
                 "R": float(r)} for p, y, r in zip(x, ys, R)]

    # ------------------------------------------------------------------ prefix-tree view
    def lift_to_tree(self) -> tuple[TokenMDP, Layered]:
        """The prefix tree of this task (`TokenMDP.tree` with the same A, H, prompts and rho) with the task's
        pi_ref and gold token reward copied onto it; returns (tree_mdp, tree_reward). Neural policies live
        on the tree; for a tree task this is a copy."""
        tree = TokenMDP.tree(self.A, self.H, n_prompts=self.n_prompts, eos=True, rho=self.rho, seed=0)
        owner = np.arange(self.n_prompts)       # task state of each tree state, layer by layer
        pi_ref, reward = [], []
        ref = self.mdp.pi_ref
        for h in range(self.H):
            live = ~tree.absorbing[h]
            p = np.zeros((tree.n_states[h], self.A))
            r = np.zeros((tree.n_states[h], self.A))
            p[live], r[live] = ref[h][owner[live]], self.reward[h][owner[live]]
            pi_ref.append(p)
            reward.append(r)
            if h < self.H - 1:
                nxt = np.zeros(tree.n_states[h + 1], np.int64)
                src = np.flatnonzero(live)
                nxt[tree.next_state[h][src]] = self.mdp.next_state[h][owner[src]]
                owner = nxt
        tree = tree.with_reference(tree.force_absorbing(pi_ref))
        return tree, tree.check_reward(reward)

    # ------------------------------------------------------------------ persistence
    def _check_block(self) -> dict:
        """Gold R and log pi_ref of a few fixed responses: from_json verifies that a rebuild reproduces them."""
        rng = np.random.default_rng(12345)
        x, ys = self.sample_responses(N_CHECK, rng)
        R = self.gold_returns(x, ys)
        lp = []
        for p, y in zip(x, ys):
            s, tot = int(p), 0.0
            for h, a in enumerate(y):
                tot += float(self.mdp.log_pi_ref[h][s, a])
                if h < self.H - 1:
                    s = int(self.mdp.next_state[h][s, a])
            lp.append(tot)
        return {"prompts": x.tolist(), "responses": ys, "returns": R.tolist(), "log_pi_ref": lp}

    def to_dict(self) -> dict:
        if self.recipe is None:
            raise ValueError("this task was built from objects, so task.json could not rebuild its mdp and "
                             "features: build it with make_token_task(...) to serialize it")
        rec = self.recipe
        return {
            "format": FORMAT, "A": self.A, "H": self.H, "n_prompts": self.n_prompts, "rho": self.rho.tolist(),
            "eos": self.eos, "structure": rec["structure"], "ref_temperature": rec["ref_temperature"],
            "eos_logit": rec.get("eos_logit", 0.0),
            "features": {"kind": self.features.kind, "dim": rec["feature_dim"], "d": self.features.d},
            "theta": self.theta.tolist(), "return_var": rec["return_var"], "beta": self.beta,
            "seeds": dict(rec["seeds"]), "token_words": list(self.token_words),
            "prompt_words": list(self.prompt_words), "check": self._check_block(),
        }

    def to_json(self, path: str | None = None) -> str:
        """The task as JSON text (written to `path` too when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> TokenTask:
        if not isinstance(d, dict):
            raise ValueError(f"task.json must hold a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"task.json: format {d.get('format')!r} is not {FORMAT!r}; write it with "
                             "TokenTask.to_json of this version")
        need = ("A", "H", "n_prompts", "rho", "structure", "ref_temperature", "features", "theta", "return_var",
                "beta", "seeds", "token_words", "prompt_words", "check")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"task.json is missing the fields {missing}; rewrite it with TokenTask.to_json")
        seeds = d["seeds"]
        for k in ("mdp", "features", "theta"):
            if k not in seeds:
                raise ValueError(f"task.json: seeds.{k} is missing; rewrite it with TokenTask.to_json")
        feats = d["features"]
        task = make_token_task(
            d["A"], d["H"], d["n_prompts"], structure=d["structure"], feature_kind=feats.get("kind"),
            feature_dim=feats.get("dim"), return_var=d["return_var"], beta=d["beta"], rho=d["rho"],
            ref_temperature=d["ref_temperature"], eos_logit=d.get("eos_logit", 0.0), seeds=seeds,
            token_words=d["token_words"],
            prompt_words=d["prompt_words"], theta=d["theta"])
        if task.features.d != feats.get("d", task.features.d):
            raise ValueError(f"task.json: features.d={feats.get('d')} but the rebuilt features have d="
                             f"{task.features.d}")
        chk, got = d["check"], task._check_block()
        for key in ("returns", "log_pi_ref"):
            a, b = np.asarray(chk[key], float), np.asarray(got[key], float)
            if chk["responses"] != got["responses"] or a.shape != b.shape or not np.allclose(a, b, rtol=1e-9,
                                                                                            atol=1e-12):
                raise ValueError(f"task.json does not reproduce: the rebuilt task gives other check.{key} (numpy or "
                                 "rto_sim changed how the mdp / features are drawn); re-export the task with this "
                                 "version")
        return task

    @classmethod
    def from_json(cls, source: str) -> TokenTask:
        """Rebuild a task from a task.json path or JSON text; verifies the stored check values."""
        if os.path.exists(source):
            with open(source) as f:
                source = f.read()
        try:
            d = json.loads(source)
        except json.JSONDecodeError as e:
            raise ValueError(f"task.json: not a JSON file or text ({e}); pass the path of a task.json") from e
        return cls.from_dict(d)


def make_token_task(A: int, H: int, n_prompts: int = 1, *, structure: str = "tree", feature_kind: str = "unigram",
                    feature_dim: int | None = None, return_var: float = 1.0, beta: float = 1.0, rho=None,
                    ref_temperature: float = 1.0, eos_logit: float = 0.0, seed: int = 0, seeds: dict | None = None,
                    token_words=None, prompt_words=None, theta=None) -> TokenTask:
    """Build a serializable task: the MDP (`structure` in tree / last_token / position, with EOS, pi_ref drawn
    at `ref_temperature`), the features of `feature_kind` and theta* by `draw_theta` (return variance
    `return_var` under pi_ref), unless `theta` is given. `eos_logit` is added to the EOS logit of pi_ref in every
    live state (then renormalized; theta* is drawn under the shifted pi_ref): a negative value makes responses
    longer, so that the horizon H is actually used. Seeds: `seeds` = {"mdp", "features", "theta"} or derived from
    `seed` (seed, seed + 1, seed + 2)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    if feature_kind not in FEATURE_KINDS:
        raise ValueError(f"feature_kind {feature_kind!r} is not one of {FEATURE_KINDS}")
    if seeds is None:
        seeds = {"mdp": int(seed), "features": int(seed) + 1, "theta": int(seed) + 2}
    seeds = {k: int(seeds[k]) for k in ("mdp", "features", "theta")}
    build = {"tree": TokenMDP.tree, "last_token": TokenMDP.last_token_automaton, "position": TokenMDP.position}
    mdp = build[structure](A, H, n_prompts=n_prompts, eos=True, rho=rho, ref_temperature=ref_temperature,
                           seed=seeds["mdp"])
    if not np.isfinite(eos_logit):
        raise ValueError(f"eos_logit must be a finite number, got {eos_logit!r}")
    if eos_logit != 0.0:
        shifted = []
        for p in mdp.pi_ref:
            q = p.copy()
            q[:, mdp.eos] *= np.exp(eos_logit)
            q /= q.sum(axis=1, keepdims=True)
            shifted.append(q)
        mdp = mdp.with_reference(mdp.force_absorbing(shifted))
    features = make_features(mdp, feature_kind, d=feature_dim, seed=seeds["features"])
    if theta is None:
        theta = draw_theta(mdp, features, return_var=return_var, seed=seeds["theta"])
    recipe = {"structure": structure, "ref_temperature": float(ref_temperature), "eos_logit": float(eos_logit),
              "feature_dim": feature_dim, "return_var": float(return_var), "seeds": seeds}
    return TokenTask(mdp=mdp, features=features, theta=np.asarray(theta, float), beta=beta,
                     token_words=token_words, prompt_words=prompt_words, recipe=recipe)


__all__ = ["TokenTask", "TaskResponses", "PairLabels", "make_token_task"]
