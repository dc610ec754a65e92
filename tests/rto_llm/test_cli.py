import json
import os

from rto_llm.cli import main


def test_cli_runs_a_stage_from_yaml_with_overrides(tiny_model_dir, toy_data, tmp_path, capsys):
    y = tmp_path / "sft.yaml"
    y.write_text(
        f"model:\n  path: {tiny_model_dir}\ndata:\n  train_path: {toy_data['sft']}\n"
        f"train:\n  output_dir: {tmp_path / 'out'}\n  batch_size: 8\n  micro_batch_size: 8\n  lr: 1e-3\n"
        "log:\n  progress_bar: false\n"
    )
    assert main(["sft", "--config", str(y), "train.max_steps=2", "train.device=cpu"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert os.listdir(tmp_path / "out" / "tb")  # TensorBoard is on by default
    # the resolved config is saved next to the run, and --resume continues from its checkpoint
    assert "max_steps: 2" in open(tmp_path / "out" / "config.yaml").read()


def test_cli_resume_flag_sets_checkpoint_resume(tiny_model_dir, toy_data, tmp_path, capsys):
    args = ["sft", f"model.path={tiny_model_dir}", f"data.train_path={toy_data['sft']}",
            f"train.output_dir={tmp_path}", "--print-config", "--resume"]
    assert main(args) == 0
    assert "resume: latest" in capsys.readouterr().out
