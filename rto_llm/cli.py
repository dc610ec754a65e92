"""``rto-llm <stage> [--config run.yaml] [--resume [DIR]] [--overwrite] [section.key=value ...]``

Stages are registered in :data:`STAGES` (config class + trainer import path): sft, rm, dpo, ppo, rto.
``rto-llm <stage> --help`` lists every option with its default and documentation. ``rto-llm experiment NAME
--out DIR [--quick]`` runs an experiment on token tasks (``rto_llm/experiments``, E8).

Exit codes: 0 done (or stopped by ``train.stop_after``); 2 the run was refused or stopped with a one-line
message on stderr that names the field or file and the fix (config, data, tokenizer, checkpoint and resume
errors, a configured path that does not exist, NaN/inf in training); anything else is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    sub.add_parser("experiment", help="run an experiment on token tasks (E8): rto-llm experiment E8 --out DIR "
                                      "[--quick]; rto-llm experiment --help", add_help=False)
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
        p.add_argument(
            "--resume-allow-changes", metavar="KEYS", default=None,
            help="with --resume: comma-separated keys that may differ from the checkpoint's config "
                 "(checkpoint.allow_changes, e.g. train.max_steps)",
        )
        p.add_argument(
            "--overwrite", action="store_true",
            help="fresh start in a non-empty train.output_dir: delete the previous run's outputs first",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    return parser


def _configured_paths(cfg) -> list[tuple[str, str]]:
    """``(key, path)`` of the path-valued settings of ``cfg`` (model/data/role paths, output_dir, resume, files)."""
    if cfg is None:
        return []
    from rto_llm.config import to_dict

    out = []
    for name, sec in to_dict(cfg).items():
        for k, v in sec.items():
            if isinstance(v, str) and len(v) > 1 and k.endswith(("path", "_file", "output_dir", "resume", "gold")):
                out.append((f"{name}.{k}", v.removeprefix("task:").removeprefix("hf:")))
    return out


def user_error(e: BaseException, cfg) -> str | None:
    """``"kind: message"`` when ``e`` is a user error (a wrong setting, file, data or checkpoint, or NaN/inf in
    training), None when it is a bug (shown with its traceback)."""
    from rto_llm.checkpoint import CheckpointError
    from rto_llm.guard import NonFiniteError

    kinds: list[tuple[type, str]] = [(ConfigError, "config error"), (CheckpointError, "checkpoint error"),
                                     (NonFiniteError, "stopped")]
    for module, name, kind in (("rto_llm.data", "DataError", "data error"),
                               ("rto_llm.models", "TokenizerMismatchError", "tokenizer error")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            kinds.append((getattr(mod, name), kind))
    for cls, kind in kinds:
        if isinstance(e, cls):
            return f"{kind}: {e}"
    if isinstance(e, OSError):
        text = str(e)
        fname = os.path.normpath(str(e.filename)) if getattr(e, "filename", None) else ""
        for key, p in _configured_paths(cfg):
            q = os.path.normpath(p)
            if p in text or (fname and (fname == q or fname.startswith(q + os.sep))):
                return f"file error ({key}): {e}"
    if isinstance(e, ImportError) and "pip install" in str(e):
        return f"missing package: {e}"
    return None


def _fail(stage: str, message: str) -> int:
    print(f"rto-llm {stage}: " + " ".join(message.split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if argv_list[:1] == ["experiment"]:            # `rto-llm experiment E8 ...` (rto_llm/experiments)
        from rto_llm.experiments import main as experiment_main

        return experiment_main(argv_list[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)   # overrides may also follow the flags
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cls = STAGES[args.stage][0]
    overrides = list(args.overrides) + extra
    if args.resume and "=" in args.resume and not os.path.isdir(args.resume):
        # `--resume train.lr=...`: the optional DIR swallowed an override; it was meant as --resume (latest)
        overrides.append(args.resume)
        args.resume = "latest"
    raw = list(sys.argv[1:] if argv is None else argv)
    overrides.sort(key=lambda o: raw.index(o) if o in raw else -1)   # command-line order: the last one wins
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.resume_allow_changes is not None:
        overrides.append(f"checkpoint.allow_changes={args.resume_allow_changes}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    try:
        cfg = load_config(cls, args.config, overrides)
        if args.stage in VALIDATORS:
            VALIDATORS[args.stage](cfg)
    except ConfigError as e:
        return _fail(args.stage, f"config error: {e}")
    if args.print_config:
        import yaml

        from rto_llm.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        trainer = trainer_class(args.stage)(cfg)   # loads data, then the models (cross-section checks too)
        trainer.train(stop_after=cfg.train.stop_after or None)
    except Exception as e:
        message = user_error(e, cfg)
        if message is None:
            raise                                  # a bug: keep the traceback
        return _fail(args.stage, message)
    from rto_llm.distributed import shutdown

    shutdown(trainer.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
