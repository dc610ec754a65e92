"""DeepSpeed ZeRO (and the plain-torch multi-process path) on CPU (gloo): 2 processes launched with
torchrun through the CLI match one plain-torch process. Tolerance: 1e-5 absolute on per-step losses and
final weights (float32 sums in another order; observed differences are ~2e-7)."""

import os
import subprocess
import sys

import pytest

from rto_llm.config import DPOConfig, SFTConfig
from rto_llm.distributed import free_port
from tests.rto_llm.lm_helpers import assert_runs_match

pytest.importorskip("deepspeed")


def _torchrun(stage: str, overrides: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "rto_llm.cli", stage, *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def _args(cfg) -> list[str]:
    return [f"model.path={cfg.model.path}", f"data.train_path={cfg.data.train_path}", "log.progress_bar=false",
            "log.tensorboard=false", "train.device=cpu", f"train.batch_size={cfg.train.batch_size}"]


@pytest.mark.parametrize("backend", ["deepspeed-zero2", "deepspeed-zero3", "torch"])
def test_two_process_sft_matches_single_process(make_cfg, tmp_path, backend):
    from rto_llm.trainers.sft import SFTTrainer

    # single process: 2 micro-batches of 8; 2 processes x 2 micro-batches of 4 (token-mean over the
    # global batch, so unequal token counts per process must still be weighted right)
    cfg = make_cfg(SFTConfig, "train.lr=3e-3", "train.max_steps=4", f"train.output_dir={tmp_path / 'single'}")
    SFTTrainer(cfg).train()
    single = cfg.train.output_dir
    ds_dir = tmp_path / "multi"
    engine = ["deepspeed.enabled=true", f"deepspeed.zero_stage={backend[-1]}"] if backend != "torch" else []
    _torchrun("sft", _args(cfg) + ["train.lr=3e-3", "train.max_steps=4", "train.micro_batch_size=4",
                                   f"train.output_dir={ds_dir}", *engine])
    assert_runs_match(single, ds_dir, 4, cfg.model.path)


def test_two_process_zero3_dpo_interrupted_and_resumed_matches_single_process(make_cfg, tmp_path):
    from rto_llm.trainers.dpo import DPOTrainer

    cfg = make_cfg(DPOConfig, "train.lr=1e-3", "train.max_steps=4", f"train.output_dir={tmp_path / 'single'}",
                   data="pref")
    DPOTrainer(cfg).train()
    single = cfg.train.output_dir
    ds_dir = tmp_path / "ds"
    common = _args(cfg) + ["train.lr=1e-3", "train.max_steps=4", "train.micro_batch_size=4",
                           "deepspeed.enabled=true", "deepspeed.zero_stage=3", f"train.output_dir={ds_dir}"]
    _torchrun("dpo", common + ["train.stop_after=2"])
    assert open(ds_dir / "checkpoints" / "latest").read() == "step-00000002"
    assert not (ds_dir / "final").exists()
    _torchrun("dpo", common + ["checkpoint.resume=latest"])
    assert_runs_match(single, ds_dir, 4, cfg.model.path)
