"""Evaluation inside the trainers: the ``eval`` config section.

Long because the evaluator is one loop (generate, score, gold, red flags, samples) whose helpers are used nowhere
else; splitting them off would make a reader jump between files to follow one evaluation.

**PPO / RTO** (:class:`PPOEvaluator`). Evaluation is on when ``eval.every > 0`` (then ``data.eval_path`` is
required) or when ``data.eval_path`` is set (then at least after the last rollout). It runs before the first
rollout (``eval.at_start``, logged at step 0), after every ``eval.every`` rollouts and after the last one, on
the first ``eval.max_prompts`` prompts of ``data.eval_path`` (split evenly over processes). The policy is
sampled with the rollout's pure sampler (``experience.generate``) at ``eval.temperature`` (default the rollout
temperature); log pi comes from the sampler (equal to a recomputed forward pass, docs/practice.md invariant 3),
log pi_ref and the RM score from one forward pass each (``experience.response_logits``, ``models.sequence_scores``).
Logged under ``eval/`` (one JSONL row at the rollout's step, TensorBoard, wandb):

  eval/rm_score, eval/rm_score_std          raw RM score of the policy's responses (mean, std)
  eval/rm_score_normalized                  mean of R as the run's reward sees it (normalized, clipped,
                                            missing-EOS penalty)
  eval/kl, eval/kl3                         mean over responses of sum_t k1_t (k3_t) = KL(pi || pi_ref) at T
  eval/response_length, _p95                response tokens through EOS (mean, 95th percentile)
  eval/eos_rate, eval/eos_first_frac        fraction with EOS; fraction whose first token is EOS
  eval/frac_at_max_length                   fraction at max_new_tokens without EOS
  eval/win_rate, eval/ref_rm_score          with ``eval.win_rate``: one reference response per prompt (sampled
                                            once, cached: the reference is frozen; re-sampled each time with a
                                            reference EMA); fraction of prompts where the policy's R is higher,
                                            ties count 1/2; the reference responses' mean raw RM score
  eval/gold, eval/gold_std, eval/gold_n     gold reward of the policy's responses (``eval.gold``): mean, std,
                                            number of responses with a gold value
  eval/gold_ref, eval/gold_win_rate_sampled gold of the reference responses; fraction of prompts where the
                                            policy's gold is higher (ties 1/2)
  eval/num_prompts, eval/time_s             prompts evaluated (all processes); seconds spent
  eval/flag_rm_up_gold_down, eval/flag_length_collapse, eval/red_flags   red flags of this evaluation (0/1, count)

With ``eval.gold=task:DIR`` (a token task written by ``rto_llm.token_task.export_task``) the exact evaluator
``rto_llm.exact_eval.evaluate_policy`` runs on the actor against the reference at beta = ``eval.gold_beta`` or
the run's current beta2 (the raw models, T = 1, conditioned on valid task responses) and adds
eval/gold_J, eval/gold_J_star, eval/gold_subopt, eval/gold_return (E_pi R), eval/gold_kl, eval/gold_win_rate
(Bradley-Terry against pi_ref), eval/valid_mass, eval/gold_beta and, for RTO with a DPO model,
eval/dpo_implicit_reward = E_pi beta1 log pi_dpo(y|x)/pi_ref(y|x) (sequence level, unclipped). The per-sample
gold (eval/gold) is then the task's R of each sampled response (invalid responses excluded;
eval/gold_valid_frac).

``eval.num_samples`` completions (prompt, response, RM score, R, gold, and the reference response) go to
``output_dir/samples.jsonl`` (one row per sample with its step) and to TensorBoard text ``eval/samples``.
Every evaluation is kept in ``trainer.eval_history`` (``{"step": n, **row}``; saved in checkpoints) for
programmatic use (E8 learning curves); :meth:`PPOEvaluator.evaluate` returns one row without logging.

**Training is unchanged by evaluation.** The evaluation saves the global RNG states (python, numpy, torch CPU
and CUDA), seeds them from ``eval.seed`` (and the process rank) for its own draws, and restores them
afterwards; the actor's train/eval mode is restored too; nothing else is touched. A run with evaluation has
bitwise the same training metrics and weights as one without (tested). Every evaluation reuses the same
random stream (common random numbers), so the difference between two evaluations comes from the policy.

**Red flags** (:class:`EvalRedFlags`; console warning, a 0/1 key in the row, counts in ``flag_counts``):

- *RM up, gold down*: over the last ``W = eval.flag_window`` evaluations that have both an RM score and a gold
  value, fit least-squares lines against the evaluation index; the fitted change over the window is
  ``d = slope * (W - 1)`` and its standard error ``se_d = mean(se) * (W - 1) / sqrt(sum_i (i - mean i)^2)``
  with ``se`` the per-evaluation standard errors of the means (std / sqrt(n); 0 for the exact task gold,
  which is eval/gold_return when present, else eval/gold; treating evaluations as independent is conservative,
  since common random numbers correlate successive ones positively). It fires when
  ``d_rm > thr_rm`` and ``d_gold < -thr_gold`` with ``thr = max(eval.flag_z * se_d, 0.01 * max |value in the
  window|, 1e-9)``.
- *Length collapse*: the mean length falls below ``eval.length_collapse_frac`` of the first evaluation's
  (when that was at least 2 tokens), or more than ``eval.eos_first_max`` of the responses are EOS at the
  first token while the first evaluation had at most that fraction.

**SFT / RM / DPO** (:func:`supervised_eval`): the stage's loss and metrics on ``data.eval_path`` (the trainer's
``evaluate``; DPO: eval/accuracy, eval/reward_margin, eval/chosen_reward, eval/rejected_reward) every
``eval.every`` optimizer steps, at step 0 with ``eval.at_start``, and after the last step.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rto_llm.config import ConfigError

log = logging.getLogger("rto_llm")

MIN_REL_CHANGE = 0.01     # red flag 'RM up, gold down': a trend must also exceed 1% of the window's largest |value|
_RANK_STRIDE = 7919       # eval seeds of different processes: seed + stride * rank
_REF_OFFSET = 1_000_003   # the reference's draws use their own stream (seed + offset)


class GoldRewardError(ConfigError):
    """The gold reward (``eval.gold``) cannot be loaded or returned something unusable."""


def eval_enabled(cfg) -> bool:
    """Evaluation is on when ``eval.every > 0`` or ``data.eval_path`` is set (never silently ignored)."""
    return cfg.eval.every > 0 or bool(cfg.data.eval_path)


def eval_due(every: int, n: int, total: int) -> bool:
    """An evaluation is due after step (rollout) ``n`` (1-based) of ``total``: every ``every`` and at the end."""
    return n >= 1 and (n == total or (every > 0 and n % every == 0))


# ---------------------------------------------------------------------------------------------------
# Gold rewards
# ---------------------------------------------------------------------------------------------------


@dataclass
class Gold:
    """A parsed ``eval.gold``: kind "none", "callable" (``fn``) or "task" (``task``, ``task_dir``)."""

    kind: str
    spec: str = ""
    fn: Callable | None = None
    task: Any = None
    task_dir: str = ""


def _import_callable_module(mod: str, spec: str):
    if mod.endswith(".py"):
        if not os.path.isfile(mod):
            raise GoldRewardError(f"eval.gold={spec!r}: no such file {mod!r}")
        name = "rto_gold_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(mod))
        s = importlib.util.spec_from_file_location(name, mod)
        m = importlib.util.module_from_spec(s)
        sys.modules[name] = m
        s.loader.exec_module(m)
        return m
    return importlib.import_module(mod)


def load_gold(spec: str) -> Gold:
    """Parse and load ``eval.gold``: '' (none), 'module:function', 'path/file.py:function' or 'task:DIR'.
    Raises :class:`GoldRewardError` naming the field when it cannot be imported, is not callable, or the
    task folder cannot be read."""
    if not spec:
        return Gold("none")
    if spec.startswith("task:"):
        from rto_llm.token_task import load_task

        d = spec[len("task:"):]
        if not d or not os.path.isfile(os.path.join(d, "task.json")):
            raise GoldRewardError(f"eval.gold={spec!r}: {d!r} is not a task folder (no task.json); write one with "
                                  "rto_llm.token_task.export_task(task, DIR)")
        try:
            task = load_task(d)
        except (ValueError, OSError, KeyError) as e:
            raise GoldRewardError(f"eval.gold={spec!r}: cannot load the task: {e}") from e
        return Gold("task", spec, task=task, task_dir=os.path.abspath(d))
    mod, sep, name = spec.rpartition(":")
    if not sep or not mod or not name:
        raise GoldRewardError(f"eval.gold={spec!r}: expected 'module:function', 'path/to/file.py:function' or "
                              "'task:DIR'")
    try:
        m = _import_callable_module(mod, spec)
    except GoldRewardError:
        raise
    except Exception as e:  # an import runs user code: any failure is reported with the field
        raise GoldRewardError(f"eval.gold={spec!r}: cannot import {mod!r} ({type(e).__name__}: {e}); give a module "
                              "on PYTHONPATH (module:function) or a file (path/to/file.py:function)") from e
    if not hasattr(m, name):
        raise GoldRewardError(f"eval.gold={spec!r}: module {mod!r} has no attribute {name!r}")
    fn = getattr(m, name)
    if not callable(fn):
        raise GoldRewardError(f"eval.gold={spec!r}: {name!r} is a {type(fn).__name__}, not a function; it must be "
                              "f(prompts: list[str], responses: list[str]) -> list[float]")
    return Gold("callable", spec, fn=fn)


def call_gold(gold: Gold, prompts: list[str], responses: list[str]) -> np.ndarray:
    """``gold.fn(prompts, responses)`` as a float64 array, checked: one finite float per response."""
    n = len(responses)
    try:
        out = gold.fn(list(prompts), list(responses))
    except Exception as e:
        raise GoldRewardError(f"eval.gold={gold.spec!r}: the gold function raised {type(e).__name__}: {e}") from e
    try:
        arr = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GoldRewardError(f"eval.gold={gold.spec!r}: returned {type(out).__name__}, not a list of floats") from e
    if arr.ndim != 1 or len(arr) != n:
        raise GoldRewardError(f"eval.gold={gold.spec!r}: returned {arr.size} value(s) of shape {arr.shape} for {n} "
                              "responses; it must return one float per response")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise GoldRewardError(f"eval.gold={gold.spec!r}: returned non-finite values ({arr[bad[0]]} at index "
                              f"{int(bad[0])}, {len(bad)} in all); every gold reward must be a finite float")
    return arr


# ---------------------------------------------------------------------------------------------------
# Evaluation prompts
# ---------------------------------------------------------------------------------------------------


@dataclass
class EvalPrompts:
    ids: list  # token ids per prompt (as the rollout prompts are built)
    texts: list  # the prompt text as written in the file (what a gold function receives)


def _prompt_text(d: dict, dcfg) -> str:
    v = d.get(dcfg.input_key)
    if isinstance(v, str):
        return v
    msgs = d.get(dcfg.messages_key)
    if hasattr(msgs, "tolist"):
        msgs = msgs.tolist()
    return "\n".join(str(m.get("content", "")) for m in msgs) if isinstance(msgs, list) else ""


def load_eval_prompts(dcfg, tokenizer, max_prompts: int) -> EvalPrompts:
    """The first ``max_prompts`` (0 = all) prompts of ``data.eval_path``, tokenized like the rollout prompts.
    A missing file or one that yields no prompt is a :class:`ConfigError` naming ``data.eval_path``."""
    from rto_llm.data import DataError, DataStats, build_prompt_examples, read_rows

    path = dcfg.eval_path
    stats = DataStats()
    try:
        rows = read_rows(path, dcfg.eval_split, dcfg.on_malformed, stats)
        ids, texts = [], []
        for row in rows:
            if max_prompts and len(ids) >= max_prompts:
                break
            exs, _ = build_prompt_examples([row], tokenizer, dcfg, stats)
            if exs:
                ids.append(exs[0]["prompt_ids"])
                texts.append(_prompt_text(row.data, dcfg))
    except DataError as e:
        raise ConfigError(f"data.eval_path={path!r}: {e}") from e
    if not ids:
        raise ConfigError(f"data.eval_path={path!r} yields no evaluation prompts ({stats.summary()}): give a file of "
                          "prompt rows ({\"prompt\": ...}), or set eval.every=0 and data.eval_path='' to train without "
                          "evaluation")
    if stats.malformed_skipped or stats.prompt_truncated:
        log.warning("eval prompts %s: %s", path, stats.summary())
    return EvalPrompts(ids, texts)


# ---------------------------------------------------------------------------------------------------
# Red flags
# ---------------------------------------------------------------------------------------------------


def fitted_change(values, ses) -> tuple[float, float]:
    """Least-squares change over the window (slope against the index times ``n - 1``) and its standard error
    from the mean per-point standard error (independent points)."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    sxx = float((t * t).sum())
    slope = float((t * (y - y.mean())).sum() / sxx)
    se = float(np.mean(ses)) * (n - 1) / math.sqrt(sxx)
    return slope * (n - 1), se


class EvalRedFlags:
    """Red flags over the evaluations of a run (rules in the module docstring). ``check`` takes an eval row
    and returns ``{flag name: message}`` for the flags that fire."""

    NAMES = ("rm_up_gold_down", "length_collapse")

    def __init__(self, window: int = 4, z: float = 2.0, length_frac: float = 0.5, eos_first_max: float = 0.5):
        self.window, self.z, self.length_frac, self.eos_first_max = window, z, length_frac, eos_first_max
        self.points: list[dict] = []   # per evaluation: rm, rm_se, gold, gold_se, length, eos_first (or None)

    @staticmethod
    def _point(row: dict) -> dict:
        def se(std_key, n_key):
            n = row.get(n_key, 0.0) or 0.0
            return row.get(std_key, 0.0) / math.sqrt(n) if n > 0 else 0.0

        p = {"rm": row.get("eval/rm_score"), "rm_se": se("eval/rm_score_std", "eval/num_prompts"),
             "length": row.get("eval/response_length"), "eos_first": row.get("eval/eos_first_frac"),
             "gold": None, "gold_se": 0.0}
        if "eval/gold_return" in row:            # exact task gold: no sampling noise
            p["gold"] = row["eval/gold_return"]
        elif "eval/gold" in row:
            p["gold"] = row["eval/gold"]
            p["gold_se"] = se("eval/gold_std", "eval/gold_n")
        return p

    def _threshold(self, vals, se_change) -> float:
        return max(self.z * se_change, MIN_REL_CHANGE * max(abs(v) for v in vals), 1e-9)

    def check(self, step: int, row: dict) -> dict[str, str]:
        self.points.append(self._point(row))
        flags: dict[str, str] = {}
        both = [p for p in self.points if p["rm"] is not None and p["gold"] is not None][-self.window:]
        if len(both) >= self.window:
            rm = [p["rm"] for p in both]
            gold = [p["gold"] for p in both]
            d_rm, se_rm = fitted_change(rm, [p["rm_se"] for p in both])
            d_gold, se_gold = fitted_change(gold, [p["gold_se"] for p in both])
            if d_rm > self._threshold(rm, se_rm) and d_gold < -self._threshold(gold, se_gold):
                flags["rm_up_gold_down"] = (
                    f"RM score up ({d_rm:+.4g} over the last {self.window} evals) while the gold reward fell "
                    f"({d_gold:+.4g}): the policy is exploiting the reward model; inspect samples.jsonl, raise "
                    "kl.beta2 or stop at an earlier checkpoint")
        first, cur = self.points[0], self.points[-1]
        msgs = []
        if first["length"] is not None and cur["length"] is not None and first["length"] >= 2.0 \
                and cur["length"] < self.length_frac * first["length"]:
            msgs.append(f"mean response length {cur['length']:.3g} fell below {self.length_frac:g} x the first "
                        f"evaluation's {first['length']:.3g}")
        if first["eos_first"] is not None and cur["eos_first"] is not None \
                and cur["eos_first"] > self.eos_first_max >= first["eos_first"]:
            msgs.append(f"{100 * cur['eos_first']:.0f}% of responses are EOS at the first token "
                        f"({100 * first['eos_first']:.0f}% at the first evaluation)")
        if msgs:
            flags["length_collapse"] = "length collapse: " + "; ".join(msgs) + \
                " (a reward that prefers short answers, or a missing-EOS penalty that is too strong)"
        for msg in flags.values():
            log.warning("eval at step %d: red flag: %s", step, msg)
        return flags

    def state_dict(self) -> dict:
        return {"points": [dict(p) for p in self.points]}

    def load_state_dict(self, state: dict) -> None:
        self.points = [dict(p) for p in state.get("points", [])]


# ---------------------------------------------------------------------------------------------------
# PPO / RTO
# ---------------------------------------------------------------------------------------------------


def save_global_rng() -> dict:
    """The global RNG states an evaluation may draw from: python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_global_rng(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for the evaluation's own draws (restored afterwards)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _InContext(torch.nn.Module):
    """A model whose forward runs inside ``context()`` (the reference of an adapter DPO model: adapter off),
    for callers that take a plain model (``exact_eval``)."""

    def __init__(self, base: torch.nn.Module, context):
        super().__init__()
        self.base, self._context = base, context

    @property
    def config(self):
        return self.base.config

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def forward(self, *args, **kw):
        with self._context():
            return self.base(*args, **kw)


def _all_rows(x: torch.Tensor, device) -> torch.Tensor:
    """(n_local, F) float64 rows of every process, concatenated in rank order (equal n_local)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    y = x.to(device)
    parts = [torch.zeros_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).cpu()


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class _Sampled:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_width: int
    raw_scores: torch.Tensor
    scores: torch.Tensor
    texts: list = field(default_factory=list)   # decoded responses
    gold: np.ndarray | None = None


class PPOEvaluator:
    """Evaluation of a PPO / RTO run (module docstring). Built from the config and tokenizer before the models
    load (bad eval prompts or gold stop the run early); :meth:`evaluate` needs the trainer."""

    COLS = ("length", "has_eos", "eos_first", "at_max", "raw", "score", "k1", "k3", "ref_raw", "ref_score",
            "win", "gold", "gold_ref", "gold_win")

    def __init__(self, cfg, tokenizer, info):
        self.cfg, self.ecfg, self.tokenizer, self.info = cfg, cfg.eval, tokenizer, info
        self.enabled = eval_enabled(cfg)
        self.history: list[dict] = []
        self.flags = EvalRedFlags(cfg.eval.flag_window, cfg.eval.flag_z, cfg.eval.length_collapse_frac,
                                  cfg.eval.eos_first_max)
        self.flag_counts = {name: 0 for name in EvalRedFlags.NAMES}
        self.gold = Gold("none")
        self._ref: _Sampled | None = None
        if self.enabled:
            rng = save_global_rng()   # a gold module may draw random numbers at import: keep the run's stream
            try:
                self._setup(cfg, tokenizer, info)
            finally:
                restore_global_rng(rng)

    def _setup(self, cfg, tokenizer, info) -> None:
        self.gold = load_gold(cfg.eval.gold)
        if self.gold.kind == "task":
            self._check_task_tokenizer()
            t = cfg.eval.temperature or cfg.rollout.temperature
            if t != 1.0:
                log.warning("eval.gold=task: the exact evaluation scores the raw models (T = 1); the sampled "
                            "evaluation and the rollouts use T = %g", t)
        prompts = load_eval_prompts(cfg.data, tokenizer, cfg.eval.max_prompts)
        W, r = info.world_size, info.rank
        n = len(prompts.ids) // W * W
        if n == 0:
            raise ConfigError(f"data.eval_path={cfg.data.eval_path!r} has {len(prompts.ids)} prompt(s), fewer than the "
                              f"{W} processes: give at least {W}")
        if n < len(prompts.ids):
            log.info("eval: %d of %d prompts used (a multiple of the %d processes)", n, len(prompts.ids), W)
        k = n // W
        self.prompt_ids = prompts.ids[r * k : (r + 1) * k]
        self.prompt_texts = prompts.texts[r * k : (r + 1) * k]
        self.n_prompts = n
        self.temperature = cfg.eval.temperature or cfg.rollout.temperature
        bs = cfg.eval.batch_size
        self.ropts = dataclasses.replace(cfg.rollout, temperature=self.temperature,
                                         generation_batch_size=bs or cfg.rollout.generation_batch_size)
        self.forward_batch_size = bs or cfg.rollout.forward_batch_size
        self._task_prompt = {}
        if self.gold.kind == "task":
            from rto_llm.token_task import prompt_token_ids

            self._task_prompt = {tuple(p): i for i, p in enumerate(prompt_token_ids(tokenizer, self.gold.task))}

    def _check_task_tokenizer(self) -> None:
        from rto_llm.token_task import check_task_tokenizer

        try:
            check_task_tokenizer(self.tokenizer, self.gold.task, what="the policy's tokenizer (model.path)")
        except ValueError as e:
            raise GoldRewardError(f"eval.gold={self.gold.spec!r}: {e}") from e

    # ---- state (checkpoints) ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "flags": self.flags.state_dict(),
                "flag_counts": dict(self.flag_counts)}

    def load_state_dict(self, state: dict) -> None:
        self.history[:] = [dict(h) for h in state.get("history", [])]   # in place: trainer.eval_history aliases it
        self.flags.load_state_dict(state.get("flags", {}))
        self.flag_counts.update(state.get("flag_counts", {}))

    # ---- the hook -----------------------------------------------------------------------------------
    def maybe_run(self, trainer, n: int, logger) -> dict | None:
        """After rollout ``n`` (0 = before the first): evaluate, log and return the row when one is due."""
        if not self.enabled:
            return None
        due = (n == 0 and self.ecfg.at_start) or eval_due(self.ecfg.every, n, trainer.total_rollouts)
        if not due or (self.history and self.history[-1]["step"] == n):
            return None
        return self.run(trainer, n, logger)

    def run(self, trainer, n: int, logger=None) -> dict:
        """Evaluate, check the red flags, log (metrics, samples) and keep the row in ``history``."""
        row, samples = self.evaluate(trainer, n)
        fired = self.flags.check(n, row)
        for name in EvalRedFlags.NAMES:
            row[f"eval/flag_{name}"] = float(name in fired)
            self.flag_counts[name] += int(name in fired)
        row["eval/red_flags"] = float(len(fired))
        self.history.append({"step": n, **row})
        if logger is not None:
            logger.log(n, row, force=True)
            self._log_samples(n, samples, logger)
        log.info("eval at step %d: %s", n, _summary(row))
        return row

    # ---- one evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer, n: int) -> tuple[dict, list[dict]]:
        """One evaluation of ``trainer``'s actor (no logging): ``(row, samples)``. Global RNG states and the
        actor's mode are restored afterwards."""
        from rto_llm.ppo.roles import frozen_on_device

        t0 = time.perf_counter()
        roles, cfg, dev = trainer.roles, self.cfg, self.info.device
        actor = roles.actor
        was_training = actor.training
        rng = save_global_rng()
        try:
            actor.eval()
            with frozen_on_device(roles, cfg, dev):
                pol, lp = self._sample_policy(trainer)
                ref = self._reference(trainer) if self.ecfg.win_rate else None
                exact = self._exact(trainer) if self.gold.kind == "task" else None
        finally:
            restore_global_rng(rng)
            actor.train(was_training)
        row = self._metrics(pol, lp, ref)
        if exact is not None:
            row.update(exact)
        row["eval/time_s"] = time.perf_counter() - t0
        return row, self._samples(n, pol, ref)

    def _seed(self, offset: int) -> None:
        seed_global_rng(self.ecfg.seed + offset + _RANK_STRIDE * self.info.rank)

    def _generate(self, model, context=None):
        from contextlib import nullcontext

        from rto_llm.ppo.experience import generate

        with (context or nullcontext)():
            buf = generate(model, self.prompt_ids, self.ropts, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        dev = self.info.device
        return tuple(x.to(dev) if torch.is_tensor(x) else x for x in buf)

    def _finish(self, trainer, seq, am, action_mask, has_eos, P, raw) -> _Sampled:
        from rto_llm.ppo.experience import sequence_score

        scores = sequence_score(raw, has_eos, self.cfg.reward, trainer.rm_mean, trainer.rm_std)
        texts = [_decode(self.tokenizer, r[m].tolist()) for r, m in zip(seq[:, P:].cpu(), action_mask.cpu())]
        s = _Sampled(seq, am, action_mask, has_eos, P, raw.float(), scores.float(), texts)
        s.gold = self._gold(s)
        return s

    def _sample_policy(self, trainer) -> tuple[_Sampled, dict]:
        """The policy's responses, their RM scores and the log-probs of pi (recorded by the sampler, at T: equal
        to a recomputed forward pass, docs/practice.md invariant 3) and of pi_ref (one forward pass, at T)."""
        roles = trainer.roles
        self._seed(0)
        gather = trainer.cfg.rollout.zero3_gather     # ZeRO-3: gather the actor once per generation, as in rollouts
        seq, am, action_mask, has_eos, sample_lp, P = self._generate(
            roles.actor, lambda: trainer.actor_engine.generation_context(gather))
        ref_lp = self._reference_logprobs(roles, seq, am, action_mask, P)
        pol = self._finish(trainer, seq, am, action_mask, has_eos, P, self._rm_scores(roles, seq, am))
        return pol, {"logprobs": sample_lp, "ref_logprobs": ref_lp}

    def _reference_logprobs(self, roles, seq, am, action_mask, P) -> torch.Tensor:
        from rto_llm.ppo.experience import response_logits
        from rto_sim.core import gather_logprobs

        out = torch.zeros(action_mask.shape, device=seq.device)
        bs = self.forward_batch_size
        with roles.reference_context():
            for i in range(0, seq.shape[0], bs):
                s, a, m = seq[i : i + bs], am[i : i + bs], action_mask[i : i + bs]
                logits = response_logits(roles.reference, s, a, P)
                out[i : i + bs] = gather_logprobs(logits, s[:, P:], self.temperature) * m.float()
        return out

    def _rm_scores(self, roles, seq, am) -> torch.Tensor:
        from rto_llm.models import sequence_scores

        bs = self.forward_batch_size
        return torch.cat([sequence_scores(roles.reward_model, seq[i : i + bs], am[i : i + bs]).float()
                          for i in range(0, seq.shape[0], bs)])

    def _reference(self, trainer) -> _Sampled:
        """One reference response per prompt with its RM score and gold (cached unless the reference moves)."""
        if self._ref is not None and self.cfg.kl.ref_ema_decay == 0:
            return self._ref
        roles = trainer.roles
        self._seed(_REF_OFFSET)
        seq, am, action_mask, has_eos, _, P = self._generate(roles.reference, roles.reference_context)
        self._ref = self._finish(trainer, seq, am, action_mask, has_eos, P, self._rm_scores(roles, seq, am))
        return self._ref

    def _gold(self, s: _Sampled) -> np.ndarray | None:
        if self.gold.kind == "callable":
            return call_gold(self.gold, self.prompt_texts, s.texts)
        if self.gold.kind == "task":
            from rto_llm.token_task import token_ids_to_actions

            task = self.gold.task
            out = np.full(len(s.texts), np.nan)
            for i, (p, r, m) in enumerate(zip(self.prompt_ids, s.sequences[:, s.prompt_width:].cpu(),
                                              s.action_mask.cpu())):
                x = self._task_prompt.get(tuple(p))
                acts = token_ids_to_actions(r[m].tolist(), task) if x is not None else None
                if acts is not None:
                    out[i] = task.gold_return(x, acts)
            return out
        return None

    def _exact(self, trainer) -> dict[str, float]:
        from rto_llm.exact_eval import evaluate_policy

        roles, cfg = trainer.roles, self.cfg
        beta = self.ecfg.gold_beta or trainer.kl_ctl.value
        if not beta > 0:
            raise GoldRewardError(f"eval.gold={self.gold.spec!r}: the exact evaluation needs a KL coefficient > 0; the "
                                  "run's beta2 is 0: set eval.gold_beta")
        reference = _InContext(roles.reference, roles.reference_context).eval() if roles.dpo_adapter \
            else roles.reference
        dpo = None
        if cfg.rto.uses_dpo:
            dpo = roles.reference if roles.dpo_adapter else roles.dpo_model   # adapter on = pi_dpo
        try:
            res = evaluate_policy(roles.actor, reference, self.gold.task, beta, tokenizer=self.tokenizer,
                                  dpo_model=dpo, beta_dpo=cfg.rto.beta1 if dpo is not None else None,
                                  seed=self.ecfg.seed, batch_size=max(self.forward_batch_size, 64))
        except ValueError as e:
            raise GoldRewardError(f"eval.gold={self.gold.spec!r}: {e}") from e
        row = {"eval/gold_J": res.J, "eval/gold_J_star": res.J_star, "eval/gold_subopt": res.sub_opt,
               "eval/gold_return": res.expected_return, "eval/gold_kl": res.kl, "eval/gold_win_rate": res.win_rate,
               "eval/valid_mass": res.valid_mass, "eval/gold_beta": float(beta)}
        if res.dpo_reward is not None:
            row["eval/dpo_implicit_reward"] = res.dpo_reward
        return row

    # ---- statistics ---------------------------------------------------------------------------------
    def _metrics(self, pol: _Sampled, out: dict, ref: _Sampled | None) -> dict[str, float]:
        from rto_sim.core import kl_penalty, masked_sum

        m = pol.action_mask
        lengths = m.float().sum(-1)
        k1 = masked_sum(kl_penalty(out["logprobs"], out["ref_logprobs"], "k1", mask=m), m, dim=-1)
        k3 = masked_sum(kl_penalty(out["logprobs"], out["ref_logprobs"], "k3", mask=m), m, dim=-1)
        first = pol.sequences[:, pol.prompt_width]
        B = m.shape[0]
        nan = torch.full((B,), float("nan"), dtype=torch.float64)
        cols = {
            "length": lengths, "has_eos": pol.has_eos.float(),
            "eos_first": (first == self.tokenizer.eos_token_id).float(),
            "at_max": ((lengths >= self.ropts.max_new_tokens) & ~pol.has_eos).float(),
            "raw": pol.raw_scores, "score": pol.scores, "k1": k1, "k3": k3,
            "ref_raw": nan, "ref_score": nan, "win": nan, "gold": nan, "gold_ref": nan, "gold_win": nan,
        }
        if ref is not None:
            cols["ref_raw"], cols["ref_score"] = ref.raw_scores, ref.scores
            cols["win"] = (pol.scores > ref.scores).double() + 0.5 * (pol.scores == ref.scores).double()
        if pol.gold is not None:
            cols["gold"] = torch.as_tensor(pol.gold)
            if ref is not None and ref.gold is not None:
                g, gr = torch.as_tensor(pol.gold), torch.as_tensor(ref.gold)
                cols["gold_ref"] = gr
                beats = (g > gr).double() + 0.5 * (g == gr).double()
                cols["gold_win"] = torch.where(g.isnan() | gr.isnan(), nan, beats)
        t = torch.stack([cols[c].detach().double().cpu() for c in self.COLS], 1)   # (B, F)
        t = _all_rows(t, self.info.device)
        c = {name: t[:, i] for i, name in enumerate(self.COLS)}
        row = {
            "eval/num_prompts": float(t.shape[0]),
            "eval/rm_score": _mean(c["raw"]), "eval/rm_score_std": _std(c["raw"]),
            "eval/rm_score_normalized": _mean(c["score"]),
            "eval/kl": _mean(c["k1"]), "eval/kl3": _mean(c["k3"]),
            "eval/response_length": _mean(c["length"]),
            "eval/response_length_p95": float(torch.quantile(c["length"], 0.95)),
            "eval/eos_rate": _mean(c["has_eos"]), "eval/eos_first_frac": _mean(c["eos_first"]),
            "eval/frac_at_max_length": _mean(c["at_max"]),
        }
        if ref is not None:
            row.update({"eval/win_rate": _mean(c["win"]), "eval/ref_rm_score": _mean(c["ref_raw"])})
        if pol.gold is not None:
            g = c["gold"][~c["gold"].isnan()]
            if len(g):
                row.update({"eval/gold": _mean(g), "eval/gold_std": _std(g), "eval/gold_n": float(len(g))})
            if self.gold.kind == "task":
                row["eval/gold_valid_frac"] = len(g) / t.shape[0]
            if ref is not None:
                gr, gw = c["gold_ref"][~c["gold_ref"].isnan()], c["gold_win"][~c["gold_win"].isnan()]
                if len(gr):
                    row["eval/gold_ref"] = _mean(gr)
                if len(gw):
                    row["eval/gold_win_rate_sampled"] = _mean(gw)
        return row

    # ---- samples --------------------------------------------------------------------------------------
    def _samples(self, n: int, pol: _Sampled, ref: _Sampled | None) -> list[dict]:
        k = min(self.ecfg.num_samples, len(self.prompt_ids))
        out = []
        for i in range(k):
            s = {"step": n, "stage": "rto" if self.cfg.rto.uses_dpo else "ppo", "sample": i,
                 "prompt": self.prompt_texts[i], "response": pol.texts[i],
                 "rm_score": float(pol.raw_scores[i]), "score_normalized": float(pol.scores[i]),
                 "length": int(pol.action_mask[i].sum()), "has_eos": bool(pol.has_eos[i]),
                 "gold": _gold_value(pol.gold, i)}
            if ref is not None:
                s.update({"ref_response": ref.texts[i], "ref_rm_score": float(ref.raw_scores[i]),
                          "ref_gold": _gold_value(ref.gold, i)})
            out.append(s)
        return out

    def _log_samples(self, n: int, samples: list[dict], logger) -> None:
        if not self.info.is_main or not samples:
            return
        path = os.path.join(self.cfg.train.output_dir, "samples.jsonl")
        with open(path, "a") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        tb = getattr(logger, "tb", None)
        if tb is not None:
            tb.add_text("eval/samples", samples_markdown(samples), n)


def _gold_value(g, i):
    if g is None or not math.isfinite(float(g[i])):
        return None
    return float(g[i])


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _std(x: torch.Tensor) -> float:
    return float(x.double().std(unbiased=False)) if x.numel() > 1 else 0.0


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def samples_markdown(samples: list[dict]) -> str:
    """A markdown table of sample completions (TensorBoard text)."""
    lines = ["| prompt | response | RM score | gold |", "|---|---|---|---|"]
    for s in samples:
        gold = "" if s.get("gold") is None else f"{s['gold']:.4g}"
        lines.append(f"| {_md(s['prompt'])} | {_md(s['response'])} | {s['rm_score']:.4g} | {gold} |")
    return "\n".join(lines)


def _summary(row: dict) -> str:
    keys = (("rm", "eval/rm_score"), ("kl", "eval/kl"), ("len", "eval/response_length"), ("eos", "eval/eos_rate"),
            ("win", "eval/win_rate"), ("gold", "eval/gold"), ("J", "eval/gold_J"), ("subopt", "eval/gold_subopt"),
            ("loss", "eval/loss"), ("acc", "eval/accuracy"))
    return " ".join(f"{name} {row[k]:.4g}" for name, k in keys if k in row)


# ---------------------------------------------------------------------------------------------------
# SFT / RM / DPO
# ---------------------------------------------------------------------------------------------------


def supervised_eval(trainer, n: int, logger) -> dict | None:
    """After optimizer step ``n`` (0 = before the first) of an SFT / RM / DPO trainer: when an evaluation is
    due, run ``trainer.evaluate()`` on ``data.eval_path``, log it at step ``n`` and keep it in
    ``trainer.eval_history``."""
    ev = trainer.cfg.eval
    if not trainer.eval_examples:
        return None
    due = (n == 0 and ev.at_start) or eval_due(ev.every, n, trainer.total_steps)
    if not due:
        return None
    t0 = time.perf_counter()
    row = trainer.evaluate()
    row["eval/time_s"] = time.perf_counter() - t0
    trainer.eval_history.append({"step": n, **row})
    logger.log(n, row, force=True)
    log.info("eval at step %d: %s", n, _summary(row))
    return row


__all__ = ["EvalPrompts", "EvalRedFlags", "Gold", "GoldRewardError", "PPOEvaluator", "call_gold", "eval_due",
           "eval_enabled", "fitted_change", "load_eval_prompts", "load_gold", "samples_markdown", "supervised_eval"]
