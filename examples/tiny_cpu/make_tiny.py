"""Build the tiny CPU example: a randomly initialized tiny Llama with a Llama-3-style tokenizer (``<|eot_id|>``
EOS, a Llama-3-like chat template, **no PAD**, as Meta ships Llama-3) and three small data sets in TRL formats.

    .venv/bin/python examples/tiny_cpu/make_tiny.py runs/tiny

writes ``runs/tiny/base`` (the model), ``sft.jsonl`` (conversational prompt-completion), ``pref.jsonl``
(conversational preference with an explicit prompt) and ``prompts.jsonl`` (standard prompt-only). The task is
the counting task of ``rto_llm.testing``: "count up from 3 4 5 6" -> "7 8 9 0"; the rejected answer is
shuffled and ends with "wrong". Then run the stages with the YAML files next to this script (see
examples/tiny_cpu.md).
"""

from __future__ import annotations

import argparse
import os

from rto_llm.testing import save_tiny_model, toy_preference_rows, toy_sft_rows, write_jsonl


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def make(out: str, n: int = 256, seed: int = 0) -> dict[str, str]:
    """Write the model and the data sets under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"base": save_tiny_model(os.path.join(out, "base"), seed=seed, llama3_style=True)}
    sft = [{"prompt": _user(r["prompt"]), "completion": _assistant(r["response"])} for r in toy_sft_rows(n, seed)]
    pref = [{"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            for r in toy_preference_rows(n, seed + 1)]
    prompts = [{"prompt": r["prompt"]} for r in toy_sft_rows(n, seed + 2)]
    for name, rows in (("sft", sft), ("pref", pref), ("prompts", prompts)):
        paths[name] = write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="runs/tiny")
    args = ap.parse_args()
    for k, v in make(args.out).items():
        print(f"{k}: {v}")
