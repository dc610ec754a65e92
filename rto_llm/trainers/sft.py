"""SFT: negative log-likelihood of response tokens only (prompt tokens carry no loss)."""

from __future__ import annotations

from rto_llm.data import collate_sft
from rto_llm.models import forward_logprobs, load_causal_lm
from rto_llm.trainers.base import Trainer
from rto_sim.core import aggregate_loss


class SFTTrainer(Trainer):
    stage = "sft"
    data_kind = "sft"
    model_kind = "causal_lm"

    def build_model(self):
        with self.trained_init():
            return load_causal_lm(self.cfg.model, trainable=True, tokenizer=self.tokenizer)

    def collate(self, examples):
        return collate_sft(examples, self.pad_id)

    def loss_units(self, examples):
        if self.cfg.sft.loss_agg == "token-mean":
            return float(sum(len(e["input_ids"]) - e["prompt_len"] for e in examples))
        return float(len(examples))

    def micro_batch_loss(self, model, batch):
        mask = batch["loss_mask"]  # (B, T) 1 on response tokens
        logp = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], response_mask=mask)
        loss = aggregate_loss(-logp, mask, self.cfg.sft.loss_agg)
        units = float(mask.sum()) if self.cfg.sft.loss_agg == "token-mean" else float(mask.shape[0])
        return loss, {}, units
