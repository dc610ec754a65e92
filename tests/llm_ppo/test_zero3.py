"""PPO / RTO under DeepSpeed ZeRO-3 (one process, CPU, gloo) with gradient accumulation.

Each train batch of 8 sequences is 4 micro-batches of 2 (4 backward passes per optimizer step, 2 optimizer
steps per rollout, actor and critic). ZeRO-3 keeps its per-micro-batch gradient bookkeeping in
``engine.forward``; the trainer's forwards go through ``engine.run`` (``StageForward``), so the run matches
plain torch: every rollout's metrics and the exported actor within 1e-5 absolute (float32 sums in another
order). The control run calls the wrapped model directly (bypassing ``engine.forward``), the bug that
``engine.run`` fixes: it must *not* match, which shows the comparison can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from rto_llm.testing import ppo_overrides

pytest.importorskip("deepspeed")

TOL = 1e-5
KEYS = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "grad_norm/actor",
        "grad_norm/critic", "policy/approxkl_avg", "val/explained_variance")

# The DeepSpeed engine calling the model directly instead of through engine.forward (the old bug).
_BYPASS = (
    "import sys, rto_llm.distributed as d\n"
    "d.DeepSpeedEngine.run = lambda self, fn, *a: fn(self.module, *a)\n"
    "from rto_llm.ppo.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _over(fx, out, *extra):
    return ppo_overrides(fx, str(out), "ppo.max_rollouts=2", f"rto.dpo_path={fx['dpo']}", "rto.beta1=0.5",
                         *extra, rollout=16, train_batch=8, micro=2)


def _ds_run(fx, out, code: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    over = _over(fx, out, "deepspeed.enabled=true", "deepspeed.zero_stage=3")
    cmd = [sys.executable, "-c", code, "rto", *over] if code else [sys.executable, "-m", "rto_llm.ppo.cli", "rto",
                                                                   *over]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _max_weight_diff(a_dir, b_dir) -> float:
    a = load_file(os.path.join(a_dir, "final", "model.safetensors"))
    b = load_file(os.path.join(b_dir, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def torch_run(fx, tmp_path_factory):
    from rto_llm.config import load_config
    from rto_llm.ppo.config import RTOConfig
    from rto_llm.ppo.trainer import PPOTrainer

    out = tmp_path_factory.mktemp("rto_torch")
    tr = PPOTrainer(load_config(RTOConfig, None, _over(fx, out)))
    assert tr.grad_accum == 4 and tr.steps_per_rollout == 2
    tr.train()
    return out


def test_zero3_rto_with_grad_accumulation_matches_plain_torch(fx, torch_run, tmp_path):
    out = tmp_path / "zero3"
    _ds_run(fx, out)
    ref, got = _metrics(torch_run), _metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2]
    for r, g in zip(ref, got):
        for k in KEYS:
            assert g[k] == pytest.approx(r[k], abs=TOL), k
    assert _max_weight_diff(torch_run, out) < TOL
    init = load_file(os.path.join(fx["actor"], "model.safetensors"))
    final = load_file(os.path.join(torch_run, "final", "model.safetensors"))
    assert max((init[k] - final[k]).abs().max().item() for k in init) > 100 * TOL  # the actor really moved


def test_zero3_without_engine_forward_loses_accumulated_gradients(fx, torch_run, tmp_path):
    """Control: bypassing engine.forward under ZeRO-3 changes the update, so the test above can fail."""
    out = tmp_path / "bypass"
    _ds_run(fx, out, code=_BYPASS)
    ref, got = _metrics(torch_run), _metrics(out)
    # rollout 1 is generated before any update: identical; its update is not
    assert got[0]["objective/scores"] == pytest.approx(ref[0]["objective/scores"], abs=TOL)
    grad_gap = max(abs(g[k] - r[k]) for r, g in zip(ref, got) for k in ("grad_norm/actor", "grad_norm/critic"))
    assert grad_gap > 100 * TOL
    assert _max_weight_diff(torch_run, out) > 100 * TOL
