"""Speed of the tabular PPO / RTO trainer and wall time of the E7 grids.

1. PPO updates per second on a toy tree MDP (A = 4, H = 8: 65,536 responses, 21,845 states), mode "rto",
   B = 256 episodes per rollout, 4 epochs x 4 minibatches, exact evaluation after every update included
   (and, separately, without it).
2. Wall time of `rto-sim experiment E7 --quick` and of the full E7 grid (target: under 10 minutes).

    .venv/bin/python benchmarks/bench_ppo.py [--skip-full] [--out benchmarks/results/ppo.md]

The experiments set numpy's/scipy's OpenBLAS to one thread themselves (`rto_sim.results.single_thread_blas`)
and the trainer sets torch to one thread: on a shared 2-core machine multi-threading costs ~10x on these tiny
problems. The load average (other processes) is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rto_sim import TokenMDP, draw_theta, make_features, soft_bellman
from rto_sim.experiments import run_experiment
from rto_sim.tabular_ppo import TabularPPOConfig, TabularPPOTrainer


def bench_updates(n_updates: int, evaluate_each: bool) -> tuple[float, float]:
    mdp = TokenMDP.tree(4, 8, eos=True, seed=0)
    phi = make_features(mdp, "bigram")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=0.25, seed=1))
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    cfg = TabularPPOConfig(mode="rto", n_updates=n_updates, batch_size=256, epochs=4, n_minibatches=4, seed=0)
    tr = TabularPPOTrainer(mdp, r, r, log_dpo, cfg)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if evaluate_each:
        res = tr.train()
        wall = res.wall_time_s
        gain = res.curve[-1]["J_true"] - res.curve[0]["J_true"]
    else:
        J0 = tr.evaluate()["J_true"]
        for _ in range(n_updates):
            tr.ppo_epochs(tr.make_experience())
        wall = time.perf_counter() - t0
        gain = tr.evaluate()["J_true"] - J0
    return n_updates / wall, gain


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--skip-full", action="store_true", help="skip the full E7 grid (minutes)")
    ap.add_argument("--out", default="benchmarks/results/ppo.md")
    args = ap.parse_args()
    lines = []

    def say(s):
        print(s, flush=True)
        lines.append(s)

    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, python {platform.python_version()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"load average at start {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    for ev in (True, False):
        ups, gain = bench_updates(args.updates, ev)
        say(f"PPO/RTO tabular, tree A=4 H=8 (EOS), B=256, 4 epochs x 4 minibatches: {ups:.1f} updates/s "
            f"({'with' if ev else 'without'} exact evaluation after each update; J_true gain {gain:+.3f} in "
            f"{args.updates} updates)")
    for quick in (True, False) if not args.skip_full else (True,):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            s = run_experiment("E7", d, quick=quick)
            wall = time.perf_counter() - t0
        verdicts = ", ".join(f"{k}={v['verdict']}" for k, v in s["checks"].items())
        say(f"E7 {'quick' if quick else 'full'} grid: {wall:.1f} s wall ({verdicts})")
    say(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.out:
        blas = os.environ.get("OPENBLAS_NUM_THREADS")
        env = f"OPENBLAS_NUM_THREADS={blas} " if blas else ""
        cmd = env + ".venv/bin/python " + " ".join([sys.argv[0]] + sys.argv[1:])
        body = "# Tabular PPO / RTO benchmark\n\nCommand:\n\n    " + cmd + "\n\n" + "\n".join(f"- {x}" for x in lines)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(body + "\n")


if __name__ == "__main__":
    main()
