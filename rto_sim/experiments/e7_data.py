"""E7, data efficiency (paper Fig. 4c) and exact planning (S12): one sweep cell per seed.

Instance: the last-token automaton (A tokens, the last one EOS, horizon H, P prompts) with a true reward of class
`reward_class` (bigram) scaled to E_x Var_pi_ref R* = return_var, and its prefix tree (`learners.lift_to_tree`:
same pi_ref, one state per prefix: the LLM picture). N Bradley-Terry pairs from pi_ref; a data size n uses the
first n pairs (nested subsets).

Learners, each fitted at every data size with its ridge chosen by held-out Bradley-Terry likelihood (every
`val_every`-th pair of the subset is held out; the ridge with the best mean held-out log-likelihood is refitted on
the whole subset; the chosen ridges are rows of the table):

    RM   "bandit"      one value per complete response (the unstructured sentence RM; `fit_bandit_mle` on the tree)
         "token_mle"   linear token reward on the true class (structured; `fit_token_mle` on the automaton)
    DPO  "tree"        tabular DPO over prefixes (`fit_tabular_dpo` on the tree): the LLM-like DPO model, which
                       carries the same information as the bandit RM up to shaping (docs/theory.md section 3)
         "automaton"   DPO over the automaton's policy class (one logit per (position, last token, token), i.e. a
                       log-linear policy with those indicator features; `fit_tabular_dpo` on the automaton): a
                       structured DPO model that generalizes across prefixes

Held-out likelihood: RM sigmoid(R_hat(y_w) - R_hat(y_l)); DPO sigmoid(beta_dpo (log pi/pi_ref(y_w) - log
pi/pi_ref(y_l))), the DPO model's own Bradley-Terry law. DPO ridges are on the logits (reward units: ridge /
beta_dpo^2), so the DPO grid is the RM grid times beta_dpo^2 by default.

Arms (all planned and trained on the tree; J is the TRUE objective J_beta2(pi; r*), normalized J_norm = (J -
J(pi_ref)) / (J(pi*_beta2) - J(pi_ref))):

    converged   exact planning (`soft_bellman` at beta2) on the arm's reward table: PPO = beta3 r_RM; RTO =
                `rto_reward_table(r_RM, pi_dpo, beta1, beta3)`, for every (beta3, beta1/beta_dpo) of the sweep,
                every RM and DPO class: the target each arm converges to with unlimited RL
    ppo         PPO at a fixed RL budget (tabular actor and critic on the tree, GAE) for the arms `ppo_arms`
                ("ppo:<rm>" or "rto:<rm>:<dpo>"): final J_norm = mean of the last `last_k` evaluations

Also per seed (the first `s12_seeds`): S12 exact planning with the full-data fits (Markov spread, optimum and
pairwise log-policy differences of every reward mode on the tree; spreads on the automaton with the exact DPO
policy) and the beta1 = 0 identity through the trainer (RTO with beta1 = 0 vs PPO: bit-identical curves).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.special import log_expit

from ..exact import evaluate, rto_reward_table, soft_bellman
from ..features import draw_theta, make_features
from ..learners import fit_bandit_mle, fit_tabular_dpo, fit_token_mle
from ..mdp import TokenMDP
from ..preferences import PreferenceData, sample_preferences
from ..sampling import Trajectories
from ..tabular_ppo import SCHEMES, TabularPPOConfig, scheme_reward_table, train_ppo
from .e7_speed import lift
from .stats import derived_seed

RMS = ("bandit", "token_mle")
DPOS = ("tree", "automaton")


def data_instance(cell: dict):
    """(automaton, reward features, true reward) of the cell's seed index."""
    s = derived_seed(7101, int(cell["seed"]))
    aut = TokenMDP.last_token_automaton(cell["A"], cell["H"], n_prompts=cell["n_prompts"], eos=cell["eos"],
                                        seed=s % 2**31)
    phi = make_features(aut, cell["reward_class"])
    return aut, phi, phi.token_reward(draw_theta(aut, phi, return_var=cell["return_var"], seed=(s + 1) % 2**31))


def on_tree(data: PreferenceData, tree: TokenMDP) -> PreferenceData:
    """The same pairs with the states of the prefix tree."""
    def t(x):
        return Trajectories(prompt=x.prompt, actions=x.actions, states=tree.states_of(x.prompt, x.actions),
                            mask=x.mask)
    return PreferenceData(first=t(data.first), second=t(data.second), first_preferred=data.first_preferred,
                          return_first=data.return_first, return_second=data.return_second, seed=data.seed)


def heldout_loglik(fit, data: PreferenceData, scale: float = 1.0) -> float:
    """Mean log sigmoid(scale (R_hat(y_w) - R_hat(y_l))) of a fit with `.returns(traj)` on the pairs `data`."""
    d = fit.returns(data.chosen) - fit.returns(data.rejected)
    return float(np.mean(log_expit(scale * d)))


def _fit(kind: str, data: PreferenceData, ridge: float, ctx: dict, init=None):
    if kind == "bandit":
        return fit_bandit_mle(data, ctx["tree"], ridge=ridge)
    if kind == "token_mle":
        return fit_token_mle(data, ctx["phi"], ridge=ridge)
    mdp = ctx["tree"] if kind == "dpo_tree" else ctx["aut"]
    return fit_tabular_dpo(data, mdp, beta=ctx["beta_dpo"], ridge=ridge, init=init)


def fit_validated(kind: str, data: PreferenceData, ridges, val_every: int, ctx: dict):
    """(fit on all of `data` with the chosen ridge, chosen ridge, {ridge: held-out log-likelihood}). Ridges are
    tried from the strongest down, DPO fits warm-started from the previous one (the minimizer is unique)."""
    idx = np.arange(data.n)
    val = idx % val_every == val_every - 1
    train, held = data.subset(~val), data.subset(val)
    scale = ctx["beta_dpo"] if kind.startswith("dpo") else 1.0
    scores, init = {}, None
    for lam in sorted(ridges, reverse=True):
        f = _fit(kind, train, lam, ctx, init=init)
        init = f.policy if kind.startswith("dpo") else None
        scores[float(lam)] = heldout_loglik(f, held, scale)
    best = max(scores, key=lambda k: (scores[k], k))          # ties -> the stronger ridge
    return _fit(kind, data, best, ctx, init=init if kind.startswith("dpo") else None), best, scores


def exact_planning_rows(cell: dict, tree: TokenMDP, aut: TokenMDP, r_tree, r_aut, rm, log_dpo, J0: float,
                        Jstar: float) -> list:
    """S12 rows of one seed: per clip and reward mode on the tree, the Markov spread, the exact optimum's J_plan and
    J_plan_norm, the pairwise log-policy differences; the spreads of the DPO terms (and of the sparse score,
    "ppo_score") on the automaton with the exact DPO policy."""
    rows = []
    b1, b2, b3 = cell["beta1"], cell["beta2"], cell["beta3"]
    for clip in cell["s12_clips"]:
        logpol = {}
        for mode in ("ppo", "rto", "semi_rto", "ddpo", "rs_ppo"):
            table, spread = scheme_reward_table(tree, mode, rm, log_dpo, beta1=b1, beta3=b3, dpo_clip=clip,
                                                segment_length=cell["segment_length"])
            sol = soft_bellman(tree, table, b2)
            logpol[mode] = sol.log_policy
            J_plan = evaluate(tree, sol.policy, r_tree, b2).J
            rows += [{"section": "s12", "structure": "tree", "clip": clip, "scheme": mode, "metric": m, "value": v}
                     for m, v in (("markov_spread", spread), ("J_plan", J_plan),
                                  ("J_plan_norm", (J_plan - J0) / (Jstar - J0)))]
        for a, b in (("rto", "semi_rto"), ("rto", "ddpo"), ("rs_ppo", "ppo"), ("rto", "ppo")):
            rows.append({"section": "s12", "structure": "tree", "clip": clip, "scheme": f"{a}|{b}",
                         "metric": "logpolicy_max_diff", "value": max_logpolicy_diff(logpol[a], logpol[b])})
    log_dpo_aut = soft_bellman(aut, r_aut, cell["beta_dpo"]).log_policy
    for scheme in ("rto", "semi_rto", "ddpo", "rs_ppo", "ppo_score"):
        mode, beta3 = ("ppo", b3) if scheme == "ppo_score" else (scheme, 0.0)
        _, spread = scheme_reward_table(aut, mode, r_aut, log_dpo_aut, beta1=b1, beta3=beta3,
                                        segment_length=cell["segment_length"])
        rows.append({"section": "s12", "structure": "last_token", "clip": None, "scheme": scheme,
                     "metric": "markov_spread", "value": spread})
    return rows


def max_logpolicy_diff(a, b) -> float:
    """max |log pi_a - log pi_b| over the entries finite in both; inf if their supports differ."""
    out = 0.0
    for x, y in zip(a, b):
        if np.any(np.isfinite(x) != np.isfinite(y)):
            return float("inf")
        both = np.isfinite(x) & np.isfinite(y)
        if both.any():
            out = max(out, float(np.abs(x[both] - y[both]).max()))
    return out


def _ppo_config(cell: dict, scheme: str, seed: int, **over) -> TabularPPOConfig:
    kw = dict(**SCHEMES[scheme], beta1=cell["beta1"], beta2=cell["beta2"], beta3=cell["beta3"],
              dpo_clip=cell.get("dpo_clip"),
              n_updates=int(cell["ppo_updates"]), batch_size=int(cell["ppo_batch_size"]), epochs=int(cell["epochs"]),
              n_minibatches=int(cell["n_minibatches"]), lr=float(cell["lr"]), critic_lr=float(cell["critic_lr"]),
              seed=seed)
    kw.update(over)
    return TabularPPOConfig(**kw)


def data_cell(cell: dict, rng_seed: int) -> list[dict]:
    """One seed of the data-efficiency part (module docstring); `rng_seed` is not used (seeds come from the seed
    index, so that the instance is the same in every grid that contains it)."""
    cpu0 = time.process_time()
    k = int(cell["seed"])
    aut, phi, r_aut = data_instance(cell)
    tree, to_tree, _ = lift(aut)
    r_tree = tree.check_reward(to_tree(r_aut))
    b1, b2, b3, beta_dpo = cell["beta1"], cell["beta2"], cell["beta3"], cell["beta_dpo"]
    J0 = evaluate(tree, tree.pi_ref, r_tree, b2).J
    Jstar = float(tree.rho @ soft_bellman(tree, r_tree, b2).V[0])
    norm = lambda J: (J - J0) / (Jstar - J0)  # noqa: E731
    data = sample_preferences(aut, r_aut, int(cell["n_pairs"]), seed=derived_seed(7102, k) % 2**31)
    data_tree = on_tree(data, tree)
    ctx = {"tree": tree, "aut": aut, "phi": phi, "beta_dpo": beta_dpo}
    run_seed = derived_seed(7103, k) % 2**31
    rows: list[dict] = []
    N = data.n
    for frac in cell["fractions"]:
        n = max(2 * int(cell["val_every"]), int(round(frac * N)))
        sub, sub_tree = data.subset(slice(0, n)), data_tree.subset(slice(0, n))
        base = {"section": "data", "fraction": float(frac), "n_data": n}
        rms, dpos = {}, {}
        for kind in cell["rms"]:
            fit, lam, scores = fit_validated(kind, sub_tree if kind == "bandit" else sub, cell["rm_ridges"],
                                             int(cell["val_every"]), ctx)
            rms[kind] = fit.token_reward(tree) if kind == "bandit" else tree.check_reward(to_tree(fit.token_reward()))
            rows.append({**base, "learner": f"rm:{kind}", "metric": "ridge", "value": lam})
            rows += [{**base, "learner": f"rm:{kind}", "ridge": lr, "metric": "val_loglik", "value": v}
                     for lr, v in scores.items()]
        for kind in cell["dpos"]:
            fit, lam, scores = fit_validated(f"dpo_{kind}", sub_tree if kind == "tree" else sub, cell["dpo_ridges"],
                                             int(cell["val_every"]), ctx)
            dpos[kind] = fit.log_policy if kind == "tree" else to_tree(fit.log_policy)
            rows.append({**base, "learner": f"dpo:{kind}", "metric": "ridge", "value": lam})
            rows += [{**base, "learner": f"dpo:{kind}", "ridge": lr, "metric": "val_loglik", "value": v}
                     for lr, v in scores.items()]
        # converged targets: exact planning on every arm's reward table
        for rm_kind, rm in rms.items():
            J = evaluate(tree, soft_bellman(tree, [b3 * x for x in rm], b2).policy, r_tree, b2).J
            rows.append({**base, "arm": f"ppo:{rm_kind}", "arm_beta3": b3, "arm_ratio": 0.0, "metric": "converged",
                         "value": norm(J)})
            for dpo_kind, ld in dpos.items():
                for beta3 in cell["sweep_beta3"]:
                    for ratio in cell["sweep_ratio"]:
                        table = rto_reward_table(tree, rm, ld, beta1=ratio * beta_dpo, beta3=beta3,
                                                 clip=cell.get("dpo_clip"))
                        J = evaluate(tree, soft_bellman(tree, table, b2).policy, r_tree, b2).J
                        rows.append({**base, "arm": f"rto:{rm_kind}:{dpo_kind}", "arm_beta3": beta3, "arm_ratio": ratio,
                                     "metric": "converged", "value": norm(J)})
        # PPO at a fixed RL budget
        for arm in cell["ppo_arms"]:
            parts = arm.split(":")
            scheme, rm_kind = parts[0], parts[1]
            ld = dpos[parts[2]] if scheme != "ppo" else None
            res = train_ppo(tree, r_tree, rms[rm_kind], ld, _ppo_config(cell, scheme, run_seed))
            Jn = [norm(row["J_true"]) for row in res.curve]
            rows += [{**base, "arm": arm, "arm_beta3": b3, "arm_ratio": b1 / beta_dpo, "update": i,
                      "metric": "ppo_J_norm", "value": v} for i, v in enumerate(Jn)]
        if frac == max(cell["fractions"]) and k < int(cell["s12_seeds"]):
            rm0, ld0 = rms[cell["rms"][0]], dpos[cell["dpos"][0]]
            rows += exact_planning_rows(cell, tree, aut, r_tree, r_aut, rm0, ld0, J0, Jstar)
            a = train_ppo(tree, r_tree, rm0, ld0, _ppo_config(cell, "rto", run_seed, beta1=0.0, n_updates=4)).curve
            p = train_ppo(tree, r_tree, rm0, ld0, _ppo_config(cell, "ppo", run_seed, n_updates=4)).curve
            diff = max(abs(x["J_true"] - y["J_true"]) for x, y in zip(a, p))
            rows.append({"section": "beta1_zero", "metric": "J_true_max_abs_diff", "value": diff})
    rows.append({"section": "data", "metric": "cell_cpu_s", "value": time.process_time() - cpu0})
    return rows
