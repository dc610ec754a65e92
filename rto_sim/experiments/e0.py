"""E0: the exact identities of docs/theory.md section 2 on random trees and automata.

Grid: structures {tree, last_token, random_automaton} x A in {2, 3} x H in {1..5} x EOS on/off x
beta in {0.1, 1.0}, random pi_ref = softmax(N(0,1)) and random token rewards r ~ N(0,1).
One results row per (identity, instance) with its max absolute error."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import pandas as pd

from ..identities import IDENTITIES, random_instance
from ..results import Check


@dataclass(frozen=True)
class Config:
    """structures: MDP structures (`identities.random_instance`); A, H, eos, beta: the grid axes (vocabulary
    size, horizon, EOS on/off, KL coefficient); n_prompts: prompts per instance; seeds: repetitions of
    the whole grid (instance seed = seed * 7919 + instance index)."""

    structures: tuple[str, ...] = ("tree", "last_token", "random_automaton")
    A: tuple[int, ...] = (2, 3)
    H: tuple[int, ...] = (1, 2, 3, 4, 5)
    eos: tuple[bool, ...] = (False, True)
    beta: tuple[float, ...] = (0.1, 1.0)
    n_prompts: int = 2
    seeds: int = 2

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), H=(1, 3, 5), seeds=1)


def run(cfg: Config, folder) -> pd.DataFrame:
    rows = []
    grid = itertools.product(range(cfg.seeds), cfg.structures, cfg.A, cfg.H, cfg.eos, cfg.beta)
    for i, (seed, structure, A, H, eos, beta) in enumerate(grid):
        inst = random_instance(seed * 7919 + i, structure, A=A, H=H, eos=eos, n_prompts=cfg.n_prompts, beta=beta)
        for name, (fn, tol) in IDENTITIES.items():
            t0 = time.perf_counter()
            err = fn(inst)
            rows.append({"identity": name, "instance": i, "seed": inst.seed, "structure": structure, "A": A,
                         "H": H, "eos": eos, "beta": beta, "max_abs_error": err, "tolerance": tol,
                         "wall_time_s": time.perf_counter() - t0})
    return pd.DataFrame(rows)


def check_identity(table: pd.DataFrame, name: str) -> Check:
    """Identity `name` holds on every instance: its largest error is within its tolerance."""
    fn, tol = IDENTITIES[name]
    errors = table.loc[table.identity == name, "max_abs_error"]
    worst = float(errors.max())
    return Check(quantity=(fn.__doc__ or name).strip().splitlines()[0], predicted=0.0, measured=worst,
                 tolerance=tol, verdict="pass" if worst <= tol else "fail",
                 note=f"max over {len(errors)} random instances")


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    return {name: check_identity(table, name) for name in IDENTITIES}
