"""Multi-node launch, simulated on one machine: two ``torchrun`` agents (``--nnodes 2 --nproc_per_node 1``,
``--node_rank 0/1``, one static rendezvous on 127.0.0.1) each start ``rto_llm.cli sft`` with DeepSpeed ZeRO-2 on
CPU (gloo). Both "nodes" share one output directory and both have LOCAL_RANK=0, so anything keyed on the local
rank instead of the global rank (checkpoint directories, exports, metrics) would be written twice. The run saves
resumable checkpoints and must match one plain-torch process within the 2-process test's tolerance.

A shared output directory needs no setting: rto_llm writes on global rank 0 (``DistInfo.is_main``) and DeepSpeed
picks its checkpoint writers by global / data-parallel rank by default. (DeepSpeed's
``checkpoint.use_node_local_storage=true`` is for node-local disks only: with a shared directory every node's local
rank 0 would write the same ``mp_rank_00_model_states.pt``.)"""

import json
import os
import signal
import subprocess
import sys

import pytest

from rto_llm.config import SFTConfig

pytest.importorskip("deepspeed")

from rto_llm.distributed import free_port  # noqa: E402
from tests.rto_llm.lm_helpers import assert_runs_match  # noqa: E402
from tests.rto_llm.test_deepspeed import _args  # noqa: E402

TIMEOUT = 120


def _two_node_torchrun(stage: str, overrides: list[str], log_dir) -> None:
    """Both agents start at once (node 1 waits at the rendezvous for node 0); each node logs to a file so a
    full pipe can never stall one node while the other waits for it in a collective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()
    logs = [open(log_dir / f"node{node}.log", "w+") for node in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
             "-m", "rto_llm.cli", stage, *overrides],
            env=env, stdout=logs[node], stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:  # SIGTERM: the agent stops its worker (in its own session) before exiting
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for node, (p, f) in enumerate(zip(procs, logs)):
        f.seek(0)
        out = f.read()
        f.close()
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{out[-6000:]}"


def test_two_node_zero2_sft_matches_single_process(make_cfg, tmp_path):
    from rto_llm.trainers.sft import SFTTrainer

    cfg = make_cfg(SFTConfig, "train.lr=3e-3", "train.max_steps=4", f"train.output_dir={tmp_path / 'single'}")
    SFTTrainer(cfg).train()
    out = tmp_path / "multinode"
    _two_node_torchrun("sft", _args(cfg) + [
        "train.lr=3e-3", "train.max_steps=4", "train.micro_batch_size=4", f"train.output_dir={out}",
        "deepspeed.enabled=true", "deepspeed.zero_stage=2", "checkpoint.save_every=2",
    ], tmp_path)
    assert_runs_match(cfg.train.output_dir, out, 4, cfg.model.path)
    ckpts = out / "checkpoints"
    assert open(ckpts / "latest").read() == "step-00000004"
    assert sorted(os.listdir(ckpts)) == ["latest", "step-00000002", "step-00000004"]  # no leftover temporaries
    for step in ("step-00000002", "step-00000004"):
        assert json.load(open(ckpts / step / "trainer_state.json"))["world_size"] == 2
        files = set(os.listdir(ckpts / step)) | {f"ds/{f}" for f in os.listdir(ckpts / step / "ds")}
        assert {"rng_rank0.pt", "rng_rank1.pt", "ds/mp_rank_00_model_states.pt",
                "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
