"""Reward model: pairwise Bradley-Terry loss on scores read at the last real token of each response.

After training, the mean and std of the scores over the training set (chosen and rejected responses)
are stored in the exported model's config (``rto_reward_mean`` / ``rto_reward_std``) and in
``rto_reward_stats.json`` next to it (the only place for a LoRA adapter export), so the PPO / RTO stage can
normalize the score before it enters the reward.
"""

from __future__ import annotations

import logging

import torch

from rto_llm.data import collate_pairs
from rto_llm.distributed import all_reduce_sum
from rto_llm.models import REWARD_STATS_FILE, load_scalar_model, reward_stats_file, sequence_scores, set_reward_stats
from rto_llm.trainers.base import Trainer
from rto_sim.core import bradley_terry_loss

log = logging.getLogger("rto_llm")


class RMTrainer(Trainer):
    stage = "rm"
    data_kind = "preference"

    def build_model(self):
        with self.trained_init():
            return load_scalar_model(self.cfg.model, trainable=True, head_init_std=self.cfg.rm.head_init_std,
                                     tokenizer=self.tokenizer)

    def collate(self, examples):
        return collate_pairs(examples, self.pad_id)

    def micro_batch_loss(self, model, batch):
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        n = scores.shape[0] // 2
        chosen, rejected = scores[:n], scores[n:]
        margin = batch["margin"] if self.cfg.data.margin_key else None
        loss = bradley_terry_loss(chosen, rejected, margin).mean()
        metrics = {
            "accuracy": float((chosen > rejected).float().mean()),
            "chosen_score": chosen.mean().item(),
            "rejected_score": rejected.mean().item(),
            "reward_margin": (chosen - rejected).mean().item(),
        }
        return loss, metrics, float(n)

    @staticmethod
    def _scores(model, batch):
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def reward_statistics(self) -> tuple[float, float]:
        """Mean and std of the scores of all training responses (chosen and rejected)."""
        model = self.engine.module
        model.eval()
        exs = self.train_examples[self.info.rank :: self.info.world_size]
        acc = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
        mb = self.cfg.train.micro_batch_size
        for k in range(0, len(exs), mb):
            batch = self._to_device(self.collate(exs[k : k + mb]))
            s = self.engine.run(self._scores, batch).double().cpu()
            acc += torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64), s.sum(), (s * s).sum()])
        model.train()
        n, total, sq = all_reduce_sum(acc).tolist()
        mean = total / n
        std = max(sq / n - mean * mean, 0.0) ** 0.5
        return mean, std

    def prepare_export(self):
        """Intermediate exports (checkpoint.save_hf_every) carry the current score mean/std too."""
        self.finish()

    def finish(self):
        mean, std = self.reward_statistics()
        set_reward_stats(self.engine.module, mean, std)
        self._stats = (mean, std)
        log.info("reward statistics over the training set: mean %.4f std %.4f", mean, std)

    def export_extras(self) -> dict[str, str]:
        """The score mean/std as ``rto_reward_stats.json`` next to the export: a LoRA export is an adapter
        without a ``config.json`` of its own, so this file is where the PPO / RTO stage finds them."""
        stats = getattr(self, "_stats", None)
        return {REWARD_STATS_FILE: reward_stats_file(*stats)} if stats is not None else {}
