"""Rollout generation under DeepSpeed ZeRO-3: the actor's parameters gathered once per rollout
(``rollout.zero3_gather=rollout``, the default) against DeepSpeed's hooks gathering every layer at every
decoding step (``rollout.zero3_gather=step``, the behaviour before issue 13).

    .venv/bin/python benchmarks/bench_zero3_gather.py                     # 2 processes, CPU (gloo), tiny Llama
    .venv/bin/python benchmarks/bench_zero3_gather.py --nproc 2 --hidden 256 --layers 4 --max-new-tokens 64

The script relaunches itself under ``torch.distributed.run`` with ``--nproc`` processes. Every process
builds the actor exactly as the trainer does under ZeRO-3 (``zero3_init``: partitioned at load; a
``DeepSpeedEngine`` with its optimizer), then times ``experience.generate`` on its own prompts in both
modes, interleaved (step, rollout, step, ...) after one untimed warm-up each, with the same seed per
repetition, so both modes sample the same tokens (checked). Printed per mode: median seconds per rollout
over the repetitions, generated tokens/s over all processes, and the number of parameter all-gathers
issued by one process during one rollout (counted by wrapping ``torch.distributed`` all-gather calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _count_allgathers():
    """Wrap the all-gather methods of DeepSpeed's communication backend (``deepspeed.comm``'s ``cdb``,
    through which ZeRO-3 gathers parameters); returns a dict whose ``n`` counts the calls."""
    import deepspeed.comm.comm as ds_comm

    counter = {"n": 0}
    for name in dir(ds_comm.cdb):
        if name.startswith(("all_gather", "allgather")) and callable(getattr(ds_comm.cdb, name)):
            fn = getattr(ds_comm.cdb, name)

            def wrapped(*a, _fn=fn, **k):
                counter["n"] += 1
                return _fn(*a, **k)

            setattr(ds_comm.cdb, name, wrapped)
    return counter


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from rto_llm.config import DeepSpeedConfig, ModelConfig, TrainConfig
    from rto_llm.distributed import DeepSpeedEngine, init_distributed, zero3_init
    from rto_llm.models import load_causal_lm, load_tokenizer
    from rto_llm.ppo.config import RolloutOptions
    from rto_llm.ppo.experience import generate

    torch.set_num_threads(args.threads)
    info = init_distributed("cpu")
    tok = load_tokenizer(args.model_dir)
    ds = DeepSpeedConfig(enabled=True, zero_stage=3)
    with zero3_init(ds, "float32", info.device):
        actor = load_causal_lm(ModelConfig(path=args.model_dir), trainable=True)
    engine = DeepSpeedEngine(actor, TrainConfig(batch_size=info.world_size, micro_batch_size=1), ds,
                             total_steps=1, grad_accum=1, info=info)
    actor.eval()
    counter = _count_allgathers()
    g = torch.Generator().manual_seed(100 + info.rank)
    prompts = [[tok.bos_token_id] + torch.randint(4, len(tok), (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    ropts = RolloutOptions(generation_batch_size=args.prompts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature)
    times = {"step": [], "rollout": []}
    gathers, tokens, same = {}, {}, True
    for rep in range(args.repeats + 1):  # repetition 0 is the untimed warm-up
        outs = {}
        for mode in ("step", "rollout"):
            torch.manual_seed(1000 * rep + info.rank)
            dist.barrier()
            counter["n"] = 0
            t0 = time.perf_counter()
            with engine.generation_context(mode):
                seq, _, action_mask, *_ = generate(actor, prompts, ropts, tok.pad_token_id, tok.eos_token_id)
            dist.barrier()
            dt = time.perf_counter() - t0
            outs[mode] = seq
            if rep > 0:
                times[mode].append(dt)
                gathers[mode] = counter["n"]
                tokens[mode] = tokens.get(mode, 0) + int(action_mask.sum())
        same = same and torch.equal(outs["step"], outs["rollout"])
    tot = torch.tensor([float(tokens["step"]), float(same)])
    dist.all_reduce(tot)
    if info.is_main:
        n_tok = tot[0].item() / args.repeats  # generated tokens per rollout, all processes
        res = {m: {"s_per_rollout": statistics.median(times[m]), "s_all": times[m],
                   "tokens_per_s": n_tok / statistics.median(times[m]), "allgathers_per_rollout": gathers[m]}
               for m in times}
        res["tokens_per_rollout"] = n_tok
        res["same_tokens"] = tot[1].item() == info.world_size
        res["params"] = sum(p.ds_numel for p in actor.parameters())
        print("RESULT " + json.dumps(res), flush=True)
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per process (one generate chunk)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="write the results to this JSON file")
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model_dir:
        worker(args)
        return
    from rto_llm.distributed import free_port
    from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer, save_model_dir

    with tempfile.TemporaryDirectory() as root:
        tok = build_tiny_tokenizer()
        model = build_tiny_llama(tok, hidden_size=args.hidden, num_layers=args.layers, seed=0)
        # EOS made rare so that rows run to max_new_tokens and both modes time the same number of steps
        with __import__("torch").no_grad():
            model.lm_head.weight[tok.eos_token_id].zero_()
        model_dir = save_model_dir(os.path.join(root, "actor"), model, tok)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--master_port={free_port()}", __file__, "--model-dir", model_dir]
        for k in ("hidden", "layers", "prompts", "prompt_len", "max_new_tokens", "temperature", "repeats", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu",
               "TOKENIZERS_PARALLELISM": "false"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise SystemExit(f"benchmark failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    r = json.loads(line[0][len("RESULT ") :])
    print(f"ZeRO-3 generation, {args.nproc} processes (gloo, CPU), Llama hidden {args.hidden} x {args.layers} "
          f"layers ({r['params'] / 1e6:.2f} M parameters), {args.prompts} prompts x {args.max_new_tokens} new "
          f"tokens per process, {args.repeats} timed rollouts per mode")
    print(f"{'gather':8s} {'s/rollout':>10s} {'tokens/s':>9s} {'all-gathers/rollout':>20s}  per-rollout seconds")
    for m in ("step", "rollout"):
        x = r[m]
        print(f"{m:8s} {x['s_per_rollout']:10.3f} {x['tokens_per_s']:9.1f} {x['allgathers_per_rollout']:20d}  "
              + " ".join(f"{t:.3f}" for t in x["s_all"]))
    print(f"speed-up of per-rollout gathering: {r['step']['s_per_rollout'] / r['rollout']['s_per_rollout']:.2f}x; "
          f"same tokens in both modes: {r['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": r}, f, indent=1)


if __name__ == "__main__":
    main()
