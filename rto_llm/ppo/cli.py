"""``python -m rto_llm.ppo.cli {ppo,rto} ...``: the PPO and RTO stages of ``rto-llm`` (same as ``rto-llm ppo`` /
``rto-llm rto``; kept so ``python -m`` launchers such as torchrun can start the stage directly)."""

from __future__ import annotations

import sys

from rto_llm.cli import main as _main


def main(argv: list[str] | None = None) -> int:
    """Entry point for the ``ppo`` / ``rto`` stages; ``argv`` starts with the stage name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("ppo", "rto", "-h", "--help"):
        print(f"rto_llm.ppo.cli: the stage must be 'ppo' or 'rto', got {argv[0]!r}", file=sys.stderr)
        return 2
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
