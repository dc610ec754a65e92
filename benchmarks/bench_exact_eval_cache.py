"""The exact evaluator's cache (rto_llm/exact_eval.py, "Cache"): one exact evaluation of a policy that changes,
against a frozen reference and DPO model, with and without the cache; and the CPU time of E8's cells.

    .venv/bin/python benchmarks/bench_exact_eval_cache.py                      # A=3, H=10, 4 prompts
    .venv/bin/python benchmarks/bench_exact_eval_cache.py --H 6 --reps 5
    .venv/bin/python benchmarks/bench_exact_eval_cache.py --e8 results/E8      # + E8 cell times from a results folder

A training run evaluates the same frozen reference (and DPO model) at every evaluation; without the cache each
evaluation runs all three models over the enumeration, with it only the policy (whose parameters change between
evaluations: here a small in-place perturbation before each one, so every policy pass is a real recomputation).
Times are CPU seconds of this process (time.process_time, one torch thread), which the load of a shared machine
moves much less than wall time; wall time is reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--A", type=int, default=3)
    ap.add_argument("--H", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e8", default=None, help="an E8 results folder (OUT/E8): also report its per-cell CPU time")
    args = ap.parse_args(argv)
    import torch

    import rto_llm.exact_eval as ee
    from rto_llm.token_task import build_task_model, build_task_tokenizer
    from rto_sim.token_task import make_token_task

    torch.set_num_threads(1)
    task = make_token_task(args.A, args.H, args.prompts, structure="last_token", feature_kind="bigram", beta=0.1,
                           eos_logit=-2.0, seed=0)
    tok = build_task_tokenizer(task)
    pol, ref, dpo = (build_task_model(task, tok, hidden_size=args.hidden, seed=s).eval() for s in (1, 2, 3))
    rows = {}
    for cache in (False, True):
        ee.clear_cache()
        cpu, wall = [], []
        for _ in range(args.reps + 1):                 # the first evaluation fills the cache: not timed
            with torch.no_grad():
                next(pol.parameters()).add_(1e-3)      # the policy changed since the last evaluation
            c0, w0 = time.process_time(), time.perf_counter()
            ee.evaluate_policy(pol, ref, task, tokenizer=tok, dpo_model=dpo, beta_dpo=0.1, cache=cache)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        rows[cache] = (statistics.median(cpu[1:]), statistics.median(wall[1:]))
    n = args.prompts * task.num_responses
    print(f"# exact evaluation, A={args.A}, H={args.H}, {args.prompts} prompts ({n} responses, "
          f"{args.prompts * (args.A - 1) ** (args.H - 1)} forward sequences per model), hidden {args.hidden}")
    print("| cache | CPU s per evaluation (median) | wall s |\n|---|---|---|")
    for cache, (c, w) in rows.items():
        print(f"| {'on' if cache else 'off'} | {c:.3f} | {w:.3f} |")
    print(f"speed-up (CPU): {rows[False][0] / rows[True][0]:.2f}x")
    if args.e8:
        import pandas as pd

        from rto_sim.results import read_table

        t = read_table(os.path.join(args.e8, "results"))
        tm = t[t.section == "timing"]
        rl = tm[tm.metric == "rl_cpu_s"].groupby("H")["value"].agg(["count", "mean", "sum"])
        prep = tm[tm.metric == "prep_cpu_s"].groupby("H")["value"].agg(["count", "mean", "sum"])
        with pd.option_context("display.precision", 2):
            print("\nE8 rl cells (CPU s of the cell's process):\n", rl.to_string())
            print("E8 prep cells:\n", prep.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
