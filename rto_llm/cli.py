"""``rto-llm <stage> [--config run.yaml] [--resume [DIR]] [section.key=value ...]``

Stages are registered in :data:`STAGES` (config class + trainer import path): sft, rm, dpo, ppo, rto.
``rto-llm <stage> --help`` lists every option with its default and documentation.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rto_llm.config import ConfigError, DPOConfig, RMConfig, SFTConfig, config_help, load_config
from rto_llm.ppo.config import PPOConfig, RTOConfig, check_ppo_config

# stage -> (config class, "module:TrainerClass"); trainers import transformers, so they load lazily.
STAGES: dict[str, tuple[type, str]] = {
    "sft": (SFTConfig, "rto_llm.trainers.sft:SFTTrainer"),
    "rm": (RMConfig, "rto_llm.trainers.rm:RMTrainer"),
    "dpo": (DPOConfig, "rto_llm.trainers.dpo:DPOTrainer"),
    "ppo": (PPOConfig, "rto_llm.ppo.trainer:PPOTrainer"),     # train.stop_after counts rollouts here
    "rto": (RTOConfig, "rto_llm.ppo.trainer:PPOTrainer"),
}


# stage -> cross-section config checks run right after loading (before any model is built)
VALIDATORS = {"ppo": check_ppo_config, "rto": check_ppo_config}


def trainer_class(stage: str) -> type:
    module, name = STAGES[stage][1].split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rto-llm", description="RTO LLM trainer: SFT, RM, DPO, PPO and RTO.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (cls, _) in STAGES.items():
        p = sub.add_parser(
            stage,
            help=(cls.__doc__ or "").strip().splitlines()[0],
            description=(cls.__doc__ or "").strip(),
            epilog="options (set in the YAML file or as section.key=value):\n" + config_help(cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML file with the run's sections (model, data, train, ...)")
        p.add_argument(
            "--resume", nargs="?", const="latest", default=None,
            help="resume from the latest checkpoint in train.output_dir (or from DIR)",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls = STAGES[args.stage][0]
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(cls, args.config, overrides)
        if args.stage in VALIDATORS:
            VALIDATORS[args.stage](cfg)
    except ConfigError as e:
        print(f"rto-llm {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from rto_llm.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        trainer = trainer_class(args.stage)(cfg)
    except ConfigError as e:     # cross-section checks that need the models/tokenizer run at build time
        print(f"rto-llm {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    trainer.train(stop_after=cfg.train.stop_after or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
