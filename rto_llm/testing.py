"""Tiny offline models and toy data shared by the tests, the benchmarks and the examples.

``build_tiny_tokenizer`` trains nothing from the network: a word-level vocabulary over a toy corpus,
wrapped as a ``PreTrainedTokenizerFast`` with distinct PAD / BOS / EOS and a small chat template.
``build_tiny_llama`` is a randomly initialized ``LlamaForCausalLM`` (hidden 64, 2 layers by default).
``toy_*_rows`` make learnable datasets: the response continues a digit sequence (+1 each step).

For the PPO / RTO stages:

- :func:`build_token_counting_rm`: a hand-set ``LlamaForSequenceClassification`` whose score rises with the
  fraction of a target token in the sequence (a reward model that "prefers a particular token"). One layer:
  zero queries and keys give uniform causal attention, so the last position sees the mean of the
  normalized token embeddings; embedding dimension 0 marks the target token, the head reads it.
- :func:`build_preferring_lm`: a copy of a causal LM nudged by a few gradient steps to put more mass on a
  target token (a stand-in DPO model that prefers it), as a full model or as a LoRA adapter.
- :func:`write_ppo_fixture`: actor / reward-model / DPO directories and a prompt file for a run;
  :func:`ppo_overrides`: the dotted overrides of a tiny CPU run on them.
"""

from __future__ import annotations

import copy
import json
import os
import random

import torch

from rto_llm.models import set_reward_stats

DIGITS = [str(i) for i in range(10)]
WORDS = ["count", "up", "from", "please", "the", "next", "numbers", "are", "wrong", "ok", "hello"]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(extra_words: tuple[str, ...] = (), pad_token: str = "<pad>"):
    """A word-level tokenizer over digits and a few words; PAD, BOS, EOS distinct; chat template set.

    Args:
        extra_words: more vocabulary (used by tests to build a *different* vocabulary).
        pad_token: the PAD token (tests pass ``"<eos>"`` to get the forbidden PAD == EOS).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + DIGITS + WORDS + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token=pad_token,
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    # A plain (non-chat) prompt starts with BOS; responses are tokenized without special tokens.
    fast.add_bos_token = True
    return fast


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|reserved_special_token_0|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_llama3_style_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer shaped like Llama-3-Instruct's: ``<|begin_of_text|>`` BOS, ``<|eot_id|>`` EOS,
    header tokens and a Llama-3-like chat template, and **no PAD** (as shipped by Meta; SmolLM2 likewise has no
    PAD distinct from EOS). ``model.pad_token=auto`` adds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["system", "user", "assistant", "<unk>"] + DIGITS + WORDS + list(extra_words)
    vocab = {tok: i for i, tok in enumerate(words + LLAMA3_SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    others = [t for t in LLAMA3_SPECIAL if t not in ("<|begin_of_text|>", "<|eot_id|>")]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   unk_token="<unk>", additional_special_tokens=others)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.add_bos_token = True
    return fast


def build_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialized tiny ``LlamaForCausalLM`` matching ``tokenizer``'s special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def llama_1b_config(tokenizer_vocab: int = 32000):
    """A ~1.1B-parameter Llama shape (TinyLlama-like) for GPU benchmarks (random init)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer_vocab,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def save_model_dir(path: str, model, tokenizer) -> str:
    """Write ``model`` and ``tokenizer`` to the model directory ``path``; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(path: str, seed: int = 0, llama3_style: bool = False, **overrides) -> str:
    """Write a tiny Llama and its tokenizer to ``path`` (a model directory); returns ``path``. With
    ``llama3_style`` the tokenizer is :func:`build_llama3_style_tokenizer` (no PAD) and the config has no
    ``pad_token_id``, like Meta's Llama-3 checkpoints."""
    tok = build_llama3_style_tokenizer() if llama3_style else build_tiny_tokenizer()
    return save_model_dir(path, build_tiny_llama(tok, seed=seed, **overrides), tok)


def set_adapter_base(adapter_dir: str, base_dir: str) -> None:
    """Point a saved LoRA adapter at its base model directory (``base_model_name_or_path``)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = base_dir
    with open(path, "w") as f:
        json.dump(acfg, f)


def _count(rng: random.Random, n: int) -> tuple[str, str]:
    start = rng.randrange(0, 10)
    seq = [str((start + i) % 10) for i in range(n)]
    return " ".join(seq), " ".join(str((start + n + i) % 10) for i in range(n))


def toy_sft_rows(n: int = 64, seed: int = 0, length: int = 4) -> list[dict]:
    """Prompt 'count up from a b c d' -> response 'e f g h' (digits continue +1 mod 10)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, r = _count(rng, length)
        rows.append({"prompt": f"count up from {p}", "response": r})
    return rows


def toy_preference_rows(n: int = 64, seed: int = 0, length: int = 4) -> list[dict]:
    """Chosen = the correct continuation; rejected = a shuffled one plus 'wrong'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, r = _count(rng, length)
        bad = r.split()
        rng.shuffle(bad)
        rows.append({"prompt": f"count up from {p}", "chosen": r, "rejected": " ".join(bad) + " wrong"})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# PPO / RTO fixtures
# ---------------------------------------------------------------------------------------------------

TARGET_WORD = "ok"


def build_token_counting_rm(tokenizer, target_id: int, hidden_size: int = 32):
    """A deterministic reward model: score = increasing function of the target token's frequency."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 1] = 1.0  # a constant direction
        # the feature the head reads: 1 for the target, small fixed values for the others (so that every
        # sequence gets its own nonzero score)
        emb[:, 0] = 0.1 * torch.randn(emb.shape[0], generator=torch.Generator().manual_seed(target_id))
        emb[target_id, 0] = 1.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight.copy_(torch.eye(hidden_size))
        attn.o_proj.weight.copy_(torch.eye(hidden_size))
        model.score.weight[0, 0] = 1.0
    set_reward_stats(model, 0.0, 1.0)
    return model.eval()


def build_preferring_lm(base, target_id: int, steps: int = 30, lr: float = 1e-2, lora_rank: int = 0, seed: int = 0):
    """A copy of ``base`` trained a few steps to raise log p(target) after random contexts.

    With ``lora_rank > 0`` returns a peft model (LoRA on all linear layers of the copy) instead.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=True))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = base.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(7, vocab, (8, 6))  # skip the special tokens
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = -torch.log_softmax(logits.float(), -1)[..., target_id].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_ppo_fixture(root: str, hidden_size: int = 32, n_prompts: int = 64, seed: int = 0,
                      dpo: str = "none", llama3_style: bool = False) -> dict[str, str]:
    """Write ``actor`` (tiny Llama + tokenizer), ``rm`` (token-counting RM), optional ``dpo`` (full model)
    or ``dpo_adapter`` (LoRA adapter over ``actor``), and ``prompts.jsonl`` under ``root``.

    Args:
        dpo: "none", "full", "adapter" or "both".
        llama3_style: every role with :func:`build_llama3_style_tokenizer` (no PAD: the trainer adds one and
            resizes every role) instead of the tiny tokenizer.
    """
    tok = build_llama3_style_tokenizer() if llama3_style else build_tiny_tokenizer()
    target = tok.convert_tokens_to_ids(TARGET_WORD)
    paths = {"root": root, "target_id": str(target)}
    actor = build_tiny_llama(tok, hidden_size=hidden_size, seed=seed)
    paths["actor"] = save_model_dir(os.path.join(root, "actor"), actor, tok)
    rm = build_token_counting_rm(tok, target, hidden_size=hidden_size)
    paths["rm"] = save_model_dir(os.path.join(root, "rm"), rm, tok)
    if dpo in ("full", "both"):
        paths["dpo"] = save_model_dir(os.path.join(root, "dpo"), build_preferring_lm(actor, target), tok)
    if dpo in ("adapter", "both"):
        paths["dpo_adapter"] = os.path.join(root, "dpo_adapter")
        build_preferring_lm(actor, target, lora_rank=4).save_pretrained(paths["dpo_adapter"])
        set_adapter_base(paths["dpo_adapter"], paths["actor"])
    rows = [{"prompt": r["prompt"]} for r in toy_sft_rows(n_prompts, seed=seed)]
    paths["prompts"] = write_jsonl(os.path.join(root, "prompts.jsonl"), rows)
    return paths


def ppo_overrides(paths: dict[str, str], out_dir: str, *extra: str, rollout: int = 8, train_batch: int = 8,
                  micro: int = 4, max_new_tokens: int = 6) -> list[str]:
    """Dotted overrides for a tiny CPU run on :func:`write_ppo_fixture` directories."""
    return [
        f"model.path={paths['actor']}",
        f"data.train_path={paths['prompts']}",
        f"reward.path={paths['rm']}",
        f"train.output_dir={out_dir}",
        "train.device=cpu",
        f"train.batch_size={train_batch}",
        f"train.micro_batch_size={micro}",
        "train.lr=1e-3",
        "critic.lr=1e-3",
        f"rollout.batch_size={rollout}",
        f"rollout.generation_batch_size={rollout}",
        f"rollout.forward_batch_size={rollout}",
        f"rollout.max_new_tokens={max_new_tokens}",
        "data.max_len=64",
        "data.max_prompt_len=32",
        "log.progress_bar=false",
        "log.tensorboard=false",
        *extra,
    ]
