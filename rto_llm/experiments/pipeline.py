"""The token-task pipeline shared by experiment E8 and the quickstart: export -> sft -> preference pairs sampled
from the SFT model -> rm and dpo on the same pairs -> ppo / rto arms, every stage run in-process through the
stage registry of ``rto_llm.cli`` (the code ``rto-llm <stage>`` runs), and exact diagnostics of the proxies.

    run_stage(stage, overrides, config=None)   one stage in-process -> (trainer, per-step history)
    stage_overrides(task)                      the settings every stage needs on a token task
    ppo_arm_overrides(arm, ...)                the reward settings of a PPO / RTO arm (ARMS)
    proxy_diagnostics(task, sft, rm, dpo, ...) exact correlations of the RM score and the DPO implicit reward
                                               with the gold return over every response (pi_ref-weighted)
    quiet()                                    INFO logs and progress bars of the stages off

Numbers: an evaluation of a stage's model against the gold reward is always exact (``rto_llm.exact_eval``).
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

# arm -> (stage, reward settings). "rto"-like arms take the DPO coefficients from the caller (beta1, clip,
# beta3); the paper arm takes the paper's (RTO section 5: beta1 0.05, clip 0.05, beta3 1, DPO beta 0.1).
ARMS = {
    "ppo": ("ppo", {"rto.mode": "ppo"}),
    "rto": ("rto", {"rto.mode": "rto"}),
    "rto_paper": ("rto", {"rto.mode": "rto"}),
    "semi_rto": ("rto", {"rto.mode": "semi_rto"}),
    "ddpo": ("rto", {"rto.mode": "ddpo"}),
    "rs_ppo": ("rto", {"rto.mode": "rs_ppo"}),
    "reinforce_pp": ("ppo", {"rto.mode": "ppo", "ppo.advantage_estimator": "reinforce++"}),
    "rto_reinforce_pp": ("rto", {"rto.mode": "rto", "ppo.advantage_estimator": "reinforce++"}),
}
DPO_ARMS = tuple(a for a, (stage, _) in ARMS.items() if stage == "rto")


@contextlib.contextmanager
def quiet(level: int = logging.WARNING):
    """Stage logs at ``level`` (default WARNING) and no transformers progress bars / load reports in the block."""
    lg = logging.getLogger("rto_llm")
    old = lg.level
    lg.setLevel(level)
    try:
        from transformers.utils import logging as hf_logging

        hf_old = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        hf_logging = None
    try:
        yield
    finally:
        lg.setLevel(old)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_old)
            hf_logging.enable_progress_bar()


def run_stage(stage: str, overrides: list[str], config: str | None = None, hook=None):
    """Run one stage in-process exactly as ``rto-llm <stage> [--config config] overrides`` does (config load,
    cross-section validators, the stage's trainer) and return ``(trainer, history)``. ``hook(trainer)`` runs
    after the trainer is built and before it trains (e.g. to extend its evaluation)."""
    from rto_llm.cli import STAGES, VALIDATORS, trainer_class
    from rto_llm.config import load_config

    cfg = load_config(STAGES[stage][0], config, list(overrides))
    if stage in VALIDATORS:
        VALIDATORS[stage](cfg)
    trainer = trainer_class(stage)(cfg)
    if hook is not None:
        hook(trainer)
    history = trainer.train()
    return trainer, history


def stage_overrides(task) -> list[str]:
    """Settings every stage needs on a token task (no chat template, lengths that fit), CPU, quiet logs."""
    from rto_llm.token_task import data_settings

    d = data_settings(task)
    return [f"data.apply_chat_template={str(d['apply_chat_template']).lower()}",
            f"data.max_prompt_len={d['max_prompt_len']}", f"data.max_len={d['max_len']}", "train.device=cpu",
            "log.progress_bar=false", "log.tensorboard=false", "checkpoint.overwrite=true"]


def ppo_arm_overrides(arm: str, dpo_path: str, beta1: float, clip: float, beta3: float,
                      paper: tuple[float, float, float] = (0.05, 0.05, 1.0), delimiter: str = "a0",
                      rs_ppo_beta3: float | None = None) -> tuple[str, list]:
    """``(stage, overrides)`` of an arm of `ARMS`: the sparse arms (ppo, reinforce_pp) load no DPO model; the
    paper arm uses ``paper`` = (beta1, clip, beta3); every other DPO arm ``beta1``, ``clip``, ``beta3``, except that
    RS-PPO takes ``rs_ppo_beta3`` when given (its sequence total is beta3 R: beta3 = PPO's makes its objective
    exactly PPO's). Semi-RTO ends a segment at the task token ``delimiter``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    stage, base = ARMS[arm]
    over = [f"{k}={v}" for k, v in base.items()]
    if stage == "rto":
        b1, c, b3 = paper if arm == "rto_paper" else (beta1, clip, beta3)
        if arm == "rs_ppo" and rs_ppo_beta3 is not None:
            b3 = rs_ppo_beta3
        over += [f"rto.dpo_path={dpo_path}", f"rto.beta1={b1}", f"rto.dpo_clip={c}", f"reward.beta3={b3}"]
        if arm == "semi_rto":
            over.append(f"rto.delimiters={delimiter}")
    return stage, over


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    w = w / w.sum()
    mx, my = w @ x, w @ y
    vx, vy = w @ (x - mx) ** 2, w @ (y - my) ** 2
    return float(w @ ((x - mx) * (y - my)) / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else float("nan")


def rm_scores_of_responses(rm, task, tokenizer, prompts, actions, length, batch_size: int = 512) -> np.ndarray:
    """Raw RM scores of enumerated responses, scored as the PPO stage scores a rollout: prompt + response
    tokens (EOS included when the response has it; an H-token response has none), read at the last real token."""
    import torch

    from rto_llm.models import sequence_scores
    from rto_llm.token_task import action_token_ids, model_device, prompt_token_ids

    pids = prompt_token_ids(tokenizer, task)
    act = action_token_ids(task)
    seqs = [pids[int(p)] + act[a[:n]].tolist() for p, a, n in zip(prompts, actions, length)]
    dev = model_device(rm)
    out = np.zeros(len(seqs))
    rm.eval()
    with torch.no_grad():
        for k in range(0, len(seqs), batch_size):
            chunk = seqs[k : k + batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)
            am = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                am[i, : len(s)] = 1
            out[k : k + batch_size] = sequence_scores(rm, ids.to(dev), am.to(dev)).float().cpu().numpy()
    return out


def proxy_diagnostics(task, sft_dir: str, rm_dir: str | None, dpo_dir: str | None, beta_dpo: float,
                      beta: float) -> dict[str, float]:
    """Exact facts about the SFT model and the two proxies learned from the preference pairs:

    sft_kl_task          KL(pi_ref of the task || SFT restricted to the task tokens), sequence level, rho-weighted
    sft_valid_mass       SFT mass on valid task responses
    subopt0, J_star, optimal_kl   SubOpt of the SFT policy, J*_beta and KL(pi*_beta || SFT) at ``beta``
    rm_gold_corr         corr(r_RM(y), R(y)) over the responses of a prompt, weights pi_ref(y|x) (the SFT model
                         conditioned on valid responses), rho-averaged
    dpo_gold_corr        the same for the DPO implicit reward beta_dpo log pi_dpo(y|x)/pi_ref(y|x)
    dpo_subopt, dpo_kl   the DPO model as a policy: SubOpt and KL(pi_dpo || pi_ref) at ``beta``"""
    from scipy.special import logsumexp
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rto_llm.exact_eval import enumerated_logprobs, evaluate_policy
    from rto_llm.token_task import load_model_and_tokenizer

    sft, tok = load_model_and_tokenizer(sft_dir, None, task, "sft")
    e = task.enumerate()
    P, K = task.n_prompts, task.num_responses
    raw, res = enumerated_logprobs(sft, task, tok, e.prompt, e.actions, e.length)
    lq = raw.reshape(P, K)
    lq = lq - logsumexp(lq, axis=1, keepdims=True)          # conditioned on valid responses
    q = np.exp(lq)
    R = e.returns.reshape(P, K)
    lt = e.log_pi_ref.reshape(P, K)
    out = {"sft_kl_task": float(task.rho @ (np.exp(lt) * (lt - res.reshape(P, K))).sum(axis=1)),
           "sft_valid_mass": float(task.rho @ np.exp(logsumexp(raw.reshape(P, K), axis=1)))}
    ev = evaluate_policy(sft, sft, task, beta, tokenizer=tok, cache=False)
    out.update({"subopt0": ev.sub_opt, "J_star": ev.J_star, "optimal_kl": ev.optimal_kl,
                "sft_expected_return": ev.expected_return})
    if rm_dir is not None:
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, local_files_only=True)
        s = rm_scores_of_responses(rm, task, tok, e.prompt, e.actions, e.length).reshape(P, K)
        out["rm_gold_corr"] = float(task.rho @ np.array([_weighted_corr(s[i], R[i], q[i]) for i in range(P)]))
    if dpo_dir is not None:
        dpo = AutoModelForCausalLM.from_pretrained(dpo_dir, local_files_only=True)
        ld, _ = enumerated_logprobs(dpo, task, tok, e.prompt, e.actions, e.length)
        d = beta_dpo * (ld - raw).reshape(P, K)
        out["dpo_gold_corr"] = float(task.rho @ np.array([_weighted_corr(d[i], R[i], q[i]) for i in range(P)]))
        evd = evaluate_policy(dpo, sft, task, beta, tokenizer=tok, cache=False)
        out.update({"dpo_subopt": evd.sub_opt, "dpo_kl": evd.kl})
    return out


def cleanup_run_dir(path: str, keep=("metrics.jsonl", "config.yaml")) -> None:
    """Delete a finished stage's checkpoints and exports, keeping its logs (the numbers live in the results)."""
    import shutil

    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        if name in keep:
            continue
        p = os.path.join(path, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


__all__ = ["ARMS", "DPO_ARMS", "cleanup_run_dir", "ppo_arm_overrides", "proxy_diagnostics", "quiet",
           "rm_scores_of_responses", "run_stage", "stage_overrides"]
