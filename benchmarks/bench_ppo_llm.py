"""Seconds per PPO step, tokens/s and peak memory of the LLM PPO / RTO trainer: PPO vs RTO with a separate
(full) DPO model vs RTO with a LoRA-adapter DPO model over the reference, on the same model and prompts.

Targets (issue 6): RTO step time within 15% of PPO with a separate DPO model; within 5% extra peak memory
with the adapter.

    .venv/bin/python benchmarks/bench_ppo_llm.py                       # tiny Llama on CPU
    .venv/bin/python benchmarks/bench_ppo_llm.py --size small          # hidden 256, 4 layers, CPU
    .venv/bin/python benchmarks/bench_ppo_llm.py --device cuda --size 1b   # random ~1.1B Llama, bf16, MFU

Timing: all configurations are built in one process and their rollouts interleaved (ppo, rto_full,
rto_adapter, ppo, ...), so load changes on a shared machine hit all of them alike; each keeps its own RNG
stream. The step-time overhead is the median over rollouts of the paired ratio (rollout k of RTO / rollout
k of PPO). The learning rate is 1e-9 so that the policy, and with it the sampled responses, stays the same
across configurations: every configuration times the same work. The first ``--warmup`` rollouts are not
timed. Memory: each configuration alone in a fresh process, 2 rollouts; ``torch.cuda.max_memory_allocated``
on GPU, the peak RSS of the process on CPU (dominated by the Python/torch/transformers runtime for small
models, so the bytes of resident model parameters are reported next to it). With ``--size 1b`` on one
GPU the interleaved timing holds three runs in memory (about 3 x 20 GB in bf16 with AdamW states).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ("ppo", "rto_full", "rto_adapter")
SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2),
    "small": dict(hidden_size=256, num_layers=4),
}


def build_fixture(root: str, size: str, prompt_len: int, n_prompts: int, seed: int = 0) -> dict:
    """Actor, reward model (same shape, scalar head), full DPO model and LoRA adapter, prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rto_llm.models import set_reward_stats
    from rto_llm.testing import (
        build_tiny_llama,
        build_tiny_tokenizer,
        llama_1b_config,
        save_model_dir,
        set_adapter_base,
        write_jsonl,
    )

    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    if size == "1b":
        cfg = llama_1b_config()
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        actor = LlamaForCausalLM(cfg)
    else:
        s = SIZES[size]
        actor = build_tiny_llama(tok, hidden_size=s["hidden_size"], num_layers=s["num_layers"], seed=seed)
    paths = {}
    paths["actor"] = save_model_dir(os.path.join(root, "actor"), actor, tok)
    rm_dict = {k: v for k, v in actor.config.to_dict().items() if k not in ("id2label", "label2id")}
    rm_cfg = actor.config.__class__(**{**rm_dict, "num_labels": 1})
    rm = LlamaForSequenceClassification(rm_cfg)
    set_reward_stats(rm, 0.0, 1.0)
    paths["rm"] = save_model_dir(os.path.join(root, "rm"), rm, tok)
    with torch.no_grad():  # the full DPO model: the actor plus small noise (timing does not need training)
        for p in actor.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    paths["dpo"] = save_model_dir(os.path.join(root, "dpo"), actor, tok)
    base = LlamaForCausalLM.from_pretrained(paths["actor"])
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")
    lora = get_peft_model(base, lcfg)
    paths["dpo_adapter"] = os.path.join(root, "dpo_adapter")
    lora.save_pretrained(paths["dpo_adapter"])
    set_adapter_base(paths["dpo_adapter"], paths["actor"])
    rng = random.Random(seed)
    words = [str(i) for i in range(10)] + ["count", "up", "from", "the", "next", "numbers"]
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(prompt_len))} for _ in range(n_prompts)]
    paths["prompts"] = write_jsonl(os.path.join(root, "prompts.jsonl"), rows)
    return paths


def trainer_overrides(name: str, paths: dict, args, out_dir: str, max_rollouts: int) -> list[str]:
    """The config overrides of one benchmarked trainer (`name`: ppo, rto_full or rto_adapter) on the files of
    `paths`; `args` carries device, batch sizes and max_new_tokens. Shared with gpu_check.py."""
    over = [
        f"model.path={paths['actor']}", f"data.train_path={paths['prompts']}", f"reward.path={paths['rm']}",
        f"train.output_dir={out_dir}/{name}", f"train.device={args.device}",
        f"train.batch_size={args.train_batch}", f"train.micro_batch_size={args.micro}", "train.lr=1e-9",
        "critic.lr=1e-9", f"rollout.batch_size={args.rollout}", f"rollout.generation_batch_size={args.rollout}",
        f"rollout.forward_batch_size={args.forward_batch}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"ppo.max_rollouts={max_rollouts}", "data.max_len=4096", "data.max_prompt_len=2048",
        "log.progress_bar=false", "log.tensorboard=false", "checkpoint.export_hf=false", "reward.missing_eos_mode=off",
    ]
    if args.device == "cuda":
        over.append("model.dtype=bfloat16")
    if name == "rto_full":
        over.append(f"rto.dpo_path={paths['dpo']}")
    elif name == "rto_adapter":
        over.append(f"rto.dpo_path={paths['dpo_adapter']}")
    return over


def _make_trainer(name: str, paths: dict, args, out_dir: str):
    from rto_llm.config import load_config
    from rto_llm.ppo.config import PPOConfig, RTOConfig
    from rto_llm.ppo.trainer import PPOTrainer

    cls = PPOConfig if name == "ppo" else RTOConfig
    return PPOTrainer(load_config(cls, None, trainer_overrides(name, paths, args, out_dir, args.warmup + args.steps)))


def _summary(rows: list[dict]) -> dict:
    med = statistics.median
    out = {
        "step_s": med(h["perf/step_s"] for h in rows),
        "step_s_all": [h["perf/step_s"] for h in rows],
        "tokens_per_s": med(h["perf/throughput"] for h in rows),
        "generate_s": med(h["perf/time_generate"] for h in rows),
        "score_s": med(h["perf/time_score"] for h in rows),
        "train_s": med(h["perf/time_train"] for h in rows),
        "response_len": statistics.mean(h["val/response_length"] for h in rows),
    }
    if "perf/mfu" in rows[0]:
        out["mfu"] = med(h["perf/mfu"] for h in rows)
    return out


def timing_worker(args) -> dict:
    """All configurations in one process, rollouts interleaved (ppo, rto_full, rto_adapter, ppo, ...), so
    load changes on a shared machine hit every configuration alike. Each trainer keeps its own RNG
    stream (saved and restored around its rollouts), so all sample the same responses."""
    import torch

    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    names = args.configs.split(",")
    trainers = {n: _make_trainer(n, paths, args, os.path.join(args.out_dir, "t")) for n in names}
    rng = {n: (torch.get_rng_state(), torch.cuda.get_rng_state() if args.device == "cuda" else None) for n in names}
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.warmup + args.steps):
        for n in names:
            torch.set_rng_state(rng[n][0])
            if args.device == "cuda":
                torch.cuda.set_rng_state(rng[n][1])
                torch.cuda.synchronize()
            row = trainers[n].rollout_step(k)
            rng[n] = (torch.get_rng_state(), torch.cuda.get_rng_state() if args.device == "cuda" else None)
            if k >= args.warmup:
                rows[n].append(row)
    out = {n: _summary(r) for n, r in rows.items()}
    if "ppo" in rows:  # paired per-rollout ratios against PPO (same rollout index, adjacent in time)
        for n in names:
            ratios = [a["perf/step_s"] / b["perf/step_s"] for a, b in zip(rows[n], rows["ppo"])]
            out[n]["step_ratio_vs_ppo"] = statistics.median(ratios)
    return out


def memory_worker(args) -> dict:
    """One configuration alone in this process: peak memory (and resident parameter bytes)."""
    import torch

    from rto_llm.ppo.roles import n_params

    torch.set_num_threads(args.threads)
    tr = _make_trainer(args.worker, json.loads(args.paths), args, os.path.join(args.out_dir, "m"))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [tr.rollout_step(k) for k in range(2)]
    r = tr.roles
    resident = sum(n_params(m) * next(m.parameters()).element_size()
                   for m in (r.actor, r.critic, r.reference, r.reward_model, r.dpo_model, r.dpo_reference) if m)
    return {"peak_mem_gb": max(h["perf/peak_mem_gb"] for h in rows), "resident_param_gb": resident / 2**30}


def _run(worker: str, paths: dict, root: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--paths", json.dumps(paths), "--out-dir", root,
           "--configs", args.configs]
    for k in ("device", "rollout", "train_batch", "micro", "forward_batch", "max_new_tokens", "steps", "warmup",
              "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise SystemExit(f"{worker} failed:\n{res.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "1b"])
    ap.add_argument("--rollout", type=int, default=32, help="prompts per rollout")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--forward-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    ap.add_argument("--steps", type=int, default=6, help="timed rollouts per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default="", help="write the results to this JSON file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--paths", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = timing_worker if args.worker == "timing" else memory_worker
        print("RESULT " + json.dumps(fn(args)))
        return
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        paths = build_fixture(root, args.size, args.prompt_len, n_prompts=args.rollout * (args.warmup + args.steps))
        print(f"fixture ({args.size}) built in {time.perf_counter() - t0:.1f}s", flush=True)
        results = _run("timing", paths, root, args)
        for name in names:  # peak memory: each configuration alone in a fresh process
            results[name].update(_run(name, paths, root, args))
    print(f"{'config':12s} {'s/step':>7s} {'vs ppo':>7s} {'tok/s':>7s} {'gen s':>6s} {'score s':>7s} "
          f"{'train s':>7s} {'peak GB':>8s} {'params GB':>9s} {'len':>5s}")
    for name in names:
        r = results[name]
        print(f"{name:12s} {r['step_s']:7.3f} {100 * (r.get('step_ratio_vs_ppo', 1.0) - 1):+6.1f}% "
              f"{r['tokens_per_s']:7.0f} {r['generate_s']:6.3f} {r['score_s']:7.3f} {r['train_s']:7.3f} "
              f"{r['peak_mem_gb']:8.3f} {r['resident_param_gb']:9.4f} {r['response_len']:5.1f}"
              + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""))
    if "ppo" in results:
        base = results["ppo"]
        for name in ("rto_full", "rto_adapter"):
            if name in results:
                r = results[name]
                dm = r["peak_mem_gb"] / base["peak_mem_gb"] - 1
                dp = r["resident_param_gb"] / base["resident_param_gb"] - 1
                print(f"{name} vs ppo: step time {100 * (r['step_ratio_vs_ppo'] - 1):+.1f}% (median of paired "
                      f"rollouts), peak memory {100 * dm:+.1f}%, resident parameters {100 * dp:+.1f}%")
        if "rto_full" in results:
            ok = results["rto_full"]["step_ratio_vs_ppo"] <= 1.15
            print(f"target RTO (full DPO) step time within 15% of PPO: {'PASS' if ok else 'FAIL'}")
        if "rto_adapter" in results:
            ok = results["rto_adapter"]["peak_mem_gb"] <= 1.05 * base["peak_mem_gb"]
            print(f"target RTO (adapter DPO) peak memory within 5% of PPO: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
