"""Heavy packages are lazy: importing rto_llm (and its CLI) pulls in none of them; rto_sim never imports
transformers."""

import subprocess
import sys

HEAVY = ["transformers", "deepspeed", "peft", "wandb", "datasets", "tensorboard"]


def _loaded_after(stmt: str) -> list[str]:
    code = f"import sys; {stmt}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_rto_llm_import_is_light():
    assert _loaded_after("import rto_llm, rto_llm.config, rto_llm.cli, rto_llm.data, rto_llm.checkpoint") == []


def test_models_module_defers_transformers():
    assert _loaded_after("import rto_llm.models, rto_llm.distributed, rto_llm.logging") == []


def test_rto_sim_never_imports_transformers():
    assert "transformers" not in _loaded_after("import rto_sim, rto_sim.core")
