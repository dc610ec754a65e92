"""Experiment registry: `rto-sim experiment NAME --out DIR [--quick]`.

Each experiment module exposes `config(quick: bool) -> dict` and
`run(config: dict, folder: Path) -> (table: DataFrame, checks: dict[str, Check])`.
`run_experiment` owns the bookkeeping: claiming the folder, timing, writing the tidy table and
`summary.json` atomically.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

EXPERIMENTS = {
    "E0": "rto_sim.experiments.e0",     # exact identities (theory.md section 2)
    "E1": "rto_sim.experiments.e1",     # statistical scaling: token MLE vs bandit vs DPO (S1-S3, S5, S7, S8)
    "E1b": "rto_sim.experiments.e1b",   # fixed-N sweep in H (S4)
    "E2": "rto_sim.experiments.e2",     # Proposition 3.2 query counts (S11)
    "E3": "rto_sim.experiments.e3",     # policy quality, Algorithm 1, Theorem 4.2 (S5, S6, S9)
    "E5": "rto_sim.experiments.e5",     # overoptimization (S14)
    "E6": "rto_sim.experiments.e6",     # coverage (S10)
    "E7": "rto_sim.experiments.e7",     # practical RTO: PPO on shaped token rewards (S12, S13)
}


def get_experiment(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as e:
        if e.name == EXPERIMENTS[name]:
            raise ValueError(f"experiment {name!r} is registered but not implemented yet ({EXPERIMENTS[name]})") from e
        raise


def run_experiment(name: str, out: str | Path, quick: bool = False, fmt: str = "parquet",
                   overwrite: bool = False, **overrides) -> dict:
    """Run one experiment into `out/name/`; returns the summary dict."""
    # imported here so that the registry (and `rto-sim --help`) does not load pandas
    from ..results import atomic_write_json, claim_folder, config_hash, single_thread_blas, write_table

    mod = get_experiment(name)
    cfg = mod.config(quick)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown config keys for {name}: {sorted(unknown)}; valid keys: {sorted(cfg)}")
    cfg.update(overrides)
    folder = Path(out) / name
    claim_folder(folder, cfg, overwrite=overwrite)
    t0 = time.perf_counter()
    with single_thread_blas():
        table, checks = mod.run(cfg, folder)
    wall = time.perf_counter() - t0
    table = table.assign(experiment=name, config_hash=config_hash(cfg))
    write_table(table, folder / "results", fmt)
    summary = {"experiment": name, "quick": quick, "config_hash": config_hash(cfg), "wall_time_s": wall,
               "config": cfg, "checks": {k: c.to_dict() for k, c in checks.items()},
               "all_pass": all(c.verdict == "pass" for c in checks.values())}
    atomic_write_json(folder / "summary.json", summary)
    return summary
