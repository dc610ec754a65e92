"""E0: the exact identities of theory.md section 2 on random trees and automata.

Grid: structures {tree, last_token, random_automaton} x A in {2, 3} x H in {1..5} x EOS on/off x
beta in {0.1, 1.0}, random pi_ref = softmax(N(0,1)) and random token rewards r ~ N(0,1).
One results row per (identity, instance) with its max absolute error."""

from __future__ import annotations

import itertools
import time

import pandas as pd

from ..identities import IDENTITIES, random_instance
from ..results import Check


def config(quick: bool) -> dict:
    return {"structures": ["tree", "last_token", "random_automaton"], "A": [2, 3],
            "H": [1, 3, 5] if quick else [1, 2, 3, 4, 5], "eos": [False, True], "beta": [0.1, 1.0],
            "n_prompts": 2, "seeds": 1 if quick else 2}


def run(cfg: dict, folder) -> tuple[pd.DataFrame, dict]:
    rows = []
    grid = itertools.product(range(cfg["seeds"]), cfg["structures"], cfg["A"], cfg["H"], cfg["eos"], cfg["beta"])
    for i, (seed, structure, A, H, eos, beta) in enumerate(grid):
        inst = random_instance(seed * 7919 + i, structure, A=A, H=H, eos=eos, n_prompts=cfg["n_prompts"], beta=beta)
        for name, (fn, tol) in IDENTITIES.items():
            t0 = time.perf_counter()
            err = fn(inst)
            rows.append({"identity": name, "instance": i, "seed": inst.seed, "structure": structure, "A": A,
                         "H": H, "eos": eos, "beta": beta, "max_abs_error": err, "tolerance": tol,
                         "wall_time_s": time.perf_counter() - t0})
    df = pd.DataFrame(rows)
    checks = {}
    for name, (fn, tol) in IDENTITIES.items():
        worst = float(df.loc[df.identity == name, "max_abs_error"].max())
        checks[name] = Check(quantity=(fn.__doc__ or name).strip().splitlines()[0], predicted=0.0, measured=worst,
                             tolerance=tol, verdict="pass" if worst <= tol else "fail",
                             note=f"max over {int((df.identity == name).sum())} random instances")
    return df, checks
