"""Tiny offline fixtures for the PPO / RTO tests and the CPU benchmark.

- :func:`build_token_counting_rm`: a hand-set ``LlamaForSequenceClassification`` whose score rises with the
  fraction of a target token in the sequence (a reward model that "prefers a particular token"). One layer:
  zero queries and keys give uniform causal attention, so the last position sees the mean of the
  normalized token embeddings; embedding dimension 0 marks the target token, the head reads it.
- :func:`build_preferring_lm`: a copy of a causal LM nudged by a few gradient steps to put more mass on a
  target token (a stand-in DPO model that prefers it), as a full model or as a LoRA adapter.
- :func:`write_ppo_fixture`: actor / reward-model / DPO directories and a prompt file for a run.
"""

from __future__ import annotations

import copy
import os

import torch

from rto_llm.models import set_reward_stats
from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer, toy_sft_rows, write_jsonl

TARGET_WORD = "ok"


def build_token_counting_rm(tokenizer, target_id: int, hidden_size: int = 32):
    """A deterministic reward model: score = increasing function of the target token's frequency."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 1] = 1.0  # a constant direction
        # the feature the head reads: 1 for the target, small fixed values for the others (so that every
        # sequence gets its own nonzero score)
        emb[:, 0] = 0.1 * torch.randn(emb.shape[0], generator=torch.Generator().manual_seed(target_id))
        emb[target_id, 0] = 1.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight.copy_(torch.eye(hidden_size))
        attn.o_proj.weight.copy_(torch.eye(hidden_size))
        model.score.weight[0, 0] = 1.0
    set_reward_stats(model, 0.0, 1.0)
    return model.eval()


def build_preferring_lm(base, target_id: int, steps: int = 30, lr: float = 1e-2, lora_rank: int = 0, seed: int = 0):
    """A copy of ``base`` trained a few steps to raise log p(target) after random contexts.

    With ``lora_rank > 0`` returns a peft model (LoRA on all linear layers of the copy) instead.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=True))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = base.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(7, vocab, (8, 6))  # skip the special tokens
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = -torch.log_softmax(logits.float(), -1)[..., target_id].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_ppo_fixture(root: str, hidden_size: int = 32, n_prompts: int = 64, seed: int = 0,
                      dpo: str = "none") -> dict[str, str]:
    """Write ``actor`` (tiny Llama + tokenizer), ``rm`` (token-counting RM), optional ``dpo`` (full model)
    or ``dpo_adapter`` (LoRA adapter over ``actor``), and ``prompts.jsonl`` under ``root``.

    Args:
        dpo: "none", "full", "adapter" or "both".
    """
    tok = build_tiny_tokenizer()
    target = tok.convert_tokens_to_ids(TARGET_WORD)
    paths = {"root": root, "target_id": str(target)}
    actor = build_tiny_llama(tok, hidden_size=hidden_size, seed=seed)
    paths["actor"] = os.path.join(root, "actor")
    actor.save_pretrained(paths["actor"])
    tok.save_pretrained(paths["actor"])
    rm = build_token_counting_rm(tok, target, hidden_size=hidden_size)
    paths["rm"] = os.path.join(root, "rm")
    rm.save_pretrained(paths["rm"])
    tok.save_pretrained(paths["rm"])
    if dpo in ("full", "both"):
        paths["dpo"] = os.path.join(root, "dpo")
        build_preferring_lm(actor, target).save_pretrained(paths["dpo"])
        tok.save_pretrained(paths["dpo"])
    if dpo in ("adapter", "both"):
        paths["dpo_adapter"] = os.path.join(root, "dpo_adapter")
        peft_model = build_preferring_lm(actor, target, lora_rank=4)
        peft_model.save_pretrained(paths["dpo_adapter"])
        # point the adapter at the actor directory (its base)
        import json

        cfg_path = os.path.join(paths["dpo_adapter"], "adapter_config.json")
        with open(cfg_path) as f:
            acfg = json.load(f)
        acfg["base_model_name_or_path"] = paths["actor"]
        with open(cfg_path, "w") as f:
            json.dump(acfg, f)
    rows = [{"prompt": r["prompt"]} for r in toy_sft_rows(n_prompts, seed=seed)]
    paths["prompts"] = write_jsonl(os.path.join(root, "prompts.jsonl"), rows)
    return paths


def ppo_overrides(paths: dict[str, str], out_dir: str, *extra: str, rollout: int = 8, train_batch: int = 8,
                  micro: int = 4, max_new_tokens: int = 6) -> list[str]:
    """Dotted overrides for a tiny CPU run on :func:`write_ppo_fixture` directories."""
    return [
        f"model.path={paths['actor']}",
        f"data.train_path={paths['prompts']}",
        f"reward.path={paths['rm']}",
        f"train.output_dir={out_dir}",
        "train.device=cpu",
        f"train.batch_size={train_batch}",
        f"train.micro_batch_size={micro}",
        "train.lr=1e-3",
        "critic.lr=1e-3",
        f"rollout.batch_size={rollout}",
        f"rollout.generation_batch_size={rollout}",
        f"rollout.forward_batch_size={rollout}",
        f"rollout.max_new_tokens={max_new_tokens}",
        "data.max_len=64",
        "data.max_prompt_len=32",
        "log.progress_bar=false",
        "log.tensorboard=false",
        *extra,
    ]
