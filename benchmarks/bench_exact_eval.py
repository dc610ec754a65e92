"""Wall time of one exact neural-policy evaluation (rto_llm.exact_eval; issue target: < 2 s on 2 cores).

Task: A = 4 actions (3 tokens + EOS), H = 6, 4 prompts -> 1,093 valid responses per prompt, 4,372 in all.
One evaluation = policy and reference log-probs of every response (batched forwards of a tiny Llama,
hidden 64, 2 layers, float32, log-softmax in float64) + J_beta, J*, SubOpt, E R, KL, the exact win rate
against pi_ref and the valid mass. Timed without model loading (models are built in memory once).

    .venv/bin/python benchmarks/bench_exact_eval.py [--repeats 5] [--threads 1] [--hidden 64]

Measured on the shared 2-core dev machine (load average 3.4-5, other jobs running): 0.22-0.44 s best with 1
torch thread; 0.7-2.3 s best (median up to 4 s) with 2 threads, which oversubscribe the loaded cores.
"""

from __future__ import annotations

import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls; 2 oversubscribe a "
                    "shared 2-core machine)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--H", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rto_llm.exact_eval import evaluate_policy
    from rto_llm.token_task import build_task_model, build_task_tokenizer
    from rto_sim.token_task import make_token_task

    task = make_token_task(4, args.H, 4, feature_kind="positional", beta=0.5, seed=0)
    tok = build_task_tokenizer(task)
    policy = build_task_model(task, tok, hidden_size=args.hidden, num_layers=args.layers, seed=1)
    reference = build_task_model(task, tok, hidden_size=args.hidden, num_layers=args.layers, seed=2)
    times, res = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = evaluate_policy(policy, reference, task, tokenizer=tok, batch_size=args.batch_size)
        times.append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"exact eval: {len(res.prompts)} prompts x {res.n_responses:,} responses = "
          f"{len(res.prompts) * res.n_responses:,} rows, policy + reference, tiny Llama hidden {args.hidden} x "
          f"{args.layers} layers, torch threads {args.threads}: best {min(times):.3f}s, median "
          f"{sorted(times)[len(times) // 2]:.3f}s over {args.repeats} (load average {load:.1f}); "
          f"method={res.method} J={res.J:.4f} J*={res.J_star:.4f} SubOpt={res.sub_opt:.4f} KL={res.kl:.4f} "
          f"win={res.win_rate:.4f} valid_mass={res.valid_mass:.4f}")


if __name__ == "__main__":
    main()
