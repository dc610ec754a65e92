"""Rollouts: pure-sampling generation, the ``Experience`` record, and the no-grad passes that fill it.

Long because the rollout is one pipeline (sample with the KV cache, score, assemble rewards, advantages) over one
record, `Experience`; the sampler is kept beside the passes that consume its layout.

Layout of a rollout buffer (B rows)::

    sequences   = [ left-padded prompt (width P) | response (width R), right-padded after the first EOS ]
    attention   = [ 1 on real prompt tokens        | 1 on response tokens through the first EOS       ]
    action_mask = the response half of ``attention`` (B, R): the tokens the policy chose

Position ids always come from the attention mask (``position_ids_from_mask``), so the amount of left
padding never changes a log-prob or a value (docs/practice.md invariant 5).

Forward convention (one helper, :func:`response_logits`, for every causal-LM role; pinned by tests):
  - pi (actor during the update), pi_old (actor at rollout time) and pi_ref: ``log softmax(logits / T)``
    at the rollout temperature T, so the PPO ratio and the KL compare the distributions that were
    actually sampled from;
  - the DPO implicit reward ``beta1 * (log pi_dpo - log pi_ref)``: both on the *unscaled* models
    (T = 1), because DPO defines its implicit reward there. When T = 1 the two reference log-probs are
    the same tensor; otherwise both come from the same reference forward pass (one pass, two
    temperatures).
  - the critic value of action y_t is read at the position of the token *before* y_t (the state s_t).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rto_llm.data import pad_sequences
from rto_llm.models import backbone, position_ids_from_mask, score_head, sequence_scores
from rto_llm.ppo.roles import Roles
from rto_sim.core import (
    RewardTerms,
    apply_missing_eos_penalty,
    compute_rto_rewards,
    entropy_from_logits,
    gather_logprobs,
    get_advantage_estimator,
    masked_whiten,
    normalize_score,
)

Tensor = torch.Tensor
log = logging.getLogger("rto_llm")


# ---------------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One rollout buffer, grouped by RL meaning. B rows, P prompt columns, R response columns.

    Everything is computed once, without grad, and never changes during the PPO epochs (invariant 14).
    """

    # -- tokens -------------------------------------------------------------------------------------
    sequences: Tensor  # (B, P + R) long: left-padded prompt | response, PAD after the first EOS
    attention_mask: Tensor  # (B, P + R) long: 1 on real prompt tokens and on actions
    action_mask: Tensor  # (B, R) bool: response tokens through the first EOS (inclusive)
    prompt_width: int  # P: response column t is sequence column P + t
    has_eos: Tensor  # (B,) bool: the *response* contains EOS (the prompt is never inspected)
    # -- policy and reference at the rollout temperature T ----------------------------------------
    sample_logprobs: Tensor  # (B, R) log pi(y_t) recorded by the sampler (generation-time)
    old_logprobs: Tensor  # (B, R) log pi_old(y_t), recomputed with a full forward pass (the PPO anchor)
    ref_logprobs: Tensor  # (B, R) log pi_ref(y_t) at T (KL term)
    entropy: Tensor  # (B, R) entropy of pi_old(. | s_t) at T (diagnostic)
    # -- DPO token-reward inputs on the unscaled models (T = 1); None when the DPO term is off -----
    dpo_logprobs: Tensor | None  # (B, R) log pi_dpo(y_t)
    dpo_ref_logprobs: Tensor | None  # (B, R) log pi_ref(y_t) at T = 1 (None: same as ref_logprobs)
    # -- critic ---------------------------------------------------------------------------------------
    values: Tensor  # (B, R) V(s_t) from the rollout critic (zeros without a critic)
    # -- sequence score R -------------------------------------------------------------------------
    raw_scores: Tensor  # (B,) r_RM(x, y) as the reward model outputs it
    scores: Tensor  # (B,) R = clip(normalize(r_RM), -c, c), or the missing-EOS penalty
    # -- token rewards ------------------------------------------------------------------------------
    # rto_sim.core.RewardTerms, every tensor (B, R): token_level_rewards r_t = -beta2 kl_t + dpo_t +
    # [t = last] beta3 R; kl (kind kl.kind, not scaled by beta2); dpo_rewards (after clip and
    # redistribution); dpo_token_rewards (clipped, before redistribution); score_rewards; kl_coef = beta2
    rewards: RewardTerms | None = None
    # -- advantages -----------------------------------------------------------------------------------
    advantages_raw: Tensor | None = None  # (B, R) GAE / REINFORCE++ advantages before whitening
    advantages: Tensor | None = None  # (B, R) advantages used by the policy loss (whitened by default)
    returns: Tensor | None = None  # (B, R) value targets G_t

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_length(self) -> Tensor:
        """(B,) number of actions (through the first EOS)."""
        return self.action_mask.sum(-1)

    def tensors(self) -> dict[str, Tensor]:
        """All tensor fields by name, those of ``rewards`` as ``rewards.<name>`` (None fields left out)."""
        out = {k: v for k, v in vars(self).items() if torch.is_tensor(v)}
        if self.rewards is not None:
            out.update({f"rewards.{k}": v for k, v in vars(self.rewards).items() if torch.is_tensor(v)})
        return out

    def map_tensors(self, fn, **changes) -> Experience:
        """A new record with ``fn(tensor)`` for every tensor field (``rewards`` included); scalars are kept."""
        def apply(obj):
            return dataclasses.replace(obj, **{k: fn(v) for k, v in vars(obj).items() if torch.is_tensor(v)})

        out = apply(self)
        return dataclasses.replace(out, rewards=apply(self.rewards) if self.rewards is not None else None, **changes)

    def select(self, idx: Tensor) -> Experience:
        """Rows ``idx`` (1-D long) of every tensor field; scalars are kept."""
        return self.map_tensors(lambda v: v[idx])

    def trimmed(self) -> Experience:
        """Drop prompt columns that are padding in every row and response columns after every EOS.

        Log-probs and values do not depend on padding (position ids from the mask), so this only saves
        compute in micro-batches.
        """
        P = self.prompt_width
        prompt_real = self.attention_mask[:, :P].bool().any(0)
        left = int(prompt_real.float().argmax()) if bool(prompt_real.any()) else P - 1
        left = min(left, P - 1)  # keep at least one prompt column: the first action needs a context
        resp_any = self.action_mask.any(0)
        right = int(resp_any.nonzero().max()) + 1 if bool(resp_any.any()) else 1
        width = self.sequences.shape[1]

        def trim(v: Tensor) -> Tensor:
            if v.dim() != 2:
                return v
            return v[:, left : P + right] if v.shape[1] == width else v[:, :right]

        return self.map_tensors(trim, prompt_width=P - left)

    def to(self, device) -> Experience:
        return self.map_tensors(lambda v: v.to(device))


# ---------------------------------------------------------------------------------------------------
# Forward helpers (one convention for every role)
# ---------------------------------------------------------------------------------------------------


def response_logits(model, sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
    """``(B, R, V)`` logits predicting each response token: column t predicts ``sequences[:, P + t]``.

    Next-token alignment: the logit at sequence position P + t - 1 predicts the token at P + t. Only the
    last R + 1 positions go through the LM head (``logits_to_keep``) when the model supports it: the
    prompt's logits are never needed, and with a large vocabulary they dominate the memory.
    """
    kw = dict(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False)
    keep = sequences.shape[1] - prompt_width + 1
    try:
        logits = model(**kw, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: compute them all
        logits = model(**kw).logits
    return logits[:, -keep:-1]


def response_values(critic, sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
    """``(B, R)`` critic values V(s_t), read at the position of the token before action y_t."""
    hidden = backbone(critic)(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return score_head(critic)(hidden[:, prompt_width - 1 : -1]).squeeze(-1).float()


def truncate_after_eos(responses: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each response through its first EOS; PAD everything after it.

    Args:
        responses: ``(B, R)`` sampled tokens (rows that finished early may hold anything afterwards).
        eos_id, pad_id: distinct token ids.

    Returns:
        ``(responses (B, R) with PAD after the first EOS, action_mask (B, R) bool, has_eos (B,) bool)``.
        Only the response is inspected, never the prompt (a chat template may put EOS in the prompt).
    """
    is_eos = responses == eos_id
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    # Columns after a row's EOS hold PAD (written by the sampler or by chunk padding). A row without
    # EOS ran to max_new_tokens, which is the buffer width, so it has no padding to mask.
    action_mask = ~eos_before
    out = torch.where(action_mask, responses, torch.full_like(responses, pad_id))
    has_eos = (is_eos & action_mask).any(-1)
    return out, action_mask, has_eos


@torch.no_grad()
def sample_responses(
    model,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    static_cache: bool = False,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure sampling from ``softmax(logits / T)`` with a KV cache (no top-k/top-p, no penalties).

    The sampler is written out instead of calling ``model.generate`` so that nothing (a model's
    ``generation_config.json`` with top_p 0.9, a default top_k of 50, a min-length processor) can
    silently change the sampling distribution (docs/practice.md invariant 4).

    Args:
        model: a causal LM (eval mode; dropout off), or a peft model wrapping one.
        prompts: token ids per prompt (unpadded).
        pad_id, eos_id: distinct ids; finished rows are fed PAD with attention 0.
        max_new_tokens: response budget.
        temperature: T > 0.
        static_cache: preallocate the KV cache (transformers' ``StaticCache``, fixed shapes) instead of
            growing it every step (``DynamicCache``); falls back to the dynamic cache, with one log line,
            where the model or the installed transformers does not support it.
        compile: decode steps through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) over the
            static cache (implies ``static_cache``); CUDA only (one log line and eager decoding elsewhere).

    Every option samples the same distribution with the same random numbers: one ``torch.multinomial``
    draw per step over all rows, outside any compiled region, so the tokens and log-probs equal those
    of a forward pass over the whole sequence at every step (pinned by tests against such a reference).

    Returns:
        ``(prompt_ids (B, P) left-padded, prompt_mask (B, P), responses (B, R), sample_logprobs (B, R))``
        with R <= max_new_tokens (generation stops when every row has emitted EOS, on every process),
        PAD after each row's EOS and 0 log-prob there.
    """
    device = next(model.parameters()).device
    ids, mask = pad_sequences(prompts, pad_id, left=True)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    decoder = KVDecoder(model, B, P + max_new_tokens, static_cache or compile, compile)
    # The attention mask of the whole sequence, allocated once: column P + t becomes 1 when row b chose
    # token t while still alive (0 after its EOS). Dynamic cache: the first P + t columns are passed;
    # static cache: all ``decoder.max_len`` of them (fixed shape; later columns are hidden by causality).
    full_mask = torch.cat([mask, mask.new_zeros(B, decoder.max_len - P)], dim=1)
    step_ids, step_pos = ids, position_ids_from_mask(mask)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    sync = dist.is_initialized() and dist.get_world_size() > 1
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logits = decoder(step_ids, full_mask, step_pos, P + t - step_ids.shape[1])  # (B, V) at position P+t-1
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1).squeeze(-1)  # (B,) pure sampling, global torch RNG
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        lp = torch.where(finished, torch.zeros_like(logp[:, 0]), logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        tokens.append(tok)
        logps.append(lp)
        full_mask[:, P + t] = (~finished).long()
        finished = finished | (tok == eos_id)
        step_ids = tok.unsqueeze(-1)
        step_pos = (full_mask[:, : P + t + 1].sum(-1, keepdim=True) - 1).clamp(min=0)
        done = finished.all().to(torch.int32)
        if sync:  # every process runs the same number of forwards (ZeRO-3 gathers need all of them)
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if bool(done):
            break
    return ids, mask, torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


_logged_once: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged_once:
        _logged_once.add(msg)
        log.warning(msg)


def _hf_model(model):
    """The transformers model (under a peft wrapper, its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class KVDecoder:
    """The forward passes of :func:`sample_responses`: the prompt (prefill), then one token per call,
    with a KV cache passed the way the installed transformers expects.

    transformers >= 5.x names the cache argument ``cache`` (``past_key_values`` warns and is removed in
    5.40); earlier versions call it ``past_key_values``. The name is read from the model's ``forward``
    signature, and the cache is an explicit object (``DynamicCache``, or ``StaticCache`` with
    ``static``) updated in place, so the model's output is never consulted for it.

    ``static``: the cache is preallocated for ``max_len`` positions, rounded up to a multiple of
    ``STATIC_BUCKET`` (so that rollouts with other prompt widths reuse the same shapes); the attention mask
    passed has that fixed width. ``compile`` (CUDA only): decode steps (one token) run through
    ``torch.compile(model.forward, mode="reduce-overhead")``, i.e. CUDA graphs over the static cache. The
    compiled function and the static cache are then kept on the model and reused while (batch, length,
    dtype) stay the same, so the graphs are recorded once per shape; the cache's memory (batch x length x
    layers x 2 x kv heads x head dim) stays allocated between rollouts. Without ``compile`` the static
    cache is freed after each call. Where an option does not apply it is dropped with one log line: a
    model or transformers without static-cache support, compile off CUDA, a failing compilation (before
    the cache was touched).
    """

    STATIC_BUCKET = 128
    allow_cpu_compile = False  # tests only: compile on CPU (inductor, no CUDA graphs) to exercise the path

    def __init__(self, model, batch: int, max_len: int, static: bool = False, compile: bool = False):
        self.model = model
        hf = _hf_model(model)
        try:
            self.params = frozenset(inspect.signature(hf.forward).parameters)
        except (TypeError, ValueError):
            self.params = frozenset()
        self.cache_kw = "cache" if "cache" in self.params else "past_key_values"
        self.max_len = max_len
        self.static = False
        self.step_fn = None
        self.cache = None
        if static:
            bucketed = -(-max_len // self.STATIC_BUCKET) * self.STATIC_BUCKET
            self.cache = self._static_cache(hf, batch, bucketed, keep=compile)
            self.static = self.cache is not None
            self.max_len = bucketed if self.static else max_len
        if self.cache is None:
            self.cache = _dynamic_cache(hf)
        if compile:
            self.step_fn = self._compiled_step(hf) if self.static else None
            if not self.static:
                _log_once("rollout.compile needs the static cache, which is unavailable here: decoding eagerly")

    # -- construction ------------------------------------------------------------------------------
    def _static_cache(self, hf, batch: int, max_len: int, keep: bool):
        try:
            from transformers import StaticCache
        except ImportError:
            _log_once("rollout.static_cache: this transformers has no StaticCache; using the dynamic cache")
            return None
        if not (getattr(hf, "_supports_static_cache", False) or getattr(hf, "_can_compile_fullgraph", False)):
            _log_once(f"rollout.static_cache: {type(hf).__name__} does not support a static cache; "
                      "using the dynamic cache")
            return None
        p = next(hf.parameters())
        key = (batch, max_len, p.dtype, p.device)
        held = getattr(hf, "_rto_static_cache", None)
        if held is not None and held[0] == key:
            held[1].reset()
            return held[1]
        hf._rto_static_cache = None  # a held cache of another shape: free it first
        sig = inspect.signature(StaticCache.__init__).parameters
        kw = {"config": hf.config, "max_cache_len": max_len}
        # transformers < 4.56 preallocates eagerly and needs the batch size, device and dtype
        for name, value in (("batch_size", batch), ("device", p.device), ("dtype", p.dtype)):
            if name in sig:
                kw[name] = value
        if "batch_size" not in sig and "max_batch_size" in sig:
            kw["max_batch_size"] = batch
        try:
            cache = StaticCache(**kw)
        except Exception as e:  # noqa: BLE001 -- any failure means: use the dynamic cache
            _log_once(f"rollout.static_cache: StaticCache failed ({type(e).__name__}: {e}); using the dynamic cache")
            return None
        if keep:
            hf._rto_static_cache = (key, cache)
        return cache

    def _compiled_step(self, hf):
        p = next(hf.parameters())
        if p.device.type != "cuda" and not self.allow_cpu_compile:
            _log_once("rollout.compile: CUDA graphs need a CUDA device; decoding without torch.compile")
            return None
        if any(hasattr(q, "ds_id") for q in hf.parameters()):
            _log_once("rollout.compile: not with ZeRO-3 partitioned parameters; decoding without torch.compile")
            return None
        held = getattr(self.model, "_rto_compiled_forward", None)
        if held is None:
            mode = "reduce-overhead" if p.device.type == "cuda" else "default"
            try:
                held = torch.compile(self.model.forward, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 -- e.g. no inductor / no compiler: decode eagerly
                _log_once(f"rollout.compile: torch.compile unavailable ({type(e).__name__}: {e}); decoding eagerly")
                return None
            self.model._rto_compiled_forward = held
        return held

    # -- forward -------------------------------------------------------------------------------------
    def __call__(self, input_ids: Tensor, full_mask: Tensor, position_ids: Tensor, start: int) -> Tensor:
        """``(B, V)`` logits of the last input position. ``input_ids``: ``(B, q)`` tokens at sequence
        positions ``start .. start + q - 1``; ``full_mask``: ``(B, max_len)`` attention mask of the whole
        sequence (columns past ``start + q`` are ignored)."""
        q = input_ids.shape[1]
        mask = full_mask if self.static else full_mask[:, : start + q]
        kw = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
              self.cache_kw: self.cache, "use_cache": True}
        if "cache_position" in self.params:  # transformers < 5: the cache slots to write
            kw["cache_position"] = torch.arange(start, start + q, device=input_ids.device)
        if "logits_to_keep" in self.params:  # the prompt's logits are never needed
            kw["logits_to_keep"] = 1
        elif "num_logits_to_keep" in self.params:  # the name before transformers 4.50
            kw["num_logits_to_keep"] = 1
        if self.step_fn is not None and q == 1:
            before = int(self.cache.get_seq_length())  # a tensor updated in place by static layers
            try:
                return self.step_fn(**kw).logits[:, -1].clone()  # the graph's output buffer is reused
            except Exception as e:  # noqa: BLE001
                if int(self.cache.get_seq_length()) != before:
                    raise  # the cache was already written: not recoverable here
                _log_once(f"rollout.compile: torch.compile failed ({type(e).__name__}: {e}); decoding eagerly")
                self.step_fn = None
        return self.model(**kw).logits[:, -1]


def _dynamic_cache(hf):
    """An empty ``DynamicCache`` for ``hf`` (with its config where the constructor takes one: sliding-window
    layers are then cached as the model would itself)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=hf.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


# ---------------------------------------------------------------------------------------------------
# Building the buffer
# ---------------------------------------------------------------------------------------------------


def layout(prompt_chunks: list[tuple[Tensor, Tensor]], response_chunks: list[Tensor], logp_chunks: list[Tensor],
           pad_id: int, eos_id: int):
    """Merge generation chunks into one buffer: prompts re-left-padded to a common P, responses
    right-padded to a common R and truncated after the first EOS.

    Returns:
        ``(sequences (B, P+R), attention_mask (B, P+R), action_mask (B, R), has_eos (B,),
        sample_logprobs (B, R), P)``.
    """
    P = max(p.shape[1] for p, _ in prompt_chunks)
    R = max(r.shape[1] for r in response_chunks)
    ids, pmask, resp, slp = [], [], [], []
    for (p, m), r, lp in zip(prompt_chunks, response_chunks, logp_chunks):
        b = p.shape[0]
        ids.append(torch.cat([p.new_full((b, P - p.shape[1]), pad_id), p], 1))
        pmask.append(torch.cat([m.new_zeros((b, P - m.shape[1])), m], 1))
        resp.append(torch.cat([r, r.new_full((b, R - r.shape[1]), pad_id)], 1))
        slp.append(torch.cat([lp, lp.new_zeros((b, R - lp.shape[1]))], 1))
    responses, action_mask, has_eos = truncate_after_eos(torch.cat(resp), eos_id, pad_id)
    sample_logprobs = torch.cat(slp) * action_mask
    sequences = torch.cat([torch.cat(ids), responses], 1)
    attention_mask = torch.cat([torch.cat(pmask), action_mask.long()], 1)
    return sequences, attention_mask, action_mask, has_eos, sample_logprobs, P


def generate(actor, prompts: list[list[int]], ropts, pad_id: int, eos_id: int):
    """Pure sampling (:func:`sample_responses`) in chunks of ``ropts.generation_batch_size`` prompts, merged
    into one buffer; returns what :func:`layout` returns. ``ropts``: ``RolloutOptions`` (its
    ``static_cache`` and ``compile`` choose the decoding path; all paths sample alike)."""
    static, compiled = getattr(ropts, "static_cache", False), getattr(ropts, "compile", False)
    chunks, responses, logps = [], [], []
    for s in range(0, len(prompts), ropts.generation_batch_size):
        p, pm, resp, lp = sample_responses(actor, prompts[s : s + ropts.generation_batch_size], pad_id, eos_id,
                                           ropts.max_new_tokens, ropts.temperature, static, compiled)
        chunks.append((p, pm))
        responses.append(resp)
        logps.append(lp)
    return layout(chunks, responses, logps, pad_id, eos_id)


@torch.no_grad()
def score_rollout(
    roles: Roles,
    sequences: Tensor,
    attention_mask: Tensor,
    action_mask: Tensor,
    prompt_width: int,
    temperature: float,
    forward_batch_size: int,
    need_dpo: bool,
) -> dict[str, Tensor]:
    """All no-grad forward passes over the buffer, in micro-batches (trimmed per micro-batch).

    Returns a dict with ``old_logprobs, ref_logprobs, entropy, values, raw_scores`` and, when
    ``need_dpo``, ``dpo_logprobs`` and ``dpo_ref_logprobs`` (the latter None when T = 1 and the DPO
    reference is the PPO reference: then it equals ``ref_logprobs``). All ``(B, R)`` except
    ``raw_scores (B,)``; exactly 0 where ``action_mask`` is 0.
    """
    B, R = action_mask.shape
    device = sequences.device
    out = {k: torch.zeros(B, R, device=device) for k in ("old_logprobs", "ref_logprobs", "entropy", "values")}
    out["raw_scores"] = torch.zeros(B, device=device)
    separate_dpo_ref = need_dpo and (temperature != 1.0 or roles.dpo_reference is not None)
    if need_dpo:
        out["dpo_logprobs"] = torch.zeros(B, R, device=device)
    if separate_dpo_ref:
        out["dpo_ref_logprobs"] = torch.zeros(B, R, device=device)
    dummy = _dummy_experience(sequences, attention_mask, action_mask, prompt_width)
    for s in range(0, B, forward_batch_size):
        idx = torch.arange(s, min(B, s + forward_batch_size), device=device)
        mb = dummy.select(idx).trimmed()
        seq, am, m, P = mb.sequences, mb.attention_mask, mb.action_mask, mb.prompt_width
        r = m.shape[1]
        fm = m.float()
        logits = response_logits(roles.actor, seq, am, P)
        out["old_logprobs"][idx, :r] = gather_logprobs(logits, seq[:, P:], temperature) * fm
        out["entropy"][idx, :r] = entropy_from_logits(logits.float() / temperature) * fm
        del logits
        with roles.reference_context():
            ref_logits = response_logits(roles.reference, seq, am, P)
        out["ref_logprobs"][idx, :r] = gather_logprobs(ref_logits, seq[:, P:], temperature) * fm
        if need_dpo:
            if roles.dpo_reference is not None:
                d_ref_logits = response_logits(roles.dpo_reference, seq, am, P)
                out["dpo_ref_logprobs"][idx, :r] = gather_logprobs(d_ref_logits, seq[:, P:], 1.0) * fm
            elif temperature != 1.0:
                out["dpo_ref_logprobs"][idx, :r] = gather_logprobs(ref_logits, seq[:, P:], 1.0) * fm
            dpo_model = roles.reference if roles.dpo_adapter else roles.dpo_model
            dpo_logits = response_logits(dpo_model, seq, am, P)  # adapter on (the peft default)
            out["dpo_logprobs"][idx, :r] = gather_logprobs(dpo_logits, seq[:, P:], 1.0) * fm
            del dpo_logits
        del ref_logits
        if roles.critic is not None:
            out["values"][idx, :r] = response_values(roles.critic, seq, am, P) * fm
        out["raw_scores"][idx] = sequence_scores(roles.reward_model, seq, am)
    return out


def _dummy_experience(sequences, attention_mask, action_mask, P) -> Experience:
    z = torch.zeros(action_mask.shape, device=sequences.device)
    zb = torch.zeros(action_mask.shape[0], device=sequences.device)
    return Experience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask, prompt_width=P,
        has_eos=zb.bool(), sample_logprobs=z, old_logprobs=z, ref_logprobs=z, entropy=z, dpo_logprobs=None,
        dpo_ref_logprobs=None, values=z, raw_scores=zb, scores=zb,
    )


# ---------------------------------------------------------------------------------------------------
# Score, rewards, advantages (every equation from rto_sim.core)
# ---------------------------------------------------------------------------------------------------


def sequence_score(raw_scores: Tensor, has_eos: Tensor, rcfg, rm_mean: float, rm_std: float) -> Tensor:
    """R = clip(normalize(r_RM), -c, c), then the missing-EOS penalty on completions without EOS.

    Args:
        raw_scores: ``(B,)`` reward-model outputs.
        has_eos: ``(B,)`` from the response only.
        rcfg: ``RewardOptions``.
        rm_mean, rm_std: the RM's saved score statistics (used when ``rcfg.normalize``).
    """
    mean, std = (rm_mean, rm_std) if rcfg.normalize else (0.0, 1.0)
    score = normalize_score(raw_scores.float(), mean, std, clip=rcfg.score_clip or None)
    if rcfg.missing_eos_mode == "off":
        return score
    return apply_missing_eos_penalty(
        score, has_eos, rcfg.missing_eos_penalty, subtract=rcfg.missing_eos_mode == "subtract"
    )


def delimiter_table(tokenizer, delimiters: str) -> Tensor:
    """``(V,)`` bool: token ids whose text ends with one of the comma-separated ``delimiters``."""
    delims = [d.replace("\\n", "\n") for d in delimiters.split(",") if d]
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i]).rstrip(" ")
        table[i] = any(text.endswith(d) for d in delims) if text else False
    return table


def assemble_rewards(exp: Experience, kl_coef: float, rcfg, kl_kind: str, tcfg,
                     delimiters: Tensor | None = None) -> RewardTerms:
    """Fill ``exp.rewards`` with :func:`rto_sim.core.compute_rto_rewards` (RTO eq. 4.7); returns it.

    Args:
        exp: the buffer (scores and log-probs filled).
        kl_coef: beta2 for this rollout (from the KL controller).
        rcfg: ``RewardOptions`` (beta3).
        kl_kind: ``"k1" | "k2" | "k3"``.
        tcfg: ``RTOOptions`` (mode, beta1, dpo_clip).
        delimiters: ``(V,)`` bool table (semi_rto only).
    """
    resp = exp.sequences[:, exp.prompt_width :]
    delimiter_mask = delimiters.to(resp.device)[resp] if (tcfg.mode == "semi_rto" and delimiters is not None) else None
    exp.rewards = compute_rto_rewards(
        exp.scores,
        exp.old_logprobs,
        exp.ref_logprobs,
        exp.action_mask,
        beta2=kl_coef,
        beta3=rcfg.beta3,
        dpo_logprobs=exp.dpo_logprobs,
        beta1=tcfg.beta1 if tcfg.uses_dpo else 0.0,
        dpo_clip=tcfg.dpo_clip or None,
        mode=tcfg.mode,
        kl_kind=kl_kind,
        delimiter_mask=delimiter_mask,
        dpo_ref_logprobs=exp.dpo_ref_logprobs,
    )
    return exp.rewards


def compute_advantages(exp: Experience, pcfg) -> None:
    """Fill ``advantages_raw``, ``returns`` and ``advantages`` (whitened over the whole buffer).

    Args:
        exp: the buffer with ``rewards`` and ``values``.
        pcfg: ``PPOOptions`` (estimator, gamma, lam, whiten_advantages).
    """
    estimator = get_advantage_estimator(pcfg.advantage_estimator)
    adv, ret = estimator(exp.rewards.token_level_rewards, exp.values, exp.action_mask, gamma=pcfg.gamma, lam=pcfg.lam)
    exp.advantages_raw, exp.returns = adv, ret
    # REINFORCE++ already whitens its advantages; whitening twice would be a no-op.
    if pcfg.whiten_advantages and pcfg.advantage_estimator == "gae":
        exp.advantages = whiten_over_processes(adv, exp.action_mask)
    else:
        exp.advantages = adv


def whiten_over_processes(x: Tensor, mask: Tensor) -> Tensor:
    """:func:`rto_sim.core.masked_whiten` over the *whole* rollout buffer, also when it is split over
    processes: every process gathers all rows (padded to a common width), whitens the full buffer with
    the core function and keeps its own rows. One process: ``masked_whiten(x, mask)``.

    Args:
        x: ``(B_local, R_local)`` advantages of this process.
        mask: ``(B_local, R_local)``.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return masked_whiten(x, mask)
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor([x.shape[0], x.shape[1]], device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    B, R = max(int(s[0]) for s in shapes), max(int(s[1]) for s in shapes)
    pad_x = torch.zeros(B, R, dtype=x.dtype, device=x.device)
    pad_m = torch.zeros(B, R, dtype=x.dtype, device=x.device)  # float: gloo has no bool all_gather
    pad_x[: x.shape[0], : x.shape[1]] = x
    pad_m[: x.shape[0], : x.shape[1]] = mask.to(x.dtype)
    xs, ms = [torch.zeros_like(pad_x) for _ in range(world)], [torch.zeros_like(pad_m) for _ in range(world)]
    dist.all_gather(xs, pad_x)
    dist.all_gather(ms, pad_m)
    full = masked_whiten(torch.cat(xs), torch.cat(ms))  # (world * B, R)
    return full[rank * B : rank * B + x.shape[0], : x.shape[1]]
