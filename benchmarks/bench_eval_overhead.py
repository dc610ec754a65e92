"""Cost of evaluation inside a PPO run (the ``eval`` section): the same tiny PPO run with and without evaluation.

Target (issue 11, item 3): evaluation at ``eval.every = 10`` costs less than 10% of the run's time.

    .venv/bin/python benchmarks/bench_eval_overhead.py                    # tiny Llama, CPU
    .venv/bin/python benchmarks/bench_eval_overhead.py --hidden 128 --reps 5

Both runs use the same seeds and data, and evaluation leaves training bitwise unchanged (tested in
tests/rto_llm/ppo/test_eval.py), so they do the same training work; the runs are interleaved (no-eval, eval, then
eval, no-eval, ...) so that load changes on a shared machine hit both alike. The timed span is ``train()``
(model loading excluded). Evaluation: at the start (step 0), every ``--every`` rollouts and after the last one,
on ``--eval-prompts`` prompts (default: as many as a rollout), with the RM win rate (one reference response per
prompt, sampled once) and ``eval.num_samples`` = 4 completions written to samples.jsonl. Reported: the paired
ratio (eval run / plain run) per repetition, its median, and the evaluation's own time (sum of eval/time_s) as a
fraction of the plain run and of its own run (the last is measured inside one run, so it does not move with the
load of a shared machine between runs; the paired ratio does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_once(fx: dict, out: str, args, with_eval: bool) -> tuple[float, float, int]:
    """(seconds in train(), seconds in evaluation, number of evaluations) of one PPO run."""
    from rto_llm.config import load_config
    from rto_llm.ppo.config import PPOConfig
    from rto_llm.ppo.trainer import PPOTrainer
    from rto_llm.testing import ppo_overrides

    extra = [f"ppo.max_rollouts={args.rollouts}", "checkpoint.export_hf=false", f"train.seed={args.seed}"]
    if with_eval:
        extra += [f"eval.every={args.every}", f"data.eval_path={fx['prompts']}",
                  f"eval.max_prompts={args.eval_prompts}"]
    over = ppo_overrides(fx, out, *extra, rollout=args.rollout_batch, train_batch=args.rollout_batch,
                         micro=min(8, args.rollout_batch), max_new_tokens=args.max_new_tokens)
    tr = PPOTrainer(load_config(PPOConfig, None, over))
    t0 = time.perf_counter()
    tr.train()
    dt = time.perf_counter() - t0
    return dt, sum(r["eval/time_s"] for r in tr.eval_history), len(tr.eval_history)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama actor (2 layers)")
    p.add_argument("--rollouts", type=int, default=20)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--rollout-batch", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=0, help="eval prompts; 0 = the rollout batch size")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.eval_prompts = args.eval_prompts or args.rollout_batch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    from rto_llm.testing import write_ppo_fixture

    torch.set_num_threads(args.threads)
    logging.getLogger("rto_llm").setLevel(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench_eval_")
    fx = write_ppo_fixture(root, hidden_size=args.hidden, n_prompts=max(256, args.rollout_batch * args.rollouts))
    run_once(fx, os.path.join(root, "warmup"), argparse.Namespace(**{**vars(args), "rollouts": 2}), True)
    plain, evald, eval_s, n_evals = [], [], [], 0
    for r in range(args.reps):
        order = (False, True) if r % 2 == 0 else (True, False)
        for with_eval in order:
            dt, es, ne = run_once(fx, os.path.join(root, f"r{r}_{int(with_eval)}"), args, with_eval)
            (evald if with_eval else plain).append(dt)
            if with_eval:
                eval_s.append(es)
                n_evals = ne
        print(f"rep {r}: plain {plain[-1]:.2f} s, with eval {evald[-1]:.2f} s (evaluation {eval_s[-1]:.2f} s), "
              f"ratio {evald[-1] / plain[-1]:.3f}", flush=True)
    ratios = [b / a for a, b in zip(plain, evald)]
    own = [e / a for a, e in zip(plain, eval_s)]
    share = [e / b for b, e in zip(evald, eval_s)]   # within one run: insensitive to load changes between runs
    res = {"hidden": args.hidden, "rollouts": args.rollouts, "every": args.every, "rollout_batch": args.rollout_batch,
           "eval_prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens, "evaluations": n_evals,
           "reps": args.reps, "threads": args.threads, "plain_s": plain, "eval_s": evald, "eval_time_s": eval_s,
           "median_ratio": statistics.median(ratios), "median_eval_fraction": statistics.median(own),
           "median_eval_share_of_run": statistics.median(share)}
    print(f"{n_evals} evaluations in {args.rollouts} rollouts (every {args.every}, at start and end), "
          f"{args.eval_prompts} eval prompts, rollout batch {args.rollout_batch}")
    print(f"overhead: median paired ratio {res['median_ratio']:.3f} (run with eval / run without); evaluation's own "
          f"time {100 * res['median_eval_fraction']:.1f}% of the plain run, "
          f"{100 * res['median_eval_share_of_run']:.1f}% of its own run (target < 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
