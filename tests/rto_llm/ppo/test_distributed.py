"""Two processes (gloo, CPU): whitening over the whole buffer, and a PPO/RTO run through torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rto_llm.distributed import free_port
from rto_llm.testing import ppo_overrides
from rto_sim.core import masked_whiten


def _whiten_worker(rank: int, port: int, xs, ms, out):
    import torch.distributed as dist

    from rto_llm.ppo.experience import whiten_over_processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out[rank] = whiten_over_processes(xs[rank], ms[rank])
    dist.destroy_process_group()


def test_whitening_spans_all_processes():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, generator=g) * 2 + 1, torch.randn(4, 7, generator=g) - 3]  # different shapes
    ms = [torch.rand(3, 5, generator=g) > 0.3, torch.rand(4, 7, generator=g) > 0.3]
    out = mp.Manager().dict()
    mp.spawn(_whiten_worker, args=(free_port(), xs, ms, out), nprocs=2, join=True)
    # reference: one buffer holding both processes' rows
    full_x, full_m = torch.zeros(7, 7), torch.zeros(7, 7, dtype=torch.bool)
    full_x[:3, :5], full_m[:3, :5] = xs[0], ms[0]
    full_x[3:, :], full_m[3:, :] = xs[1], ms[1]
    ref = masked_whiten(full_x, full_m)
    torch.testing.assert_close(out[0], ref[:3, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], ref[3:, :], atol=1e-6, rtol=0)
    assert float(masked_whiten(xs[0], ms[0])[ms[0]].mean()) == pytest.approx(0.0, abs=1e-6)
    assert abs(float(out[0][ms[0]].mean())) > 0.1  # a per-process whitening would have mean 0 here


def test_two_process_rto_run(fx, tmp_path):
    out = tmp_path / "ddp"
    over = ppo_overrides(fx, str(out), "ppo.max_rollouts=2", f"rto.dpo_path={fx['dpo']}", "checkpoint.save_every=2",
                         rollout=8, train_batch=4, micro=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "rto_llm.ppo.cli", "rto", *over]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k != "val/explained_variance")
    assert rows[0]["objective/kl"] == 0.0 and rows[1]["grad_norm/actor"] > 0
    assert (out / "checkpoints" / "step-00000002" / "actor" / "engine.pt").exists()
