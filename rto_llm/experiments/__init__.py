"""Experiments that train neural policies with the LLM stages: ``rto-llm experiment NAME --out DIR [--quick]``.

Same contract and on-disk format as the simulator's experiments (``rto_sim/experiments/__init__.py``, README
"Adding an experiment"): a module exposes a frozen ``Config`` (full grid as defaults, ``Config.quick()``),
``run(cfg, folder) -> DataFrame`` (tidy), ``checks(table, cfg) -> {id: Check}`` and optionally
``validate_config(cfg)``. :func:`run_experiment` writes ``OUT/NAME/{results.parquet, summary.json,
config.json}`` exactly as ``rto_sim.experiments.run_experiment`` does, so ``paper_figures`` and REPORT.md read
them unchanged. The registry lives here because the simulator never imports the LLM trainer.

    rto-llm experiment E8 --out results --quick
    rto-llm experiment E8 --out results --set seeds=4 'H=[3]'
"""

from __future__ import annotations

from pathlib import Path

LLM_EXPERIMENTS = {
    "E8": "rto_llm.experiments.e8",   # neural RTO against exact truth (docs/theory.md section 11; S15-S19)
}



def get_experiment(name: str):
    if name not in LLM_EXPERIMENTS:
        raise ValueError(f"unknown LLM experiment {name!r}; available: {', '.join(sorted(LLM_EXPERIMENTS))} "
                         "(the simulator's experiments run with `rto-sim experiment`)")
    from rto_sim import experiments as sim

    return sim.get_experiment(name, LLM_EXPERIMENTS)


def make_config(name: str, quick: bool = False, **overrides):
    """The `Config` of experiment `name` (full or quick grid) with `overrides` type-checked and applied."""
    from rto_sim import experiments as sim

    return sim.make_config(name, quick, LLM_EXPERIMENTS, **overrides)


def check_config(name: str, cfg) -> None:
    """The simulator's checks (finite numbers, `seeds` / `workers` >= 1) and the module's `validate_config`."""
    from rto_sim import experiments as sim

    sim.check_config(name, cfg, LLM_EXPERIMENTS)


def run_experiment(name: str, out: str | Path, quick: bool = False, fmt: str = "parquet", overwrite: bool = False,
                   **overrides) -> dict:
    """Run one LLM experiment into `out/name/` (resuming finished sweep cells) with the simulator's bookkeeping
    (lock, claim, atomic writes); torch keeps its threads. Returns the summary dict."""
    from rto_sim import experiments as sim

    get_experiment(name)      # the LLM registry's own message for an unknown name
    return sim.run_experiment(name, out, quick, fmt, overwrite, registry=LLM_EXPERIMENTS, single_thread=False,
                              **overrides)


def main(argv: list[str] | None = None) -> int:
    """``rto-llm experiment NAME --out DIR [--quick] [--format parquet|csv] [--overwrite] [--set KEY=VALUE ...]``"""
    from rto_sim.cli import add_experiment_arguments, run_and_print
    from rto_sim.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="rto-llm experiment",
                                   description="Run an experiment that trains neural policies with the LLM stages "
                                               "and evaluates them exactly; writes OUT/NAME/{results.parquet, "
                                               "summary.json, config.json}. A rerun resumes finished cells.")
    add_experiment_arguments(parser, LLM_EXPERIMENTS, "the reduced grid (a few minutes on 2 CPU cores)")
    return run_and_print("rto-llm experiment", parser, parser.parse_args(argv), run_experiment)


__all__ = ["LLM_EXPERIMENTS", "check_config", "get_experiment", "main", "make_config", "run_experiment"]
