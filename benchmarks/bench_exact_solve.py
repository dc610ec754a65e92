"""Wall time of one exact solve at K = A^H = 65,536 responses per prompt (issue target: < 1 s on 2 cores).

An exact solve = soft-Bellman V*, Q*, pi*_beta + J_beta(pi*) + SubOpt of pi_ref (token recursion),
plus the sequence-level enumeration of all K responses with their pi* probabilities and returns.

    .venv/bin/python benchmarks/bench_exact_solve.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rto_sim import TokenMDP, enumerate_responses, evaluate, make_features, soft_bellman, sub_optimality


def solve(mdp, reward, beta):
    t0 = time.perf_counter()
    sol = soft_bellman(mdp, reward, beta)
    J = evaluate(mdp, sol.policy, reward, beta).J
    gap = sub_optimality(mdp, mdp.pi_ref, reward, beta)
    t1 = time.perf_counter()
    enum = enumerate_responses(mdp)
    p = np.exp(enum.log_prob(sol.log_policy))
    R = enum.returns(reward)
    t2 = time.perf_counter()
    assert abs(p.sum() - mdp.n_prompts) < 1e-9
    return t1 - t0, t2 - t1, J, gap, float(p @ R)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for name, A, H in [("A=4,H=8", 4, 8), ("A=2,H=16", 2, 16)]:
        t0 = time.perf_counter()
        mdp = TokenMDP.tree(A, H, seed=0)
        feats = make_features(mdp, "positional")
        reward = feats.token_reward(np.random.default_rng(0).standard_normal(feats.d))
        build = time.perf_counter() - t0
        recs = [solve(mdp, reward, beta=0.5) for _ in range(args.repeats)]
        rec = min(recs, key=lambda r: r[0] + r[1])
        print(f"tree {name}: K={mdp.num_responses:,} responses, {sum(mdp.n_states):,} states; build {build:.3f}s; "
              f"exact solve (V*, pi*, J_beta, SubOpt) {rec[0]:.3f}s; enumeration of all K with probabilities and "
              f"returns {rec[1]:.3f}s; total {rec[0] + rec[1]:.3f}s (best of {args.repeats}); "
              f"J*={rec[2]:.4f} SubOpt(pi_ref)={rec[3]:.4f}")


if __name__ == "__main__":
    main()
