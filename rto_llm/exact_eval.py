"""Exact evaluation of neural policies on a token task (`rto_sim.token_task.TokenTask`, experiment E8).

Long because it holds both evaluation methods (exact enumeration and sampling) of one result type, with the log-prob
cache they share.

For a policy pi (e.g. the trained actor), a reference pi_ref (the SFT model) and the task's gold reward R,
:func:`evaluate_policy` enumerates every valid response y of every prompt x (EOS-terminated with at most H
tokens, or exactly H tokens without EOS), computes log pi(y|x) and log pi_ref(y|x) by batched forward passes
(left padding, position ids from the attention mask, log-softmax in float64; the sum of the response's token
log-probs, the EOS term included when y has EOS; an H-token response has no EOS term because generation
stops at max_new_tokens = H) and returns, exactly:

    J_beta(pi)   = E_x sum_y pi(y|x) [R(y) - beta log pi(y|x)/pi_ref(y|x)]
    J*_beta      = beta E_x log sum_y pi_ref(y|x) exp(R(y)/beta),  pi*_beta(y|x) ∝ pi_ref(y|x) exp(R(y)/beta)
    SubOpt       = J*_beta - J_beta(pi) >= 0
    E_pi R, KL(pi || pi_ref), E_{pi*} R, KL(pi* || pi_ref)
    win rate     = E_x E_{y~pi, y'~pi_ref} sigmoid(R(y) - R(y'))     (Bradley-Terry, against pi_ref)
    DPO reward   = E_x E_{y~pi} beta_dpo log pi_dpo(y|x)/pi_ref(y|x)  (when a DPO model is given)

The forward passes run once per *maximal* live prefix (`enumerated_logprobs`: a causal model scores every
prefix of a sequence in one pass): P (A-1)^(H-1) sequences instead of one per response (243 instead of 1,093
per prompt at A = 4, H = 6); `sequence_logprobs` (one pass per response) gives the same numbers (tested)
and is what the sampled mode uses.

**Mass outside the task.** A neural model also puts probability on tokens that are not task tokens (PAD,
BOS, UNK, prompt words): such responses have no gold reward. ``valid_mass`` (policy) and
``valid_mass_ref`` (reference) report E_x sum over valid y of the *raw* model's pi(y|x). Two conventions:

- ``restrict_to_task=False`` (default): every model is **conditioned on validity** at the sequence level,
  pi_v(y|x) = pi(y|x) / sum_{valid y'} pi(y'|x), and pi_ref_v likewise. This is the
  distribution of the model's generations after rejecting invalid ones, the convention of
  `rto_llm.token_task.sample_preferences`. All quantities above are computed with pi_v and pi_ref_v; they
  are the model's own values exactly when valid_mass = 1. The DPO reward uses the raw log-probs
  (beta_dpo log pi_dpo(y)/pi_ref(y) as RTO computes it per token), averaged under pi_v.
- ``restrict_to_task=True``: every next-token distribution is renormalized over the task's A tokens
  (the model with all other logits set to -inf; sampling then draws only task tokens). This is a policy on
  the task's prefix tree, so the results equal `rto_sim.exact` recursions on the tabular policy of
  :func:`tree_policy` (the cross-check in tests/rto_llm/test_exact_eval.py). The DPO reward uses the restricted
  models too.

**Cache.** With ``cache=True`` (the default) the enumerated log-probs of each model are kept (a weak reference
to the model object, one entry per task, tokenizer ids and prompt selection) together with a fingerprint of
its parameters: identity, version counter, storage pointer and float64 sum of every parameter, and the
adapter switches of a peft model. A model whose fingerprint is unchanged is not run again: the frozen
reference (and DPO model) of a training run costs one forward pass over the enumeration for the whole run,
and evaluating the same policy twice costs one. Any in-place update (optimizer step, ``load_state_dict``,
EMA) changes the fingerprint (tested); ``cache=False`` always recomputes.

**Large tasks.** Above ``max_enumerated`` rows (prompts x responses) ``method="auto"`` switches to sampled
estimates (``n_samples`` responses per prompt from pi and from pi_ref, pure sampling), logs a warning and
says so in ``method`` and ``notes``; every quantity then has a standard error in ``se``. J* is a
log-mean-exp of reference samples (biased by O(1/n)); E_{pi*} R and KL(pi*||pi_ref) are self-normalized
importance estimates (no standard error). Without ``restrict_to_task`` invalid draws are dropped, the valid
mass is the valid fraction, and the normalizers log(valid mass) enter KL and J with their delta-method
variance (large when the valid mass is small); with it, the raw valid mass is the importance-weighted mean
of raw/restricted sequence probabilities over the restricted draws.

:func:`tree_policy` queries a model's next-token conditionals at every prefix of the task's prefix tree and
returns the tabular layered policy (restricted to the task tokens, and the raw leak per state).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import expit, logsumexp

from rto_llm.token_task import (
    action_token_ids,
    load_model_and_tokenizer,
    load_task,
    model_device,
    prompt_token_ids,
    sample_token_responses,
    token_ids_to_actions,
)
from rto_sim.token_task import TokenTask

log = logging.getLogger(__name__)

DEFAULT_MAX_ENUMERATED = 2**16     # rows (prompts x responses) evaluated exactly by default
WIN_RATE_EXACT_LIMIT = 25_000_000  # sum over prompts of (distinct returns)^2 for the exact win-rate double sum
WIN_RATE_SAMPLES = 200_000         # pairs per prompt for the win rate above that limit
METRICS = ("J", "J_star", "sub_opt", "expected_return", "kl", "win_rate", "dpo_reward", "valid_mass",
           "valid_mass_ref", "optimal_return", "optimal_kl")


@dataclass
class ExactEvalResult:
    """Result of :func:`evaluate_policy`. Scalars are rho-weighted means over the evaluated prompts; ``se``
    holds their standard errors (0 for exact values, NaN where none is estimated); ``per_prompt`` the
    per-prompt values (arrays in the order of ``prompts``)."""

    method: str                     # "exact" or "sampled"
    beta: float
    restrict_to_task: bool
    J: float
    J_star: float
    sub_opt: float
    expected_return: float
    kl: float
    win_rate: float
    dpo_reward: float | None        # None without a DPO model
    valid_mass: float               # raw policy mass on valid responses
    valid_mass_ref: float           # raw reference mass on valid responses
    optimal_return: float           # E_{pi*_beta} R
    optimal_kl: float               # KL(pi*_beta || pi_ref)
    se: dict
    per_prompt: dict
    prompts: np.ndarray             # evaluated prompt indices
    weights: np.ndarray             # their rho, renormalized
    n_responses: int                # responses per prompt (exact) or samples per prompt (sampled)
    notes: list = field(default_factory=list)
    responses: dict | None = None   # exact only: prompt, actions, length, returns, log_policy, log_reference,
    #                                 log_optimal, log_dpo (the log-probs as used: conditioned / restricted)

    def summary(self) -> dict:
        """The scalar results, their standard errors and the method (JSON-friendly)."""
        out = {"method": self.method, "beta": self.beta, "restrict_to_task": self.restrict_to_task,
               "n_prompts": int(len(self.prompts)), "n_responses": int(self.n_responses)}
        for k in METRICS:
            out[k] = getattr(self, k)
            out[f"{k}_se"] = self.se.get(k)
        out["notes"] = list(self.notes)
        return out


# ---------------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      allowed_ids=None, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """log p(response | prompt) for each pair: the sum of the response's token log-probs, float64.

    Batches are sorted by length and left-padded; position ids come from the attention mask. Returns
    ``(raw (N,), restricted (N,) or None)``: restricted renormalizes every next-token distribution over
    ``allowed_ids`` (every response token must then be allowed)."""
    from rto_llm.data import pad_sequences
    from rto_llm.models import position_ids_from_mask
    from rto_sim.core import gather_logprobs

    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have equal length")
    N = len(responses)
    raw = np.zeros(N)
    res = np.zeros(N) if allowed_ids is not None else None
    if N == 0:
        return raw, res
    device = model_device(model)
    was_training = model.training
    model.eval()
    allowed = lookup = None
    if allowed_ids is not None:
        allowed = torch.as_tensor(np.asarray(allowed_ids), dtype=torch.long, device=device)
        n_vocab = model.get_output_embeddings().weight.shape[0]
        lookup = torch.full((n_vocab,), -1, dtype=torch.long, device=device)
        lookup[allowed] = torch.arange(len(allowed), device=device)
    order = np.argsort([len(p) + len(r) for p, r in zip(prompts, responses)], kind="stable")
    try:
        for k in range(0, N, batch_size):
            idx = order[k : k + batch_size]
            seqs = [list(prompts[i]) + list(responses[i]) for i in idx]
            rlen = torch.tensor([len(responses[i]) for i in idx], device=device)
            ids, mask = pad_sequences(seqs, pad_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            T = ids.shape[1]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).logits[:, :-1].double()               # (B, T-1, V) predicts ids[:, 1:]
            target = ids[:, 1:]
            pos = torch.arange(1, T, device=device).unsqueeze(0)                   # token index of each target
            rmask = pos >= (T - rlen).unsqueeze(1)                                 # (B, T-1) response targets
            lp = gather_logprobs(logits, target)
            raw[idx] = (lp * rmask).sum(-1).cpu().numpy()
            if allowed is not None:
                sub = lookup[target]
                if bool(((sub < 0) & rmask).any()):
                    raise ValueError("a response holds a token outside allowed_ids: restricted log-probs need "
                                     "task tokens only")
                lps = gather_logprobs(logits[..., allowed], sub.clamp(min=0))
                res[idx] = (lps * rmask).sum(-1).cpu().numpy()
    finally:
        model.train(was_training)
    return raw, res


@torch.no_grad()
def enumerated_logprobs(model, task: TokenTask, tokenizer, prompts, actions: np.ndarray, length: np.ndarray,
                        batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs (raw, restricted to the task tokens) of enumerated responses, float64, from one
    forward pass per *maximal* live prefix instead of one per response.

    Every response is a live prefix u (at most H-1 non-EOS tokens) followed by EOS, or H non-EOS tokens;
    the causal model's log-prob of each of its tokens is read from the forward pass of the canonical
    maximal sequence ``prompt + u + (live token 0 up to H-1 tokens)``, at the position before that token
    (left padding, position ids from the mask): P (A-1)^(H-1) sequences for all the responses.
    ``prompts`` (N,) prompt index per response; ``actions`` (N, H) (EOS-padded); ``length`` (N,).
    Equal to `sequence_logprobs` of each response (tested)."""
    from rto_llm.data import pad_sequences
    from rto_llm.models import position_ids_from_mask

    H, b = task.H, task.A - 1
    act = action_token_ids(task)
    pids = prompt_token_ids(tokenizer, task)
    uniq = np.unique(prompts)
    slot = {int(p): j for j, p in enumerate(uniq)}
    n_max = b ** (H - 1)
    codes = np.arange(n_max)
    digits = (codes[:, None] // b ** np.arange(H - 2, -1, -1)[None, :]) % b if H > 1 else np.zeros((1, 0), int)
    rows = [pids[p] + act[d].tolist() for p in uniq for d in digits]       # len(uniq) * n_max sequences
    raw = np.zeros((len(rows), H, task.A))
    res = np.zeros((len(rows), H, task.A))
    device = model_device(model)
    act_t = torch.as_tensor(act, device=device)
    was_training = model.training
    model.eval()
    try:
        for k in range(0, len(rows), batch_size):
            ids, mask = pad_sequences(rows[k : k + batch_size], tokenizer.pad_token_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).logits
            T = ids.shape[1]
            z = logits[:, T - H : T].double()              # (B, H, V): position T-H+t predicts response token t
            raw[k : k + batch_size] = torch.log_softmax(z, -1)[..., act_t].cpu().numpy()
            res[k : k + batch_size] = torch.log_softmax(z[..., act_t], -1).cpu().numpy()
    finally:
        model.train(was_training)
    actions = np.asarray(actions, np.int64)
    live = np.where(np.arange(H)[None, :] < np.minimum(length, H)[:, None], actions, 0)[:, : H - 1]
    live = np.where(live == task.eos, 0, live)             # the EOS position and after: canonical token 0
    code = live @ (b ** np.arange(H - 2, -1, -1)) if H > 1 else np.zeros(len(actions), np.int64)
    row = np.array([slot[int(p)] for p in prompts]) * n_max + code
    t = np.arange(H)[None, :]
    used = t < np.asarray(length)[:, None]
    out = []
    for table in (raw, res):
        vals = table[row[:, None], t, np.where(used, actions, 0)]
        out.append(np.where(used, vals, 0.0).sum(axis=1))
    return out[0], out[1]


_LOGPROB_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {key: (fingerprint, raw, res)}


def model_fingerprint(model) -> tuple:
    """What the enumerated log-probs of ``model`` depend on besides the inputs: every parameter's identity,
    version counter (bumped by every in-place update), storage pointer, shape and float64 sum, and the adapter
    switches of peft layers. Equal fingerprints mean the same function (module docstring, "Cache")."""
    params = list(model.parameters())
    with torch.no_grad():
        sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in params]).cpu().numpy().tobytes() \
            if params else b""
    ids = tuple((id(p), p._version, p.data_ptr(), tuple(p.shape), str(p.dtype)) for p in params)
    adapters = tuple((name, bool(getattr(m, "_disable_adapters", False)), str(getattr(m, "active_adapter", "")))
                     for name, m in model.named_modules() if hasattr(m, "_disable_adapters"))
    return ids, sums, adapters


def _cached_enumerated_logprobs(model, task: TokenTask, tokenizer, prompts, actions, length, batch_size: int,
                                cache: bool) -> tuple[np.ndarray, np.ndarray]:
    """`enumerated_logprobs`, served from the cache when the model's fingerprint is unchanged."""
    if not cache:
        return enumerated_logprobs(model, task, tokenizer, prompts, actions, length, batch_size)
    key = (task.A, task.H, task.eos, tuple(map(tuple, prompt_token_ids(tokenizer, task))),
           tuple(action_token_ids(task).tolist()), np.asarray(prompts).tobytes(), np.asarray(actions).tobytes(),
           np.asarray(length).tobytes())
    fp = model_fingerprint(model)
    try:
        entries = _LOGPROB_CACHE.setdefault(model, {})
    except TypeError:                         # not weak-referenceable: no cache
        return enumerated_logprobs(model, task, tokenizer, prompts, actions, length, batch_size)
    hit = entries.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1].copy(), hit[2].copy()
    raw, res = enumerated_logprobs(model, task, tokenizer, prompts, actions, length, batch_size)
    entries.clear()                           # one entry per model: the newest
    entries[key] = (fp, raw.copy(), res.copy())
    return raw, res


def clear_cache() -> None:
    """Forget every cached enumeration (module docstring, "Cache")."""
    _LOGPROB_CACHE.clear()


@dataclass
class TreePolicy:
    """A neural policy on the task's prefix tree: ``tree`` (`TokenMDP.tree` carrying the task's pi_ref and
    gold reward ``reward``), ``log_policy`` layered (n_h, A) log-probs over the task tokens renormalized
    (the restricted policy; delta_EOS in absorbing states), ``raw_log_policy`` the raw model's log-probs of
    the task tokens (not renormalized) and ``leak`` layered (n_h,) raw mass on non-task tokens."""

    tree: object
    reward: list
    log_policy: list
    raw_log_policy: list
    leak: list

    @property
    def policy(self) -> list:
        return [np.exp(lp) for lp in self.log_policy]


@torch.no_grad()
def tree_policy(model, task, tokenizer=None, batch_size: int = 512) -> TreePolicy:
    """Query the model's next-token distribution at every live prefix of the task's prefix tree (one forward
    per prefix, its last position) and build the tabular layered policy (see `TreePolicy`)."""
    from rto_llm.data import pad_sequences
    from rto_llm.models import position_ids_from_mask

    task = load_task(task)
    model, tokenizer = load_model_and_tokenizer(model, tokenizer, task, "model")
    tree, reward = task.lift_to_tree()
    pids = prompt_token_ids(tokenizer, task)
    act = action_token_ids(task)
    b, A, P = task.A - 1, task.A, task.n_prompts
    device = model_device(model)
    act_t = torch.as_tensor(act, device=device)
    was_training = model.training
    model.eval()
    log_pol, raw_pol, leak = [], [], []
    try:
        for h in range(task.H):
            n_live = P * b**h
            s = np.arange(n_live)
            digits = (s[:, None] // b ** np.arange(h - 1, -1, -1)[None, :]) % b if h else np.zeros((n_live, 0), int)
            queries = [pids[p] + act[d].tolist() for p, d in zip(s // b**h, digits)]
            raw = np.zeros((n_live, A))
            for k in range(0, n_live, batch_size):
                ids, mask = pad_sequences(queries[k : k + batch_size], tokenizer.pad_token_id, left=True)
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               use_cache=False).logits[:, -1].double()
                raw[k : k + batch_size] = torch.log_softmax(logits, -1)[:, act_t].cpu().numpy()
            n = tree.n_states[h]
            lp_raw = np.full((n, A), -np.inf)
            lp_raw[:, -1] = 0.0                  # absorbing rows (index >= n_live): delta_EOS
            lp_raw[:n_live] = raw
            lp = lp_raw.copy()
            lp[:n_live] = raw - logsumexp(raw, axis=1, keepdims=True)
            lk = np.zeros(n)
            lk[:n_live] = 1.0 - np.exp(raw).sum(axis=1)
            log_pol.append(lp)
            raw_pol.append(lp_raw)
            leak.append(lk)
    finally:
        model.train(was_training)
    return TreePolicy(tree=tree, reward=reward, log_policy=log_pol, raw_log_policy=raw_pol, leak=leak)


# ---------------------------------------------------------------------------------------------------
# Exact quantities from per-response log-probs (arrays (P, K), one row per prompt)
# ---------------------------------------------------------------------------------------------------


def _plogq(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """sum over responses of p * d with 0 where p == 0 (d may be inf there)."""
    return np.where(p > 0, p * np.where(p > 0, d, 0.0), 0.0).sum(axis=1)


def _win_rate_exact(p: np.ndarray, q: np.ndarray, R: np.ndarray) -> float:
    """sum_ij p_i q_j sigmoid(R_i - R_j), compressed over distinct returns, in chunks."""
    u, inv = np.unique(R, return_inverse=True)
    pw, qw = np.bincount(inv, weights=p, minlength=len(u)), np.bincount(inv, weights=q, minlength=len(u))
    total, chunk = 0.0, max(1, 4_000_000 // max(len(u), 1))
    for i in range(0, len(u), chunk):
        total += float(pw[i : i + chunk] @ (expit(u[i : i + chunk, None] - u[None, :]) @ qw))
    return total


def _exact_quantities(pv, qv, R, beta, dpo_ratio, beta_dpo, rng) -> tuple[dict, np.ndarray, str | None, np.ndarray]:
    """Per-prompt exact values from normalized log-probs pv (policy) and qv (reference), (P, K) each, and the
    returns R; also the win rate's standard errors (0 when exact), a note, and log pi*_beta (P, K)."""
    p, q = np.exp(pv), np.exp(qv)
    out: dict = {}
    out["expected_return"] = (p * R).sum(axis=1)
    out["kl"] = _plogq(p, pv - qv)
    out["J"] = out["expected_return"] - beta * out["kl"]
    z = np.where(q > 0, qv + R / beta, -np.inf)
    lz = logsumexp(z, axis=1)
    out["J_star"] = beta * lz
    ostar = z - lz[:, None]
    pstar = np.exp(ostar)
    out["optimal_return"] = (pstar * R).sum(axis=1)
    out["optimal_kl"] = _plogq(pstar, ostar - qv)
    out["sub_opt"] = out["J_star"] - out["J"]
    note = None
    n_unique = sum(len(np.unique(r)) ** 2 for r in R)
    if n_unique <= WIN_RATE_EXACT_LIMIT:
        out["win_rate"] = np.array([_win_rate_exact(p[i], q[i], R[i]) for i in range(len(R))])
        win_se = np.zeros(len(R))
    else:
        wr, win_se = [], []
        for i in range(len(R)):
            a = rng.choice(R.shape[1], size=WIN_RATE_SAMPLES, p=p[i] / p[i].sum())
            b = rng.choice(R.shape[1], size=WIN_RATE_SAMPLES, p=q[i] / q[i].sum())
            s = expit(R[i, a] - R[i, b])
            wr.append(s.mean())
            win_se.append(s.std(ddof=1) / math.sqrt(len(s)))
        out["win_rate"], win_se = np.array(wr), np.array(win_se)
        note = (f"win_rate: {n_unique:.3g} return pairs exceed {WIN_RATE_EXACT_LIMIT:.3g}; estimated from "
                f"{WIN_RATE_SAMPLES} sampled pairs per prompt (exact distributions), with standard error")
    if dpo_ratio is not None:
        out["dpo_reward"] = beta_dpo * _plogq(p, dpo_ratio)
    return out, win_se, note, ostar


# ---------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------


def _select_prompts(task: TokenTask, prompts) -> tuple[np.ndarray, np.ndarray]:
    if prompts is None:
        sel = np.arange(task.n_prompts)
    else:
        sel = np.asarray(list(prompts), dtype=np.int64) if not isinstance(prompts, np.ndarray) else prompts
        if sel.size == 0:
            raise ValueError("prompts: the list of prompt indices is empty; pass at least one index, or None to "
                             "evaluate every prompt of the task")
        if sel.ndim != 1 or np.any(sel < 0) or np.any(sel >= task.n_prompts) or len(set(sel.tolist())) != len(sel):
            raise ValueError(f"prompts must be distinct prompt indices in [0, {task.n_prompts}), got {sel.tolist()}")
        sel = np.sort(sel.astype(np.int64))
    w = task.rho[sel]
    return sel, w / w.sum()


def _agg(w: np.ndarray, v: np.ndarray) -> float:
    return float(w @ v)


def _agg_se(w: np.ndarray, se: np.ndarray) -> float:
    return float(np.sqrt((w**2) @ (se**2)))


def evaluate_policy(policy, reference, task, beta: float | None = None, *, tokenizer=None, dpo_model=None,
                    beta_dpo: float | None = None, restrict_to_task: bool = False, prompts=None,
                    method: str = "auto", max_enumerated: int = DEFAULT_MAX_ENUMERATED, n_samples: int = 512,
                    seed: int = 0, batch_size: int = 512, cache: bool = True) -> ExactEvalResult:
    """Evaluate ``policy`` against ``reference`` on ``task`` (module docstring).

    Args:
        policy, reference, dpo_model: model directories or causal-LM objects on the task's tokenizer.
        task: a TokenTask, a task folder or a task.json path.
        beta: KL coefficient (default: the task's beta).
        tokenizer: the task tokenizer (default: the policy directory's, else ``build_task_tokenizer(task)``).
        beta_dpo: the DPO model's beta (required with ``dpo_model``).
        restrict_to_task: renormalize next-token distributions over the task tokens (module docstring).
        prompts: prompt indices to evaluate (default all), weighted by rho renormalized over them.
        method: "auto" (exact up to ``max_enumerated`` rows, else sampled with a warning), "exact", "sampled".
        n_samples: responses per prompt and model in the sampled mode.
        seed: seeds the sampled mode (and a sampled win rate).
        cache: reuse the enumerated log-probs of a model whose parameters did not change (exact mode; module
            docstring, "Cache").
    """
    task = load_task(task)
    beta = task.beta if beta is None else beta
    if not (isinstance(beta, (int, float, np.floating)) and np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (the KL coefficient), got {beta!r}")
    beta = float(beta)
    if method not in ("auto", "exact", "sampled"):
        raise ValueError(f"method must be 'auto', 'exact' or 'sampled', got {method!r}")
    if dpo_model is not None and (beta_dpo is None or not beta_dpo > 0):
        raise ValueError(f"beta_dpo must be > 0 when dpo_model is given (the beta the DPO model was trained with), "
                         f"got {beta_dpo!r}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    sel, w = _select_prompts(task, prompts)
    policy, tokenizer = load_model_and_tokenizer(policy, tokenizer, task, "policy")
    reference, _ = load_model_and_tokenizer(reference, tokenizer, task, "reference")
    if dpo_model is not None:
        dpo_model, _ = load_model_and_tokenizer(dpo_model, tokenizer, task, "dpo_model")
    K = task.num_responses
    rows = len(sel) * K
    notes: list[str] = []
    if method == "exact" and rows > max_enumerated:
        raise ValueError(f"method='exact': {len(sel)} prompts x {K} responses = {rows} rows exceed max_enumerated="
                         f"{max_enumerated}; raise max_enumerated, pass fewer prompts, or use method='auto'/'sampled'")
    if method == "auto" and rows > max_enumerated:
        msg = (f"{len(sel)} prompts x {K} responses = {rows} rows exceed max_enumerated={max_enumerated}: sampled "
               f"estimates ({n_samples} responses per prompt and model) with standard errors, not exact values")
        log.warning("exact_eval: %s", msg)
        notes.append(msg)
        method = "sampled"
    elif method == "auto":
        method = "exact"
    args = (policy, reference, tokenizer, task, beta, dpo_model, beta_dpo, restrict_to_task, sel, w, seed,
            batch_size, notes)
    if method == "exact":
        return _evaluate_exact(*args, cache=cache)
    return _evaluate_sampled(*args, n_samples)


def _evaluate_exact(policy, reference, tokenizer, task, beta, dpo_model, beta_dpo, restrict, sel, w, seed,
                    batch_size, notes, cache: bool = True) -> ExactEvalResult:
    K = task.num_responses
    tr = task.enumerate(max_rows=task.n_prompts * K)
    keep = np.isin(tr.prompt, sel)
    prompt, actions, length, R = tr.prompt[keep], tr.actions[keep], tr.length[keep], tr.returns[keep]
    lp_raw, lp_res = _cached_enumerated_logprobs(policy, task, tokenizer, prompt, actions, length, batch_size, cache)
    lq_raw, lq_res = _cached_enumerated_logprobs(reference, task, tokenizer, prompt, actions, length, batch_size,
                                                 cache)
    shape = (len(sel), K)
    lp_raw, lq_raw, Rm = lp_raw.reshape(shape), lq_raw.reshape(shape), R.reshape(shape)
    m_p, m_q = logsumexp(lp_raw, axis=1), logsumexp(lq_raw, axis=1)    # log raw valid mass per prompt
    if restrict:
        pv, qv = lp_res.reshape(shape), lq_res.reshape(shape)
        err = max(np.abs(logsumexp(pv, axis=1)).max(), np.abs(logsumexp(qv, axis=1)).max())
        if err > 1e-8:
            raise RuntimeError(f"restricted policies do not sum to 1 over the enumeration (|log Z| = {err:.3g})")
    else:
        pv, qv = lp_raw - m_p[:, None], lq_raw - m_q[:, None]
    dpo_ratio = ld = None
    if dpo_model is not None:
        ld_raw, ld_res = _cached_enumerated_logprobs(dpo_model, task, tokenizer, prompt, actions, length, batch_size,
                                                     cache)
        ld = (ld_res if restrict else ld_raw).reshape(shape)
        dpo_ratio = ld - (qv if restrict else lq_raw)
    rng = np.random.default_rng(seed)
    per, win_se, note, ostar = _exact_quantities(pv, qv, Rm, beta, dpo_ratio, beta_dpo, rng)
    if note:
        notes.append(note)
    per["valid_mass"], per["valid_mass_ref"] = np.exp(m_p), np.exp(m_q)
    vals = {k: _agg(w, v) for k, v in per.items()}
    se = {k: 0.0 for k in per}
    se["win_rate"] = _agg_se(w, win_se)
    leak = 1.0 - min(vals["valid_mass"], vals["valid_mass_ref"])
    if leak > 1e-12:
        notes.append(f"raw models put mass outside the task (valid_mass {vals['valid_mass']:.6g}, reference "
                     f"{vals['valid_mass_ref']:.6g}); values are for the models "
                     + ("restricted to the task tokens" if restrict else "conditioned on valid responses"))
    responses_out = {"prompt": prompt, "actions": actions, "length": length, "returns": R,
                     "log_policy": pv.ravel(), "log_reference": qv.ravel(), "log_optimal": ostar.ravel(),
                     "log_dpo": None if ld is None else ld.ravel()}
    return _result("exact", beta, restrict, vals, se, per, sel, w, K, notes, responses_out)


def _result(method: str, beta: float, restrict: bool, vals: dict, se: dict, per: dict, prompts, weights,
            n_responses: int, notes: list, responses: dict | None) -> ExactEvalResult:
    """The ExactEvalResult of both methods from the weighted means `vals` and standard errors `se`."""
    return ExactEvalResult(
        method=method, beta=beta, restrict_to_task=bool(restrict), se=se, per_prompt=per, prompts=prompts,
        weights=weights, n_responses=n_responses, notes=notes, responses=responses, dpo_reward=vals.get("dpo_reward"),
        **{k: vals[k] for k in ("J", "J_star", "sub_opt", "expected_return", "kl", "win_rate", "valid_mass",
                                "valid_mass_ref", "optimal_return", "optimal_kl")})


def _draw(model, tokenizer, task, sel, n, gen, restrict, batch_size):
    """n responses per selected prompt; returns (prompt index per draw, action lists or None when invalid)."""
    pids = prompt_token_ids(tokenizer, task)
    x = np.repeat(sel, n)
    allowed = action_token_ids(task) if restrict else None
    ids = sample_token_responses(model, [pids[p] for p in x], tokenizer.pad_token_id, tokenizer.eos_token_id,
                                 task.H, gen, allowed_ids=allowed, batch_size=batch_size)
    return x, [token_ids_to_actions(r, task) for r in ids]


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _evaluate_sampled(policy, reference, tokenizer, task, beta, dpo_model, beta_dpo, restrict, sel, w, seed,
                      batch_size, notes, n) -> ExactEvalResult:
    gen = torch.Generator().manual_seed(int(seed))
    act = action_token_ids(task)
    pids = prompt_token_ids(tokenizer, task)
    pad = tokenizer.pad_token_id
    xp, yp = _draw(policy, tokenizer, task, sel, n, gen, restrict, batch_size)
    xq, yq = _draw(reference, tokenizer, task, sel, n, gen, restrict, batch_size)

    def logprobs(model, x, ys):
        ok = [i for i, y in enumerate(ys) if y is not None]
        raw, res = sequence_logprobs(model, [pids[x[i]] for i in ok], [act[ys[i]].tolist() for i in ok], pad, act,
                                     batch_size)
        return np.asarray(ok, np.int64), raw, res

    okp, lp_raw, lp_res = logprobs(policy, xp, yp)
    _, lq_raw_p, lq_res_p = logprobs(reference, xp, yp)          # reference on the policy's samples
    okq, lq_raw, lq_res = logprobs(reference, xq, yq)
    ld = None
    if dpo_model is not None:
        _, ld_raw, ld_res = logprobs(dpo_model, xp, yp)
        ld = ld_res if restrict else ld_raw
    Rp = task.gold_returns(xp[okp], [yp[i] for i in okp]) if len(okp) else np.zeros(0)
    Rq = task.gold_returns(xq[okq], [yq[i] for i in okq]) if len(okq) else np.zeros(0)
    names = ("J", "J_star", "sub_opt", "expected_return", "kl", "win_rate", "valid_mass", "valid_mass_ref",
             "optimal_return", "optimal_kl") + (("dpo_reward",) if ld is not None else ())
    per = {k: np.zeros(len(sel)) for k in names}
    pse = {k: np.zeros(len(sel)) for k in names}
    for j, x in enumerate(sel):
        ip, iq = xp[okp] == x, xq[okq] == x
        n_p, n_q = int(ip.sum()), int(iq.sum())
        if n_p < 2 or n_q < 2:
            raise ValueError(f"prompt {x}: only {n_p} policy / {n_q} reference draws of {n} were task responses; the "
                             "models put (almost) no mass on the task: train SFT first, or use restrict_to_task=True")
        R, Rr = Rp[ip], Rq[iq]
        if restrict:
            d = lp_res[ip] - lq_res_p[ip]
            # raw valid mass by importance weighting: E_{y ~ restricted} raw(y) / restricted(y) = raw mass
            mp, mp_se = _mean_se(np.exp(lp_raw[ip] - lp_res[ip]))
            mq, mq_se = _mean_se(np.exp(lq_raw[iq] - lq_res[iq]))
            shift, shift_var = 0.0, 0.0
        else:
            d = lp_raw[ip] - lq_raw_p[ip]
            mp, mq = n_p / n, n_q / n
            mp_se, mq_se = math.sqrt(mp * (1 - mp) / n), math.sqrt(mq * (1 - mq) / n)
            shift = -math.log(mp) + math.log(mq)         # log pi_v/pi_ref_v = log pi/pi_ref - log m_p + log m_q
            shift_var = (1 - mp) / (n * mp) + (1 - mq) / (n * mq)
        per["valid_mass"][j], pse["valid_mass"][j] = mp, mp_se
        per["valid_mass_ref"][j], pse["valid_mass_ref"][j] = mq, mq_se
        er, er_se = _mean_se(R)
        kl, kl_se = _mean_se(d)
        per["expected_return"][j], pse["expected_return"][j] = er, er_se
        per["kl"][j], pse["kl"][j] = kl + shift, math.sqrt(kl_se**2 + shift_var)
        g = R - beta * d
        jj, j_se = _mean_se(g)
        per["J"][j], pse["J"][j] = jj - beta * shift, math.sqrt(j_se**2 + beta**2 * shift_var)
        c = Rr.max()
        wts = np.exp((Rr - c) / beta)
        per["J_star"][j] = c + beta * math.log(wts.mean())
        pse["J_star"][j] = beta * wts.std(ddof=1) / (math.sqrt(n_q) * wts.mean())
        per["sub_opt"][j] = per["J_star"][j] - per["J"][j]
        pse["sub_opt"][j] = math.hypot(pse["J_star"][j], pse["J"][j])
        per["optimal_return"][j] = float((wts * Rr).sum() / wts.sum())
        per["optimal_kl"][j] = (per["optimal_return"][j] - per["J_star"][j]) / beta
        pse["optimal_return"][j] = pse["optimal_kl"][j] = float("nan")
        m = min(n_p, n_q)
        per["win_rate"][j], pse["win_rate"][j] = _mean_se(expit(R[:m] - Rr[:m]))
        if ld is not None:
            ref_lp = lq_res_p[ip] if restrict else lq_raw_p[ip]
            per["dpo_reward"][j], pse["dpo_reward"][j] = _mean_se(beta_dpo * (ld[ip] - ref_lp))
    vals = {k: _agg(w, v) for k, v in per.items()}
    se = {k: _agg_se(w, v) for k, v in pse.items()}
    notes.append("sampled: J* is a log-mean-exp of reference samples (O(1/n) bias); optimal_return / optimal_kl are "
                 "self-normalized importance estimates without standard errors")
    return _result("sampled", beta, restrict, vals, se, per, sel, w, n, notes, None)


def evaluate_task_dir(task_dir: str, policy: str, reference: str | None = None, **kw) -> ExactEvalResult:
    """Convenience: evaluate a model directory on an exported task folder (reference default: TASK_DIR/sft/final)."""
    reference = reference or os.path.join(task_dir, "sft", "final")
    return evaluate_policy(policy, reference, task_dir, **kw)


__all__ = ["DEFAULT_MAX_ENUMERATED", "ExactEvalResult", "TreePolicy", "clear_cache", "enumerated_logprobs",
           "evaluate_policy", "evaluate_task_dir", "model_fingerprint", "sequence_logprobs", "tree_policy"]
