import dataclasses

import pytest

from rto_llm.cli import STAGES, main
from rto_llm.config import ConfigError, DPOConfig, RMConfig, SFTConfig, config_help, load_config


def _fields(cls):
    cfg = cls()
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            yield sec.name, f


@pytest.mark.parametrize("cls", [SFTConfig, RMConfig, DPOConfig])
def test_every_field_has_default_and_doc(cls):
    assert cls.__doc__
    n = 0
    for _, f in _fields(cls):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("doc"), f"{f.name} has no doc"
        n += 1
    assert n > 40


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_lists_every_option_with_default(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sec, f in _fields(STAGES[stage][0]):
        assert f"{sec}.{f.name} (" in out
        assert f.metadata["doc"][:30] in out


def test_yaml_and_dotted_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  path: /m\ndata:\n  train_path: d.jsonl\ntrain:\n  lr: 1e-5\n  batch_size: 8\n")
    cfg = load_config(DPOConfig, str(y), ["train.lr=3e-4", "dpo.loss_type=ipo", "model.dropout=true"])
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 8
    assert cfg.dpo.loss_type == "ipo" and cfg.model.dropout is True
    cfg = load_config(DPOConfig, str(y))
    assert cfg.train.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; float fields accept it


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(SFTConfig, None, ["model.path=/m", "data.train_path=x", "train.learning_rate=1"])
    y = tmp_path / "run.yaml"
    y.write_text("modle:\n  path: /m\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(SFTConfig, str(y))


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    base = ["model.path=/m", "data.train_path=x"]
    with pytest.raises(ConfigError, match=r"train\.batch_size.*expected int"):
        load_config(SFTConfig, None, base + ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match=r"dpo\.loss_type.*not one of"):
        load_config(DPOConfig, None, base + ["dpo.loss_type=hinge"])
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  path: /m\n  dropout: 3\ndata:\n  train_path: d\n")
    with pytest.raises(ConfigError, match=r"model\.dropout.*expected bool"):
        load_config(SFTConfig, str(y))
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage"):
        load_config(SFTConfig, None, base + ["deepspeed.zero_stage=4"])


def test_cross_field_checks():
    base = ["model.path=/m", "data.train_path=x"]
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(SFTConfig, None, ["data.train_path=x"])
    with pytest.raises(ConfigError, match="max_prompt_len"):
        load_config(SFTConfig, None, base + ["data.max_len=64", "data.max_prompt_len=64"])
    with pytest.raises(ConfigError, match="cdpo"):
        load_config(DPOConfig, None, base + ["dpo.loss_type=cdpo"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(DPOConfig, None, base + ["dpo.beta=0"])


def test_cli_reports_config_errors(capsys):
    assert main(["sft", "model.path=/m", "data.train_path=x", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_help_text_mentions_types_and_defaults():
    text = config_help(DPOConfig)
    assert "dpo.beta (float, default 0.1)" in text
    assert "deepspeed.zero_stage ({0,1,2,3}, default 2)" in text
