"""PAD-less models (Llama-3, SmolLM2) run unchanged (``model.pad_token``), LoRA reward models (with their score
mean/std) load as reward models, and every role path is checked to hold the kind of model its role needs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rto_llm.config import ConfigError, DPOConfig, ModelConfig, RMConfig, SFTConfig, load_config
from rto_llm.models import (
    AUTO_PAD_TOKEN,
    REWARD_STATS_FILE,
    TokenizerMismatchError,
    check_tokenizers,
    ensure_pad_token,
    fit_model_to_tokenizer,
    forward_logprobs,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    reward_stats,
    sequence_scores,
)
from rto_llm.testing import (
    build_llama3_style_tokenizer,
    build_tiny_llama,
    build_tiny_tokenizer,
    ppo_overrides,
    save_model_dir,
    save_tiny_model,
    toy_preference_rows,
    toy_sft_rows,
    write_jsonl,
    write_ppo_fixture,
)

QUIET = ["train.device=cpu", "log.progress_bar=false", "log.tensorboard=false"]


# ---------------------------------------------------------------------------------------------------
# The PAD policy
# ---------------------------------------------------------------------------------------------------


def test_pad_policy_auto_named_keep_and_eos_refused():
    tok = build_llama3_style_tokenizer()
    n = len(tok)
    assert tok.pad_token is None
    assert ensure_pad_token(tok, "auto") and tok.pad_token == AUTO_PAD_TOKEN and tok.pad_token_id == n
    assert not ensure_pad_token(tok, "auto") and len(tok) == n + 1  # idempotent
    check_tokenizers({"actor": tok})  # PAD != EOS
    same_as_eos = build_tiny_tokenizer(pad_token="<eos>")
    assert ensure_pad_token(same_as_eos, "auto") and same_as_eos.pad_token == AUTO_PAD_TOKEN
    distinct = build_tiny_tokenizer()
    assert not ensure_pad_token(distinct, "auto") and distinct.pad_token == "<pad>"
    named = build_llama3_style_tokenizer()
    assert ensure_pad_token(named, "<|reserved_special_token_0|>") and len(named) == n  # an existing token
    assert named.pad_token_id == named.convert_tokens_to_ids("<|reserved_special_token_0|>")
    with pytest.raises(ConfigError, match=r"model\.pad_token='<\|eot_id\|>' is the EOS token"):
        ensure_pad_token(build_llama3_style_tokenizer(), "<|eot_id|>")
    kept = build_tiny_tokenizer(pad_token="<eos>")
    assert not ensure_pad_token(kept, "keep")
    with pytest.raises(TokenizerMismatchError, match=r"PAD == EOS .*set model\.pad_token=auto"):
        check_tokenizers({"policy": kept})
    with pytest.raises(TokenizerMismatchError, match=r"no PAD token: set model\.pad_token=auto"):
        check_tokenizers({"policy": build_llama3_style_tokenizer()})


@pytest.mark.parametrize("tied", [False, True])
def test_resize_is_deterministic_mean_rows_and_keeps_tied_embeddings(tmp_path, tied):
    base = save_tiny_model(str(tmp_path / "base"), llama3_style=True, tie_word_embeddings=tied)
    mcfg = ModelConfig(path=base)
    a = load_causal_lm(mcfg, trainable=False)
    b = load_causal_lm(mcfg, trainable=False)
    tok = load_tokenizer(base, pad_token="auto")
    n = len(tok)
    emb, out = a.get_input_embeddings().weight, a.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == n == 32 and a.config.pad_token_id == tok.pad_token_id == 31
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    torch.testing.assert_close(out[-1], out[:-1].mean(0))
    assert (emb.data_ptr() == out.data_ptr()) == tied  # tying survives the resize
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k  # two loads (actor, reference) are identical
    # the global RNG is untouched by the resize
    fresh = build_tiny_llama(build_llama3_style_tokenizer(), tie_word_embeddings=tied)
    state = torch.get_rng_state()
    assert fit_model_to_tokenizer(fresh, tok) == 1
    assert torch.equal(state, torch.get_rng_state())
    # a model saved with its PAD reloads without another resize, and with the same tokenizer
    save_model_dir(str(tmp_path / "saved"), a, tok)
    assert json.load(open(tmp_path / "saved" / "config.json"))["pad_token_id"] == 31
    c = load_causal_lm(ModelConfig(path=str(tmp_path / "saved")), trainable=False)
    torch.testing.assert_close(c.get_input_embeddings().weight, emb)
    assert load_tokenizer(str(tmp_path / "saved")).get_vocab() == tok.get_vocab()


def test_lora_adapter_over_a_resized_base_is_reproduced_exactly(tmp_path):
    """LoRA freezes the embeddings, so the PAD rows of an adapter's base are the deterministic mean rows; the
    adapter loaded later over the same base (resized again) gives the trained model's log-probs exactly."""
    base = save_tiny_model(str(tmp_path / "base"), llama3_style=True)
    mcfg = ModelConfig(path=base, lora_rank=4, lora_alpha=8)
    tok = load_tokenizer(base, pad_token="auto")
    model = load_causal_lm(mcfg, trainable=True, tokenizer=tok)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained
    model.eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    tok.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([tok("count up from 1 2 3 ok")["input_ids"] + [tok.pad_token_id] * 2])
    mask = (ids != tok.pad_token_id).long()
    want = forward_logprobs(model, ids, mask, response_mask=mask)
    got_model = load_causal_lm(ModelConfig(path=str(tmp_path / "adapter")), trainable=False)
    assert got_model.get_input_embeddings().num_embeddings == len(tok)
    torch.testing.assert_close(forward_logprobs(got_model, ids, mask, response_mask=mask), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Stages on a PAD-less base: every export carries the PAD; roles agree
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A PAD-less Llama-3-style base; SFT (full), a LoRA reward model and a LoRA DPO model trained from it."""
    from rto_llm.trainers.dpo import DPOTrainer
    from rto_llm.trainers.rm import RMTrainer
    from rto_llm.trainers.sft import SFTTrainer

    root = tmp_path_factory.mktemp("pad_chain")
    base = save_tiny_model(str(root / "base"), llama3_style=True)
    sft_data = write_jsonl(str(root / "sft.jsonl"), toy_sft_rows(32))
    pref = write_jsonl(str(root / "pref.jsonl"), toy_preference_rows(32))
    common = QUIET + ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=2", "train.lr=1e-2"]
    SFTTrainer(load_config(SFTConfig, None, common + [f"model.path={base}", f"data.train_path={sft_data}",
                                                      f"train.output_dir={root / 'sft'}"])).train()
    rm = RMTrainer(load_config(RMConfig, None, common + [f"model.path={base}", f"data.train_path={pref}",
                                                         f"train.output_dir={root / 'rm'}", "model.lora_rank=4"]))
    rm.train()
    DPOTrainer(load_config(DPOConfig, None, common + [f"model.path={root / 'sft' / 'final'}", "model.lora_rank=4",
                                                      f"data.train_path={pref}", f"train.output_dir={root / 'dpo'}"])
               ).train()
    return {"root": root, "base": base, "sft": str(root / "sft" / "final"), "rm": str(root / "rm" / "final"),
            "dpo": str(root / "dpo" / "final"), "rm_trainer": rm, "pref": pref}


def test_exports_of_a_padless_base_save_the_pad(chain):
    for stage in ("sft", "rm", "dpo"):
        tok = load_tokenizer(chain[stage])
        assert tok.pad_token == AUTO_PAD_TOKEN and tok.pad_token_id == 31, stage
    assert json.load(open(os.path.join(chain["sft"], "config.json")))["pad_token_id"] == 31
    assert json.load(open(os.path.join(chain["sft"], "config.json")))["vocab_size"] == 32
    # the run's tokenizer (base + auto PAD) equals every export's tokenizer
    base_tok = load_tokenizer(chain["base"], pad_token="auto")
    check_tokenizers({"actor": base_tok, "sft": load_tokenizer(chain["sft"]), "rm": load_tokenizer(chain["rm"])})


def test_lora_reward_model_keeps_its_head_and_score_stats(chain):
    """The RM stage with LoRA exports an adapter (no config.json) whose mean/std live in rto_reward_stats.json;
    reward.path loads it as a reward model (adapter merged) with the trained head and the saved stats."""
    rm_dir = chain["rm"]
    assert os.path.isfile(os.path.join(rm_dir, "adapter_config.json"))
    stats = json.load(open(os.path.join(rm_dir, REWARD_STATS_FILE)))
    trained = chain["rm_trainer"].engine.module.eval()
    loaded = load_scalar_model(ModelConfig(path=rm_dir), trainable=False, need="reward_model", field="reward.path")
    assert reward_stats(loaded) == (stats["rto_reward_mean"], stats["rto_reward_std"])
    assert stats["rto_reward_std"] > 0
    tok = load_tokenizer(rm_dir)
    ids = torch.tensor([tok("count up from 1 2 3 4 ok")["input_ids"], tok("count up from 1 2 wrong 7 ok")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(loaded, ids, mask), sequence_scores(trained, ids, mask),
                                   atol=1e-5, rtol=0)


def test_ppo_roles_from_padless_sources_and_lora_reward_model(chain, tmp_path):
    """RTO with the actor and reference from the PAD-less base (resized on load), the LoRA RM adapter, the LoRA
    DPO adapter and a critic from the RM adapter: tokenizers agree, every role covers the PAD, the first KL is
    exactly 0 (identical deterministic PAD rows in actor and reference) and the RM stats are the saved ones."""
    from rto_llm.ppo.config import RTOConfig
    from rto_llm.ppo.trainer import PPOTrainer

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), [{"prompt": r["prompt"]} for r in toy_sft_rows(8)])
    paths = {"actor": chain["base"], "prompts": prompts, "rm": chain["rm"]}
    cfg = load_config(RTOConfig, None, ppo_overrides(paths, str(tmp_path / "run"), "ppo.max_rollouts=1",
                                                     f"rto.dpo_path={chain['dpo']}", f"kl.ref_path={chain['base']}"))
    tr = PPOTrainer(cfg)
    for name, m in tr.roles.named().items():
        assert m.get_input_embeddings().num_embeddings == 32, name
    stats = json.load(open(os.path.join(chain["rm"], REWARD_STATS_FILE)))
    assert (tr.rm_mean, tr.rm_std) == (stats["rto_reward_mean"], stats["rto_reward_std"])
    row = tr.train()[0]
    assert row["objective/kl"] == 0.0
    assert load_tokenizer(str(tmp_path / "run" / "final")).pad_token == AUTO_PAD_TOKEN


# ---------------------------------------------------------------------------------------------------
# Role kinds: one-line errors naming the key
# ---------------------------------------------------------------------------------------------------


def test_role_kind_errors_name_the_key(chain, tmp_path):
    from rto_llm.ppo.config import PPOConfig, RTOConfig
    from rto_llm.ppo.trainer import PPOTrainer
    from rto_llm.trainers.dpo import DPOTrainer
    from rto_llm.trainers.sft import SFTTrainer

    fx = write_ppo_fixture(str(tmp_path / "fx"), dpo="full")

    def ppo(*over, cls=RTOConfig):
        return PPOTrainer(load_config(cls, None, ppo_overrides(fx, str(tmp_path / "run"), *over)))

    with pytest.raises(ConfigError, match=r"^rto\.dpo_path='[^']*/rm' is a reward model \(LlamaForSequenceClassif"
                                          r"ication\); rto\.dpo_path needs a causal LM"):
        ppo(f"rto.dpo_path={fx['rm']}")
    with pytest.raises(ConfigError, match=r"^reward\.path='[^']*/actor' is a causal LM \(LlamaForCausalLM\); "
                                          r"reward\.path needs a reward model"):
        ppo(f"reward.path={fx['actor']}", cls=PPOConfig)
    with pytest.raises(ConfigError, match=r"^model\.path='[^']*/rm' is a reward model"):
        ppo(f"model.path={fx['rm']}", cls=PPOConfig)
    with pytest.raises(ConfigError, match=r"^reward\.path='[^']*/dpo/final' is a causal LM \(LoRA adapter, "
                                          r"task_type CAUSAL_LM\)"):
        ppo(f"reward.path={chain['dpo']}", cls=PPOConfig)
    with pytest.raises(ConfigError, match=r"^rto\.dpo_path='[^']*/rm/final' is a reward model \(LoRA adapter, "
                                          r"task_type SEQ_CLS\)"):
        ppo(f"rto.dpo_path={chain['rm']}")
    pref = chain["pref"]
    with pytest.raises(ConfigError, match=r"^dpo\.ref_path='[^']*/rm' is a reward model"):
        DPOTrainer(load_config(DPOConfig, None, QUIET + [f"model.path={fx['actor']}", f"data.train_path={pref}",
                                                         f"dpo.ref_path={fx['rm']}", f"train.output_dir={tmp_path}/d"]))
    with pytest.raises(ConfigError, match=r"^model\.path='[^']*/rm' is a reward model"):
        SFTTrainer(load_config(SFTConfig, None, QUIET + [f"model.path={fx['rm']}", f"data.train_path={fx['prompts']}",
                                                         f"train.output_dir={tmp_path}/s"]))


def test_cli_role_kind_error_is_one_line(tmp_path, capsys):
    from rto_llm.cli import main

    fx = write_ppo_fixture(str(tmp_path / "fx"))
    rc = main(["ppo", *ppo_overrides(fx, str(tmp_path / "run"), f"reward.path={fx['actor']}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("rto-llm ppo: config error: reward.path=")


def test_roles_with_another_pad_are_refused(tmp_path):
    """A role saved with another PAD than the run's policy gives the actor: the vocabularies differ (named)."""
    from rto_llm.ppo.config import PPOConfig
    from rto_llm.ppo.trainer import PPOTrainer

    fx = write_ppo_fixture(str(tmp_path / "fx"), llama3_style=True)
    other = build_llama3_style_tokenizer()
    ensure_pad_token(other, "<|pad_other|>")
    other.save_pretrained(fx["rm"])
    with pytest.raises(TokenizerMismatchError, match=r"tokenizers of 'actor' and 'reward' differ.*only in actor: "
                                                     r"\['<\|pad\|>'\]; only in reward: \['<\|pad_other\|>'\]"):
        PPOTrainer(load_config(PPOConfig, None, ppo_overrides(fx, str(tmp_path / "run"))))
