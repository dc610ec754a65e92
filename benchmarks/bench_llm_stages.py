"""Training throughput and peak memory of the rto_llm stages (SFT, reward model, DPO).

    .venv/bin/python benchmarks/bench_llm_stages.py                       # tiny Llama on CPU
    .venv/bin/python benchmarks/bench_llm_stages.py --device cuda --size 1b   # ~1.1B Llama (random init), GPU

Each stage runs in its own process (so the peak memory is that stage's): the plain-torch path,
``--steps`` timed optimizer steps after ``--warmup`` untimed ones. tokens/s counts the non-pad tokens
(prompt + response; both sequences of a preference pair) processed per second of training step,
including forward, backward and the optimizer update. Peak memory is the resident set size of the
process on CPU and ``torch.cuda.max_memory_allocated`` on GPU. Results are printed and, for CPU, written
to ``benchmarks/results/llm_stages_cpu.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile

STAGES = ("sft", "rm", "dpo")


def _rows(n: int, prompt_len: int, response_len: int, preference: bool) -> list[dict]:
    import random

    rng = random.Random(0)
    digits = lambda k: " ".join(str(rng.randrange(10)) for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        prompt = "count up from " + digits(prompt_len)
        if preference:
            rows.append({"prompt": prompt, "chosen": digits(response_len), "rejected": digits(response_len)})
        else:
            rows.append({"prompt": prompt, "response": digits(response_len)})
    return rows


def _model_dir(size: str, workdir: str) -> str:
    from rto_llm.testing import build_tiny_tokenizer, llama_1b_config, save_tiny_model

    path = os.path.join(workdir, f"model-{size}")
    if os.path.isdir(path):
        return path
    if size == "tiny":
        return save_tiny_model(path)
    import torch
    from transformers import LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = llama_1b_config()
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_stage(args) -> dict:
    """One stage in this process; returns its measurements."""
    import torch

    from rto_llm.cli import STAGES as REGISTRY
    from rto_llm.cli import trainer_class
    from rto_llm.config import load_config
    from rto_llm.testing import write_jsonl

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir
    model = _model_dir(args.size, workdir)
    pref = args.stage != "sft"
    # the chat template adds 8 prompt tokens; EOS ends the response
    data = write_jsonl(os.path.join(workdir, f"{args.stage}.jsonl"),
                       _rows(args.batch * (args.steps + args.warmup), args.seq_len // 2 - 8,
                             args.seq_len // 2 - 1, pref))
    overrides = [
        f"model.path={model}", f"data.train_path={data}", f"train.output_dir={workdir}/{args.stage}",
        f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch or args.batch}",
        f"train.max_steps={args.steps + args.warmup}", f"train.device={args.device}", "train.lr=1e-5",
        f"data.max_len={args.seq_len}", f"data.max_prompt_len={args.seq_len // 2}", "log.progress_bar=false",
        "log.tensorboard=false", "checkpoint.export_hf=false", "checkpoint.overwrite=true",  # a rerun reuses workdir
    ]
    if args.size == "1b":
        overrides += ["model.dtype=bfloat16", f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}"]
    cfg = load_config(REGISTRY[args.stage][0], None, overrides)
    hist = trainer_class(args.stage)(cfg).train()
    timed = hist[args.warmup :]
    seconds = sum(h["perf/step_s"] for h in timed)
    tokens = sum(h["perf/tokens_per_s"] * h["perf/step_s"] for h in timed)
    return {
        "stage": args.stage, "tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
        "peak_mem_gb": hist[-1]["perf/peak_mem_gb"], "tokens_per_step": tokens / len(timed),
        "loss_first": hist[0]["train/loss"], "loss_last": hist[-1]["train/loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=["tiny", "1b"], default="tiny")
    ap.add_argument("--batch", type=int, default=32, help="sequences (SFT) or pairs (RM, DPO) per step")
    ap.add_argument("--micro-batch", type=int, default=0, help="per forward pass (0 = whole batch)")
    ap.add_argument("--seq-len", type=int, default=64, help="prompt + response tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (1b)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", default=None, help="markdown results file (default for CPU: results/llm_stages_cpu.md)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # child process
        print("RESULT " + json.dumps(run_stage(args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for stage in args.stages.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--stage", stage, "--workdir", workdir]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or ""), "TOKENIZERS_PARALLELISM": "false"}
            if not args.threads:
                env.pop("OMP_NUM_THREADS")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"stage {stage} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(lines[-1][7:]))
            r = results[-1]
            print(f"{stage:4s} {r['tokens_per_s']:10.0f} tokens/s  {r['step_s']:.3f} s/step  "
                  f"peak {'GPU' if args.device == 'cuda' else 'RSS'} {r['peak_mem_gb']:.2f} GiB  "
                  f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}", flush=True)
    out = args.out or (os.path.join(os.path.dirname(__file__), "results", "llm_stages_cpu.md")
                       if args.device == "cpu" and args.size == "tiny" else None)
    if out:
        write_markdown(out, args, results)
        print(f"wrote {out}")


def write_markdown(path: str, args, results: list[dict]) -> None:
    import torch

    mem = "peak GPU memory (GiB)" if args.device == "cuda" else "peak RSS (GiB)"
    lines = [
        f"# rto_llm stage throughput ({args.size} Llama, {args.device})",
        "",
        "Command:",
        "",
        "```",
        "python benchmarks/bench_llm_stages.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible, "
        f"torch {torch.__version__}, {args.threads or 'default'} torch threads; load average at the end "
        f"{os.getloadavg()[0]:.1f} (the machine is shared, so numbers vary between runs).",
        "",
        f"Batch {args.batch} sequences (SFT) or {args.batch} pairs (RM, DPO: 2 x {args.batch} sequences), "
        f"{args.seq_len} tokens per sequence, {args.steps} timed steps after {args.warmup} warm-up steps, "
        "plain-torch engine, AdamW. tokens/s = non-pad tokens per second of full training step "
        "(forward + backward + optimizer).",
        "",
        f"| stage | tokens/s | s/step | tokens/step | {mem} | loss first -> last |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['stage']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['tokens_per_step']:.0f} | "
                     f"{r['peak_mem_gb']:.2f} | {r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
