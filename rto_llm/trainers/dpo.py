"""DPO / IPO / cDPO: the policy against a frozen reference, losses from ``rto_sim.core.dpo_loss``.

Reference log-probs come from (a) a separate frozen model (``dpo.ref_path``, default ``model.path``), or
(b) with LoRA (``model.lora_rank > 0``) the policy itself with its adapter switched off, so the base
weights exist once. With ``dpo.precompute_ref`` they are computed once before training and the
separate reference model is freed; otherwise on every micro-batch. The exported model (or adapter) is
the DPO token-reward model of the RTO stage.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from rto_llm.data import collate_pairs
from rto_llm.distributed import all_reduce_sum
from rto_llm.models import (
    CAUSAL_LM,
    check_model_kind,
    check_tokenizers,
    forward_logprobs,
    load_causal_lm,
    load_tokenizer,
)
from rto_llm.trainers.base import Trainer
from rto_sim.core import dpo_loss, sequence_logprob

log = logging.getLogger("rto_llm")


class DPOTrainer(Trainer):
    stage = "dpo"
    data_kind = "preference"
    model_kind = "causal_lm"

    def build_model(self):
        m, d = self.cfg.model, self.cfg.dpo
        # partitioned at load under ZeRO-3, except with LoRA and precompute_ref: the reference log-probs are then
        # the policy's own (adapter off), computed before the engine exists, which needs the full parameters
        partition = m.lora_rank == 0 or not d.precompute_ref
        with self.trained_init() if partition else nullcontext():
            policy = load_causal_lm(m, trainable=True, tokenizer=self.tokenizer)
        self.reference = None
        if m.lora_rank == 0:
            ref_path = d.ref_path or m.path
            if d.ref_path:
                check_model_kind(d.ref_path, CAUSAL_LM, "dpo.ref_path", m.gguf_file)
                ref_tok = load_tokenizer(d.ref_path, m.allow_hub, m.gguf_file, m.trust_remote_code, m.pad_token)
                check_tokenizers({"policy": self.tokenizer, "reference": ref_tok})
            self.reference = load_causal_lm(m, trainable=False, path=ref_path, tokenizer=self.tokenizer,
                                            field="dpo.ref_path" if d.ref_path else "model.path")
        elif d.ref_path:
            raise ValueError("dpo.ref_path with LoRA: the reference is the policy's base (adapter off); leave it empty")
        return policy

    def collate(self, examples):
        batch = collate_pairs(examples, self.pad_id)
        if "ref_chosen_logp" in examples[0]:
            batch["ref_logps"] = torch.tensor(
                [e["ref_chosen_logp"] for e in examples] + [e["ref_rejected_logp"] for e in examples],
                dtype=torch.float32,
            )
        return batch

    def _reference_context(self, model):
        return model.disable_adapter() if self.cfg.model.lora_rank > 0 else nullcontext()

    @torch.no_grad()
    def _reference_logps(self, model, batch) -> torch.Tensor:
        ref = self.reference if self.reference is not None else model
        with self._reference_context(model):
            lp = forward_logprobs(ref, batch["input_ids"], batch["attention_mask"], response_mask=batch["loss_mask"])
        return sequence_logprob(lp, batch["loss_mask"])

    def before_engine(self):
        if self.reference is not None:
            self.reference.to(self.info.device)
        if not self.cfg.dpo.precompute_ref:
            return
        self._precompute(self.train_examples)
        self._precompute(self.eval_examples)
        self.reference = None  # free the separate reference model (LoRA has none)
        log.info("precomputed reference log-probs for %d pairs", len(self.train_examples) + len(self.eval_examples))

    @torch.no_grad()
    def _precompute(self, examples: list[dict]) -> None:
        """Reference sequence log-probs into each example; each process scores every W-th row."""
        n, W, r = len(examples), self.info.world_size, self.info.rank
        if n == 0:
            return
        out = torch.zeros(n, 2, dtype=torch.float64)
        mine = list(range(r, n, W))
        mb = self.cfg.train.micro_batch_size
        was_training = self.model.training
        self.model.eval()
        for k in range(0, len(mine), mb):
            idx = mine[k : k + mb]
            batch = self._to_device(collate_pairs([examples[i] for i in idx], self.pad_id))
            logps = self._reference_logps(self.model, batch).double().cpu()
            out[idx, 0], out[idx, 1] = logps[: len(idx)], logps[len(idx) :]
        self.model.train(was_training)
        out = all_reduce_sum(out)
        for e, (c, rj) in zip(examples, out.tolist()):
            e["ref_chosen_logp"], e["ref_rejected_logp"] = c, rj

    def micro_batch_loss(self, model, batch):
        mask = batch["loss_mask"]
        logp = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], response_mask=mask)
        seq = sequence_logprob(logp, mask)  # (2B,) log pi(y | x)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            ref = self._reference_logps(model, batch)
        n = seq.shape[0] // 2
        d = self.cfg.dpo
        losses, chosen_r, rejected_r = dpo_loss(
            seq[:n], seq[n:], ref[:n], ref[n:], beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing
        )
        metrics = {
            "accuracy": float((chosen_r > rejected_r).float().mean()),
            "chosen_reward": float(chosen_r.mean()),
            "rejected_reward": float(rejected_r.mean()),
            "reward_margin": float((chosen_r - rejected_r).mean()),
            "logp_chosen": seq[:n].mean().item(),
            "logp_rejected": seq[n:].mean().item(),
        }
        return losses.mean(), metrics, float(n)
