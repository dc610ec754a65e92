"""Export a simulator token task (`rto_sim.token_task.TokenTask`) as a folder the LLM stages train on unchanged.

The folder (``export_task``)::

    task.json            the task (rebuilds the MDP, features, theta*, words; TokenTask.from_json)
    model/               tokenizer + a tiny randomly initialized Llama sized for the task (the SFT start)
    sft.jsonl            {"prompt", "response"} rows, x ~ rho, y ~ the MDP's pi_ref (+ prompt_index, R)
    prompts.jsonl        {"prompt"} RL prompts drawn from rho (PPO / RTO stages)
    eval_prompts.jsonl   every prompt once, with its index and rho
    sft.yaml             an ordinary `rto-llm sft` config for this folder (absolute paths)
    export.json          what was exported, with the seeds and the data settings the stages need

Tokenizer (``build_task_tokenizer``): a word-level `tokenizers` model with a whitespace-split
pre-tokenizer wrapped in `PreTrainedTokenizerFast`. Vocabulary, in id order: ``<pad> <bos> EOS <unk>``,
the task tokens ``a0 .. a{A-2}`` (action i -> id 4 + i), then the prompt words. The task's EOS action is
the tokenizer's eos token (same word), so "the response ends with EOS" means the same on both sides;
PAD is distinct from EOS (the trainers refuse PAD == EOS). No chat template: the stages run with
``data.apply_chat_template=false`` and tokenize a prompt as ``<bos> p_k`` (BOS from the post-processor,
as `rto_llm.data` asks with ``add_special_tokens=True``) and a response without special tokens.

Response text and EOS: an EOS-terminated response is written with its EOS word (``"a0 a2 <eos>"``); the
loader keeps it (it cuts after the last EOS). A response of exactly H tokens without EOS is written
without it, and the loader appends EOS (``rto_llm.data`` always ends a training response with EOS): that
extra token sits at position H + 1, beyond the task's horizon, so it never changes a task response's
probability (generation stops at ``max_new_tokens = H``); it is the only place where the trained sequence
differs from the task's response. ``data.max_len`` is set to prompt + H + 1 tokens for it.

Preferences (``sample_preferences``): as in real RLHF, two responses per prompt (x ~ rho) are drawn from
the SFT model by pure sampling (softmax of the logits at temperature 1, no top-k / top-p, max_new_tokens = H)
and labelled by Bradley-Terry on the gold R (label sampled, ``TokenTask.label_pairs``). A draw that contains
a token that is not a task token (PAD, BOS, UNK, a prompt word) is not a task response: it is counted,
reported (``prefs_stats.json``, with examples) and **redrawn** for the same prompt until valid (at most
``max_rounds`` rounds, then an error). The pairs therefore follow the model's distribution conditioned on
validity, the same convention as `rto_llm.exact_eval` (sequence-level renormalization over valid responses).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rto_sim.token_task import TokenTask

log = logging.getLogger(__name__)

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
RESERVED = (PAD, BOS, UNK)
FIRST_ACTION_ID = 4          # ids 0..3 = <pad> <bos> EOS <unk>


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def task_vocab(task: TokenTask) -> dict[str, int]:
    """word -> id of the task tokenizer: <pad> <bos> EOS <unk>, the non-EOS task tokens, the prompt words."""
    words = [PAD, BOS, task.eos_word, UNK] + list(task.token_words[:-1]) + list(task.prompt_words)
    clash = sorted(set(RESERVED) & (set(task.token_words) | set(task.prompt_words)))
    if clash:
        raise ValueError(f"task words {clash} are reserved for the tokenizer's special tokens {RESERVED}: rename "
                         "them in token_words / prompt_words")
    return {w: i for i, w in enumerate(words)}


def action_token_ids(task: TokenTask) -> np.ndarray:
    """(A,) token id of each action: action i < A-1 -> 4 + i, the EOS action -> the eos id (2)."""
    ids = np.arange(FIRST_ACTION_ID, FIRST_ACTION_ID + task.A - 1)
    return np.concatenate([ids, [2]]).astype(np.int64)


def build_task_tokenizer(task: TokenTask):
    """Word-level `PreTrainedTokenizerFast` for the task (see module docstring); BOS added to plain text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = task_vocab(task)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=task.eos_word, pad_token=PAD,
                                   unk_token=UNK)


def check_task_tokenizer(tokenizer, task: TokenTask, what: str = "tokenizer") -> None:
    """Raise ValueError unless ``tokenizer`` is the task's (same vocabulary, special tokens and prompt ids)."""
    want = task_vocab(task)
    got = tokenizer.get_vocab()
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        moved = sorted(w for w in set(want) & set(got) if want[w] != got[w])[:5]
        raise ValueError(f"{what}: its vocabulary is not the task's ({len(got)} vs {len(want)} tokens; missing "
                         f"{missing}, extra {extra}, different ids {moved}): use the tokenizer exported with the "
                         "task (TASK_DIR/model, or build_task_tokenizer(task))")
    for attr, word in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", task.eos_word)):
        if getattr(tokenizer, attr) != want[word]:
            raise ValueError(f"{what}: {attr} is {getattr(tokenizer, attr)}, the task's is {want[word]} ({word!r}); "
                             "use the tokenizer exported with the task")
    p = tokenizer(task.prompt_words[0], add_special_tokens=True)["input_ids"]
    if list(p) != [want[BOS], want[task.prompt_words[0]]]:
        raise ValueError(f"{what}: a prompt tokenizes to {list(p)}, expected [<bos>, prompt word]; use the tokenizer "
                         "exported with the task")


def prompt_token_ids(tokenizer, task: TokenTask) -> list[list[int]]:
    """Token ids of each prompt, exactly as `rto_llm.data` builds them without a chat template."""
    return [list(tokenizer(w, add_special_tokens=True)["input_ids"]) for w in task.prompt_words]


def data_settings(task: TokenTask) -> dict:
    """The `data.*` settings every stage needs on this task (no chat template; lengths that fit)."""
    return {"apply_chat_template": False, "max_prompt_len": 2, "max_len": 2 + task.H + 1}


# ---------------------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------------------


def load_task(task) -> TokenTask:
    """A TokenTask, a task folder (holding task.json) or a task.json path -> TokenTask."""
    if isinstance(task, TokenTask):
        return task
    if isinstance(task, (str, os.PathLike)):
        path = os.fspath(task)
        if os.path.isdir(path):
            path = os.path.join(path, "task.json")
        if not os.path.isfile(path):
            raise ValueError(f"task: {path!r} does not exist; pass a TokenTask, a folder written by export_task or "
                             "its task.json")
        return TokenTask.from_json(path)
    raise ValueError(f"task must be a TokenTask, a task folder or a task.json path, got {type(task).__name__}")


def load_model_and_tokenizer(model, tokenizer, task: TokenTask, what: str = "policy"):
    """(model, tokenizer) from a model directory or a model object; the tokenizer (given, else the directory's,
    else the task's) is checked against the task, and the model's vocabulary size against the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(f"{what}: {path!r} is not a model directory; pass a local Hugging Face model folder "
                             "(e.g. runs/sft/final) or a model object")
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            own = AutoTokenizer.from_pretrained(path, local_files_only=True)
            check_task_tokenizer(own, task, what=f"{what} tokenizer ({path})")
            tokenizer = own if tokenizer is None else tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if tokenizer is None:
        tokenizer = build_task_tokenizer(task)
    check_task_tokenizer(tokenizer, task, what=f"{what} tokenizer")
    n_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if n_vocab is not None and n_vocab != len(tokenizer):
        raise ValueError(f"{what}: the model has vocab_size={n_vocab} but the task tokenizer has {len(tokenizer)} "
                         "tokens: this model was not built for this task; start from TASK_DIR/model")
    return model, tokenizer


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Sampling (pure sampling at temperature 1, no KV cache, optional restriction to allowed tokens)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_token_responses(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                           generator: torch.Generator, allowed_ids=None, batch_size: int = 512) -> list[list[int]]:
    """Draw one response per prompt from softmax(logits) (no top-k / top-p / penalties): each response is its
    tokens through the first EOS, or ``max_new_tokens`` tokens. With ``allowed_ids`` the logits of every
    other token are set to -inf (the task-restricted policy). Left padding, position ids from the mask;
    finished rows are fed PAD with attention 0. The task's sequences are short, so every step re-runs the
    whole sequence (no KV cache: no cache API to depend on). Draws use ``generator`` (CPU) only."""
    from rto_llm.data import pad_sequences
    from rto_llm.models import position_ids_from_mask

    device = model_device(model)
    was_training = model.training
    model.eval()
    block = None
    if allowed_ids is not None:
        n_vocab = model.get_output_embeddings().weight.shape[0]
        block = torch.ones(n_vocab, dtype=torch.bool, device=device)
        block[torch.as_tensor(np.asarray(allowed_ids), device=device)] = False
    out: list[list[int]] = []
    try:
        for k in range(0, len(prompts), batch_size):
            ids, mask = pad_sequences(prompts[k : k + batch_size], pad_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
            toks = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               use_cache=False).logits[:, -1].float()
                if block is not None:
                    logits = logits.masked_fill(block[: logits.shape[-1]], float("-inf"))
                probs = torch.softmax(logits, dim=-1).cpu()
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
                tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
                toks.append(tok)
                alive = (~finished).long()
                finished = finished | (tok == eos_id)
                ids = torch.cat([ids, tok.unsqueeze(-1)], dim=-1)
                mask = torch.cat([mask, alive.unsqueeze(-1)], dim=-1)
                if bool(finished.all()):
                    break
            for r in torch.stack(toks, dim=1).tolist():
                out.append(r[: r.index(eos_id) + 1] if eos_id in r else r)
    finally:
        model.train(was_training)
    return out


def token_ids_to_actions(ids: list[int], task: TokenTask) -> list[int] | None:
    """Map a generated response (token ids) to task actions; None when it holds a non-task token."""
    lookup = {int(t): a for a, t in enumerate(action_token_ids(task))}
    acts = [lookup.get(int(t)) for t in ids]
    if any(a is None for a in acts) or not task.is_valid(acts):
        return None
    return acts


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


@dataclass
class TaskExport:
    """Paths of an exported task folder."""

    root: str
    task_json: str
    model_dir: str
    sft: str
    prompts: str
    eval_prompts: str
    sft_config: str
    info: dict = field(default_factory=dict)


def _write_jsonl(path: str, rows: list[dict]) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def build_task_model(task: TokenTask, tokenizer=None, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialized tiny `LlamaForCausalLM` for the task's tokenizer (no download)."""
    from rto_llm.testing import build_tiny_llama

    tokenizer = tokenizer if tokenizer is not None else build_task_tokenizer(task)
    if hidden_size < 8 or hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads) and >= 8, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                            max_position_embeddings=max(64, 4 * (task.H + 3)))


def export_task(task: TokenTask, out_dir: str, n_sft: int = 2048, n_rl_prompts: int = 512, seed: int = 0,
                hidden_size: int = 64, num_layers: int = 2, model_seed: int = 0, overwrite: bool = False,
                sft_overrides: dict | None = None) -> TaskExport:
    """Write the task folder (see module docstring). SFT rows: x ~ rho, y ~ pi_ref of the task's MDP (seed);
    RL prompts: x ~ rho (seed + 1). ``sft_overrides``: extra `train.*` values for sft.yaml."""
    if not isinstance(task, TokenTask):
        raise ValueError(f"task must be a TokenTask (rto_sim.token_task.make_token_task), got {type(task).__name__}")
    for name, v in (("n_sft", n_sft), ("n_rl_prompts", n_rl_prompts)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "task.json")) and not overwrite:
        raise ValueError(f"out_dir {out_dir!r} already holds a task.json: pass overwrite=True or another folder")
    os.makedirs(out_dir, exist_ok=True)
    tok = build_task_tokenizer(task)
    check_task_tokenizer(tok, task)
    task_json = os.path.join(out_dir, "task.json")
    task.to_json(task_json)
    model_dir = os.path.join(out_dir, "model")
    model = build_task_model(task, tok, hidden_size=hidden_size, num_layers=num_layers, seed=model_seed)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sft = _write_jsonl(os.path.join(out_dir, "sft.jsonl"), task.sft_rows(n_sft, seed))
    x = np.random.default_rng(seed + 1).choice(task.n_prompts, size=n_rl_prompts, p=task.rho)
    prompts = _write_jsonl(os.path.join(out_dir, "prompts.jsonl"),
                           [{"prompt": task.prompt_words[p], "prompt_index": int(p)} for p in x])
    eval_prompts = _write_jsonl(
        os.path.join(out_dir, "eval_prompts.jsonl"),
        [{"prompt": w, "prompt_index": i, "rho": float(task.rho[i])} for i, w in enumerate(task.prompt_words)])
    data = data_settings(task)
    batch = int(min(32, n_sft))
    train = {"output_dir": os.path.join(out_dir, "sft"), "batch_size": batch, "micro_batch_size": batch,
             "lr": 3e-3, "warmup_ratio": 0.0, "epochs": 3, "device": "cpu", "seed": seed}
    train.update(sft_overrides or {})
    sft_cfg = {"model": {"path": model_dir}, "data": {"train_path": sft, **data}, "train": train,
               "log": {"progress_bar": False, "tensorboard": False}}
    import yaml

    sft_config = os.path.join(out_dir, "sft.yaml")
    with open(sft_config, "w") as f:
        yaml.safe_dump(sft_cfg, f, sort_keys=False)
    info = {"n_sft": int(n_sft), "n_rl_prompts": int(n_rl_prompts), "seed": int(seed), "hidden_size": hidden_size,
            "num_layers": num_layers, "model_seed": model_seed, "data": data,
            "vocab": task_vocab(task), "action_token_ids": action_token_ids(task).tolist()}
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(info, f, indent=1)
    return TaskExport(root=out_dir, task_json=task_json, model_dir=model_dir, sft=sft, prompts=prompts,
                      eval_prompts=eval_prompts, sft_config=sft_config, info=info)


# ---------------------------------------------------------------------------------------------------
# Preference pairs from a model
# ---------------------------------------------------------------------------------------------------


@dataclass
class PreferenceStats:
    n_pairs: int
    n_draws: int                 # responses drawn in all (2 n_pairs + redraws)
    n_invalid: int               # draws that held a non-task token (redrawn)
    invalid_fraction: float      # n_invalid / n_draws
    rounds: int                  # sampling rounds used
    n_identical_pairs: int       # pairs whose two responses are equal (label is a fair coin)
    mean_chosen_return: float
    mean_rejected_return: float
    invalid_examples: list = field(default_factory=list)   # decoded invalid draws (at most 5)


@dataclass
class PreferenceSample:
    rows: list
    path: str | None
    stats: PreferenceStats


def sample_preferences(policy, task, n_pairs: int, seed: int, out_path: str | None = None, tokenizer=None,
                       max_rounds: int = 50, batch_size: int = 512) -> PreferenceSample:
    """Preference pairs sampled from ``policy`` (a model directory, e.g. TASK_DIR/sft/final, or a model) and
    labelled by Bradley-Terry on the gold return; written to ``out_path`` (default TASK_DIR/prefs.jsonl when
    ``task`` is a folder) as {"prompt", "chosen", "rejected"} rows (+ prompt_index, chosen_R, rejected_R,
    p_chosen) with ``prefs_stats.json`` next to it. Invalid draws are redrawn (module docstring)."""
    task_src = task
    task = load_task(task)
    if not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"n_pairs must be an integer >= 1, got {n_pairs!r}")
    if out_path is None and isinstance(task_src, (str, os.PathLike)) and os.path.isdir(task_src):
        out_path = os.path.join(os.fspath(task_src), "prefs.jsonl")
    model, tokenizer = load_model_and_tokenizer(policy, tokenizer, task, "policy")
    pids = prompt_token_ids(tokenizer, task)
    rng = np.random.default_rng(seed)
    x = rng.choice(task.n_prompts, size=n_pairs, p=task.rho)
    gen = torch.Generator().manual_seed(int(seed))
    want = np.concatenate([x, x])                       # first responses, then second responses
    acts: list = [None] * len(want)
    todo = np.arange(len(want))
    n_draws = n_invalid = rounds = 0
    examples: list[str] = []
    while len(todo) and rounds < max_rounds:
        rounds += 1
        drawn = sample_token_responses(model, [pids[p] for p in want[todo]], tokenizer.pad_token_id,
                                       tokenizer.eos_token_id, task.H, gen, batch_size=batch_size)
        n_draws += len(todo)
        bad = []
        for i, ids in zip(todo, drawn):
            a = token_ids_to_actions(ids, task)
            if a is None:
                bad.append(i)
                if len(examples) < 5:
                    examples.append(f"{task.prompt_words[want[i]]} -> {tokenizer.decode(ids)}")
            else:
                acts[i] = a
        n_invalid += len(bad)
        todo = np.asarray(bad, np.int64)
    if len(todo):
        raise ValueError(f"policy: after {rounds} rounds {len(todo)} responses are still invalid ({n_invalid} of "
                         f"{n_draws} draws held a non-task token, e.g. {examples[:2]}): the model puts too much mass "
                         "outside the task's tokens; train SFT (longer) on sft.jsonl or raise max_rounds")
    if n_invalid:
        log.warning("sample_preferences: %d of %d draws held a non-task token and were redrawn (e.g. %s)", n_invalid,
                    n_draws, examples[:2])
    first, second = acts[:n_pairs], acts[n_pairs:]
    lab = task.label_pairs(x, first, second, seed=np.random.default_rng([int(seed), 1]))
    rows = []
    for i in range(n_pairs):
        p_first = float(lab.p_first[i])
        rows.append({"prompt": task.prompt_words[x[i]], "chosen": task.response_text(lab.chosen[i]),
                     "rejected": task.response_text(lab.rejected[i]), "prompt_index": int(x[i]),
                     "chosen_R": float(lab.chosen_return[i]), "rejected_R": float(lab.rejected_return[i]),
                     "p_chosen": p_first if lab.first_preferred[i] else 1.0 - p_first})
    stats = PreferenceStats(
        n_pairs=int(n_pairs), n_draws=int(n_draws), n_invalid=int(n_invalid),
        invalid_fraction=n_invalid / max(n_draws, 1), rounds=rounds,
        n_identical_pairs=int(sum(a == b for a, b in zip(first, second))),
        mean_chosen_return=float(lab.chosen_return.mean()), mean_rejected_return=float(lab.rejected_return.mean()),
        invalid_examples=examples)
    if out_path is not None:
        _write_jsonl(out_path, rows)
        stats_path = os.path.splitext(out_path)[0] + "_stats.json"
        with open(stats_path, "w") as f:
            json.dump(asdict(stats), f, indent=1)
    return PreferenceSample(rows=rows, path=out_path, stats=stats)


__all__ = ["TaskExport", "PreferenceSample", "PreferenceStats", "action_token_ids", "build_task_model",
           "build_task_tokenizer", "check_task_tokenizer", "data_settings", "export_task", "load_task",
           "load_model_and_tokenizer", "prompt_token_ids", "sample_preferences", "sample_token_responses",
           "task_vocab", "token_ids_to_actions"]
