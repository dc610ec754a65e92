"""Tiny offline models and toy data shared by the tests and the benchmark.

``build_tiny_tokenizer`` trains nothing from the network: a word-level vocabulary over a toy corpus,
wrapped as a ``PreTrainedTokenizerFast`` with distinct PAD / BOS / EOS and a small chat template.
``build_tiny_llama`` is a randomly initialized ``LlamaForCausalLM`` (hidden 64, 2 layers by default).
``toy_*_rows`` make learnable datasets: the response continues a digit sequence (+1 each step).
"""

from __future__ import annotations

import json
import os
import random

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


def build_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialized tiny ``LlamaForCausalLM`` matching ``tokenizer``'s special tokens."""
    import torch
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


def save_tiny_model(path: str, seed: int = 0, **overrides) -> str:
    """Write a tiny Llama and its tokenizer to ``path`` (a model directory); returns ``path``."""
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=seed, **overrides)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
