"""Each stage learns the toy task on the tiny Llama (plain-torch path, CPU)."""

import json
import os

import pytest
import torch

from rto_llm.config import DPOConfig, RMConfig, SFTConfig
from rto_llm.models import load_scalar_model, reward_stats, sequence_scores
from rto_llm.trainers.dpo import DPOTrainer
from rto_llm.trainers.rm import RMTrainer
from rto_llm.trainers.sft import SFTTrainer


def _losses(history):
    return [h["train/loss"] for h in history]


def test_sft_loss_falls(make_cfg, tmp_path):
    from rto_llm.testing import toy_sft_rows, write_jsonl

    held_out = write_jsonl(str(tmp_path / "eval.jsonl"), toy_sft_rows(32, seed=1))
    cfg = make_cfg(SFTConfig, "train.lr=3e-3", "train.max_steps=20", "train.warmup_ratio=0",
                   f"data.eval_path={held_out}")
    hist = SFTTrainer(cfg).train()
    losses = _losses(hist)
    assert len(losses) == 20
    assert losses[-1] < 0.8 * losses[0], losses
    assert os.path.isfile(os.path.join(cfg.train.output_dir, "final", "model.safetensors"))
    rows = [json.loads(x) for x in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 21)) + [20] and "perf/tokens_per_s" in rows[0]
    assert rows[-1]["eval/loss"] < 0.8 * losses[0]  # held-out rows (another seed) improve too


def test_sft_loss_is_response_tokens_only(make_cfg):
    """The first logged loss equals the teacher-forced NLL with prompt labels masked (-100)."""
    cfg = make_cfg(SFTConfig, "train.max_steps=1", "checkpoint.export_hf=false")
    tr = SFTTrainer(cfg)
    exs = [tr.train_examples[i] for i in tr.batch_indices(0)]
    model = tr.engine.module
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:
            ids = torch.tensor([e["input_ids"]])
            labels = ids.clone()
            labels[:, : e["prompt_len"]] = -100
            n = len(e["input_ids"]) - e["prompt_len"]
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    loss = tr.train()[0]["train/loss"]
    assert loss == pytest.approx(total / count, abs=1e-5)


def test_gradient_accumulation_matches_one_big_batch(make_cfg, tmp_path):
    """token-mean over the global batch: 4 micro-batches of 4 == 1 micro-batch of 16."""
    weights = []
    for mb in (16, 4):
        cfg = make_cfg(SFTConfig, "train.lr=1e-3", "train.max_steps=3", f"train.micro_batch_size={mb}",
                       f"train.output_dir={tmp_path / str(mb)}", "checkpoint.export_hf=false")
        tr = SFTTrainer(cfg)
        hist = tr.train()
        weights.append((tr.engine.module.state_dict(), _losses(hist)))
    (w16, l16), (w4, l4) = weights
    assert l16 == pytest.approx(l4, abs=1e-5)
    for k in w16:
        torch.testing.assert_close(w16[k], w4[k], atol=1e-5, rtol=1e-4)


def test_reward_model_learns_and_saves_stats(make_cfg):
    cfg = make_cfg(RMConfig, "train.lr=1e-3", "train.max_steps=6", "train.warmup_ratio=0", data="pref")
    tr = RMTrainer(cfg)
    hist = tr.train()
    losses = _losses(hist)
    assert losses[0] == pytest.approx(0.693, abs=0.05)  # small head: scores start near 0
    assert losses[-1] < 0.8 * losses[0], losses
    assert hist[-1]["train/accuracy"] > 0.9
    final = os.path.join(cfg.train.output_dir, "final")
    rm = load_scalar_model(cfg.model.__class__(path=final), trainable=False)
    mean, std = reward_stats(rm)
    # the stored statistics are those of the exported model's scores on the training responses
    batch = tr._to_device(tr.collate(tr.train_examples))
    s = sequence_scores(rm, batch["input_ids"], batch["attention_mask"]).double()
    assert mean == pytest.approx(s.mean().item(), abs=1e-4)
    assert std == pytest.approx(s.std(unbiased=False).item(), abs=1e-4)
    assert std > 0.1


def test_reward_margin_option(make_cfg, tmp_path):
    from rto_llm.testing import toy_preference_rows, write_jsonl

    rows = toy_preference_rows(32)
    for r in rows:
        r["m"] = 2.0
    path = write_jsonl(str(tmp_path / "m.jsonl"), rows)
    cfg = make_cfg(RMConfig, f"data.train_path={path}", "data.margin_key=m", "train.max_steps=1",
                   "checkpoint.export_hf=false", data="pref")
    loss = RMTrainer(cfg).train()[0]["train/loss"]
    # scores start near 0, so the loss is close to -log sigmoid(-2) = 2.127 rather than log 2
    assert loss == pytest.approx(2.127, abs=0.1)


@pytest.mark.parametrize("loss_type,steps,extra", [("sigmoid", 10, []), ("ipo", 4, ["dpo.beta=0.5"]),
                                                   ("cdpo", 14, ["dpo.label_smoothing=0.1"])])
def test_dpo_loss_falls(make_cfg, loss_type, steps, extra):
    cfg = make_cfg(DPOConfig, "train.lr=1e-3", f"train.max_steps={steps}", "train.warmup_ratio=0",
                   f"dpo.loss_type={loss_type}", "checkpoint.export_hf=false", *extra, data="pref")
    hist = DPOTrainer(cfg).train()
    losses = _losses(hist)
    if loss_type != "ipo":
        assert losses[0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 0
    assert losses[-1] < 0.8 * losses[0], losses
    assert hist[-1]["train/reward_margin"] > 0


def test_dpo_reference_on_the_fly_equals_precomputed_and_stays_frozen(make_cfg, tmp_path):
    results = []
    for pre in ("true", "false"):
        cfg = make_cfg(DPOConfig, "train.lr=1e-3", "train.max_steps=3", f"dpo.precompute_ref={pre}",
                       f"train.output_dir={tmp_path / pre}", "checkpoint.export_hf=false", data="pref")
        tr = DPOTrainer(cfg)
        ref_before = None if tr.reference is None else {k: v.clone() for k, v in tr.reference.state_dict().items()}
        results.append(_losses(tr.train()))
        if ref_before is not None:
            assert not tr.reference.training
            for k, v in tr.reference.state_dict().items():
                assert torch.equal(v, ref_before[k])
    assert results[0] == pytest.approx(results[1], abs=1e-5)


def test_dpo_with_lora_reference_is_adapter_off(make_cfg):
    pytest.importorskip("peft")
    cfg = make_cfg(DPOConfig, "train.lr=1e-2", "train.max_steps=8", "train.warmup_ratio=0",
                   "model.lora_rank=8", "dpo.precompute_ref=false", data="pref")
    tr = DPOTrainer(cfg)
    assert tr.reference is None  # no second model: the base with its adapter off is the reference
    hist = tr.train()
    losses = _losses(hist)
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert losses[-1] < 0.8 * losses[0], losses
    assert os.path.isfile(os.path.join(cfg.train.output_dir, "final", "adapter_config.json"))


def test_trainers_refuse_bad_tokenizers_at_start_up(make_cfg, tmp_path):
    """PAD == EOS, or a reference with another vocabulary: a clear error before any training step."""
    from rto_llm.models import TokenizerMismatchError
    from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer

    bad = build_tiny_tokenizer(pad_token="<eos>")
    build_tiny_llama(bad).save_pretrained(tmp_path / "padeos")
    bad.save_pretrained(tmp_path / "padeos")
    # model.pad_token=keep: the tokenizer as saved (the default, auto, would add a dedicated PAD instead)
    with pytest.raises(TokenizerMismatchError, match="PAD == EOS"):
        SFTTrainer(make_cfg(SFTConfig, f"model.path={tmp_path / 'padeos'}", "model.pad_token=keep"))
    other = build_tiny_tokenizer(extra_words=("extra",))
    build_tiny_llama(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatchError, match="'policy' and 'reference' differ"):
        DPOTrainer(make_cfg(DPOConfig, f"dpo.ref_path={tmp_path / 'other'}", data="pref"))


def test_gradient_checkpointing_gives_the_same_updates(make_cfg, tmp_path):
    runs = []
    for gc in ("false", "true"):
        cfg = make_cfg(SFTConfig, "train.lr=1e-3", "train.max_steps=2", f"model.gradient_checkpointing={gc}",
                       f"train.output_dir={tmp_path / gc}", "checkpoint.export_hf=false")
        tr = SFTTrainer(cfg)
        on = getattr(tr.model, "is_activation_checkpointing", None)
        assert (on if on is not None else tr.model.is_gradient_checkpointing) == (gc == "true")
        runs.append(_losses(tr.train()))
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)
