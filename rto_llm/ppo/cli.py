"""``rto-llm {ppo,rto} [--config run.yaml] [--resume [DIR]] [--print-config] [section.key=value ...]``

Registered in ``rto_llm/cli.py`` as stages ``ppo`` (config ``PPOConfig``) and ``rto`` (``RTOConfig``);
also runnable alone: ``python -m rto_llm.ppo.cli rto --config examples/llama3_8b_ultrafeedback_rto.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from rto_llm.config import ConfigError, config_help, load_config, to_dict
from rto_llm.ppo.config import PPOConfig, RTOConfig, check_ppo_config

STAGES: dict[str, type] = {"ppo": PPOConfig, "rto": RTOConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rto-llm", description="PPO and RTO stages of the RTO LLM trainer.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, cls in STAGES.items():
        p = sub.add_parser(
            stage,
            help=(cls.__doc__ or "").strip().splitlines()[0],
            description=(cls.__doc__ or "").strip(),
            epilog="options (set in the YAML file or as section.key=value):\n" + config_help(cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML file with the run's sections (model, reward, rto, ppo, ...)")
        p.add_argument(
            "--resume", nargs="?", const="latest", default=None,
            help="resume from the latest checkpoint in train.output_dir (or from DIR)",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. rto.beta1=0.05")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for the ``ppo`` / ``rto`` stages; ``argv`` starts with the stage name."""
    args = build_parser().parse_args(argv)
    cls = STAGES[args.stage]
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(cls, args.config, overrides)
        check_ppo_config(cfg)
    except ConfigError as e:
        print(f"rto-llm {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from rto_llm.ppo.trainer import PPOTrainer

    PPOTrainer(cfg).train(stop_after=cfg.train.stop_after or None)  # train.stop_after counts rollouts
    return 0


if __name__ == "__main__":
    sys.exit(main())
