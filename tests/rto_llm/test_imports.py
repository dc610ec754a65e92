"""Heavy packages are lazy: importing rto_llm (and its CLI) pulls in none of them; rto_sim never imports
transformers."""

import subprocess
import sys

HEAVY = ["transformers", "deepspeed", "peft", "wandb", "datasets", "tensorboard"]


def _run(code: str) -> str:
    """The stripped stdout of ``python -c code`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _loaded_after(stmt: str) -> list[str]:
    out = _run(f"import sys; {stmt}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    return [m for m in out.split(",") if m]


def test_rto_llm_import_is_light():
    assert _loaded_after("import rto_llm, rto_llm.config, rto_llm.cli, rto_llm.data, rto_llm.checkpoint") == []


def test_models_module_defers_transformers():
    assert _loaded_after("import rto_llm.models, rto_llm.distributed, rto_llm.logging") == []


def test_rto_sim_never_imports_transformers():
    assert "transformers" not in _loaded_after("import rto_sim, rto_sim.core")


def test_core_is_torch_only():
    """The shared algorithm core loads neither the simulator's numerical stack nor any LLM package."""
    code = ("import sys; import rto_sim.core; "
            "print(','.join(m for m in ('scipy', 'pandas', 'gymnasium', 'pyarrow', 'transformers', 'deepspeed') "
            "if m in sys.modules))")
    assert _run(code) == ""


def test_rto_sim_package_and_cli_help_are_light():
    """`import rto_sim` resolves names lazily; `rto-sim --help` parses before importing pandas or scipy."""
    code = ("import sys, contextlib, io; import rto_sim; from rto_sim import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): cli.main(['--help'])\n"
            "print(','.join(m for m in ('scipy', 'pandas', 'torch') if m in sys.modules))")
    assert _run(code) == ""
    # the lazy names still resolve to the real objects
    from rto_sim import TokenMDP
    from rto_sim.mdp import TokenMDP as T2
    assert TokenMDP is T2
