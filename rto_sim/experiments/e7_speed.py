"""E7, learning speed: PPO on dense vs delayed DPO rewards where credit assignment is hard (docs/theory.md section 10).

One sweep cell = one instance (horizon H, seed index), one actor class, batch size and optimizer; it trains every
critic x reward mode on that instance with the SAME rollout seed (paired arms: the first rollout is identical for
all of them) and returns the tidy rows of `e7` section "speed".

Instance: the last-token automaton (A tokens, no EOS, so every response has exactly H tokens), pi_ref = softmax of
N(0, 1) logits per automaton state, the true reward of class `reward_class` (bigram: r*(last token, token)) with
E_x Var_pi_ref R* = return_var at every H. The RM is r* itself and the DPO policy is exact, pi*_{beta_dpo}: this
part measures optimization, not estimation. Rewards come only from `core.compute_rto_rewards` (the trainer), so

    rto    r_t = -beta2 k1_t + beta1 log(pi_dpo/pi_ref)(y_t) + [t = H] beta3 R*      (dense DPO reward)
    ddpo   the same DPO rewards summed and paid at the last token                   (delayed; same total)
    rs_ppo dense DPO rewards minus their sum at the last token                      (shaped; total = PPO's)
    ppo    -beta2 k1_t + [t = H] beta3 R*                                           (sparse)

rto and ddpo optimize the same objective (the Markov table r* + beta1 log pi_dpo/pi_ref, `rto_reward_table`), and
so do rs_ppo and ppo (r*): each pair differs only in WHERE the DPO reward is paid. Critics: "none" (REINFORCE++:
whitened reward-to-go, a batch-mean baseline), "position_last_token" (linear, additive in one-hot h and one-hot
last token), "tabular" (one value per automaton state) and "tree_tabular" (one value per prefix: the instance
lifted to its prefix tree, same pi_ref, rewards and actor class; by identity 11 RS-PPO there differs from PPO
only by where the critic starts). Actors: "loglinear" (logits = log pi_ref + <phi, w> over the actor features,
shared across positions and prompts) or "tabular" (one logit per automaton state); on the tree both are the same
class as on the automaton (features read through the automaton state of each prefix).

Progress of a run = (J(pi_u) - J(pi_ref)) / (J* - J(pi_ref)) in the objective of its pair (J_beta2 of the
objective table), J* = the best policy of the actor class (`exact.soft_bellman` for the tabular class,
`policies.class_optimum` for the log-linear one): 1 = converged to the best the actor can do.
Diagnostics at the updates `snr_updates` (on that update's rollout, before its PPO epochs), against the EXACT
advantage A^pi(s, a) of the pair's objective under the current policy (`policies.exact_advantage`):
adv_corr (Pearson correlation between the estimator and A^pi over the valid tokens; PPO whitens the advantages,
an affine map, so this is the estimator's quality as PPO sees it), adv_snr = corr^2 / (1 - corr^2),
adv_mse = mean (A_hat - A^pi)^2 in reward units (A_hat before whitening: GAE's returns - values, REINFORCE++'s
reward-to-go minus its batch mean), adv_var_exact = Var A^pi, and grad_cos = cosine between the full-batch PPO
policy gradient of that rollout and the exact gradient of the objective.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import core
from ..exact import evaluate, rto_reward_table, soft_bellman
from ..features import draw_theta, make_features
from ..learners import lift_to_tree
from ..mdp import TokenMDP
from ..policies import (
    ExactObjective,
    LogLinearPolicy,
    TabularPolicy,
    class_optimum,
    dense_features,
    exact_advantage,
    flat_table,
    make_critic,
)
from ..tabular_ppo import TabularPPOConfig, TabularPPOTrainer
from .stats import derived_seed

OBJECTIVE = {"ppo": "sparse", "rs_ppo": "sparse", "reinforce++": "sparse", "rto": "dense", "ddpo": "dense",
             "semi_rto": "dense"}
DIAG_METRICS = ("adv_corr", "adv_snr", "adv_mse", "adv_var_exact", "grad_cos")


def speed_instance(A: int, H: int, n_prompts: int, reward_class: str, return_var: float, seed_idx: int):
    """(automaton, true reward) of seed index `seed_idx` at horizon H (seeds derived from (H, seed_idx))."""
    s = derived_seed(7001, H, seed_idx)
    aut = TokenMDP.last_token_automaton(A, H, n_prompts=n_prompts, eos=False, seed=s % 2**31)
    phi = make_features(aut, reward_class)
    return aut, phi.token_reward(draw_theta(aut, phi, return_var=return_var, seed=(s + 1) % 2**31))


def actor_features(aut: TokenMDP, actor: str, kinds) -> np.ndarray:
    """(S, A, d) features of the actor on the automaton: the concatenated feature classes `kinds` ("loglinear")
    or one-hot (state, token) ("tabular": the tabular class written as a log-linear one)."""
    if actor == "loglinear":
        return dense_features(aut, [make_features(aut, k) for k in kinds])
    if actor == "tabular":
        S = int(aut.flat_offsets()[-1])
        return np.eye(S * aut.A).reshape(S, aut.A, S * aut.A)
    raise ValueError(f"actor must be 'loglinear' or 'tabular', got {actor!r}")


def lift(aut: TokenMDP):
    """(tree, to_tree) where to_tree maps a layered (n_h, ...) automaton table to the prefix tree."""
    tree, smap = lift_to_tree(aut)

    def to_tree(layered):
        return [np.asarray(layered[h])[smap[h]] for h in range(aut.H)]
    return tree, to_tree, np.concatenate([smap[h] + aut.flat_offsets()[h] for h in range(aut.H)])


class AdvantageDiagnostics:
    """Trainer hook (`TabularPPOTrainer(diagnostics=...)`): the module docstring's estimator diagnostics at the
    updates in `updates`, against the exact advantage of `objective` (a Markov reward table) at beta2."""

    def __init__(self, mdp: TokenMDP, objective, beta2: float, updates):
        self.mdp, self.objective, self.beta2 = mdp, objective, beta2
        self.updates = set(int(u) for u in updates)
        self.exact = ExactObjective(mdp, objective, beta2)

    def __call__(self, trainer: TabularPPOTrainer, roll, update: int) -> dict:
        if update not in self.updates:
            return {}
        pol = trainer.policy.layered_policy()
        A_flat = torch.as_tensor(flat_table(exact_advantage(self.mdp, pol, self.objective, self.beta2)))
        m = roll.mask
        a_exact = A_flat[roll.flat_states, roll.actions][m]
        if roll.values is not None:                      # GAE: returns = advantages + values
            raw = (roll.returns - roll.values)[m]
        else:                                            # REINFORCE++: reward-to-go minus its batch mean
            raw = roll.returns[m] - roll.returns[m].mean()
        out = {"adv_mse": float(((raw - a_exact) ** 2).mean()), "adv_var_exact": float(a_exact.var())}
        if raw.std() > 0 and a_exact.std() > 0:
            c = float(torch.corrcoef(torch.stack([raw, a_exact]))[0, 1])
            out["adv_corr"] = c
            out["adv_snr"] = c * c / max(1.0 - c * c, 1e-300)
        # full-batch PPO policy gradient at ratio 1 (the direction of the first step) vs the exact gradient
        params = [p for p in trainer.policy.parameters() if p.requires_grad]
        logp = trainer.policy.log_probs(roll.flat_states, roll.actions)
        loss, _ = core.ppo_policy_loss(logp, roll.logprobs, roll.advantages, m, clip_eps=trainer.cfg.clip_eps)
        g_hat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-loss, params)])
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(self.exact(trainer.policy), params)])
        den = float(g_hat.norm() * g.norm())
        if den > 0:
            out["grad_cos"] = float(g_hat @ g) / den
        return out


def class_target(mdp: TokenMDP, actor: str, feats: np.ndarray, table, beta2: float) -> float:
    """J* of the objective `table` over the actor's class: soft_bellman for the tabular class, L-BFGS otherwise."""
    if actor == "tabular":
        return float(mdp.rho @ soft_bellman(mdp, table, beta2).V[0])
    return class_optimum(mdp, LogLinearPolicy(mdp, feats), table, beta2)[0]


def speed_cell(cell: dict, rng_seed: int) -> list[dict]:
    """One sweep cell (module docstring). `rng_seed` (the cell's hash seed) is not used: the instance and the
    rollout seeds come from (H, seed index) so that cells of other actors, batch sizes and optimizers share them."""
    cpu0 = time.process_time()
    H, k = int(cell["H"]), int(cell["seed"])
    actor, B, opt = cell["actor"], int(cell["batch_size"]), cell["optimizer"]
    b1, b2, b3 = cell["beta1"], cell["beta2"], cell["beta3"]
    aut, r = speed_instance(cell["A"], H, cell["n_prompts"], cell["reward_class"], cell["return_var"], k)
    log_dpo = soft_bellman(aut, r, cell["beta_dpo"]).log_policy
    clip = cell.get("dpo_clip")
    tables = {"sparse": [b3 * x for x in r],
              "dense": rto_reward_table(aut, r, log_dpo, beta1=b1, beta3=b3, clip=clip)}
    feats = actor_features(aut, actor, cell["actor_features"])
    J_true0 = evaluate(aut, aut.pi_ref, r, b2).J
    J_true_star = float(aut.rho @ soft_bellman(aut, r, b2).V[0])
    rows, target = [], {}
    for name, table in tables.items():
        J0 = evaluate(aut, aut.pi_ref, table, b2).J
        J_class = class_target(aut, actor, feats, table, b2)
        J_global = float(aut.rho @ soft_bellman(aut, table, b2).V[0])
        target[name] = (J0, J_class)
        rows += [{"scheme": "", "critic": "", "objective": name, "update": -1, "metric": m, "value": v}
                 for m, v in (("J0", J0), ("J_class_star", J_class), ("J_global_star", J_global))]
    run_seed = derived_seed(7002, H, k) % 2**31
    U = int(cell["n_updates"])
    tree = None
    for critic in cell["critics"]:
        if critic == "tree_tabular":
            if H > int(cell["tree_max_H"]):
                continue
            if tree is None:
                tree, to_tree, smap_flat = lift(aut)
            mdp, rr, ld = tree, to_tree(r), to_tree(log_dpo)
            tabs = {n: to_tree(t) for n, t in tables.items()}
            f = feats[smap_flat]
            crit_kind = "tabular"
        else:
            mdp, rr, ld, tabs, f, crit_kind = aut, r, log_dpo, tables, feats, critic
        for mode in cell["modes"]:
            est = "reinforce++" if critic == "none" else "gae"
            cfg = TabularPPOConfig(mode=mode, advantage_estimator=est, beta1=b1, beta2=b2, beta3=b3, dpo_clip=clip,
                                   segment_length=int(cell["segment_length"]), n_updates=U, batch_size=B,
                                   epochs=int(cell["epochs"]), n_minibatches=int(cell["n_minibatches"]),
                                   lr=float(cell["lr"]), critic_lr=float(cell["critic_lr"]), optimizer=opt,
                                   lam=float(cell.get("lam", 0.95)),
                                   seed=run_seed)
            obj = OBJECTIVE[mode]
            diag = AdvantageDiagnostics(mdp, tabs[obj], b2, cell["snr_updates"])
            # the tabular class on the automaton is TabularPolicy (same iterates as one-hot log-linear features)
            policy = TabularPolicy(mdp) if (actor == "tabular" and mdp is aut) else LogLinearPolicy(mdp, f)
            trainer = TabularPPOTrainer(mdp, rr, rr, ld, cfg, policy=policy,
                                        critic=make_critic(mdp, crit_kind), eval_rewards={"obj": tabs[obj]},
                                        diagnostics=diag)
            res = trainer.train()
            J0, Jc = target[obj]
            keys = {"scheme": mode, "critic": critic, "objective": obj}
            for row in res.curve:
                u = int(row["update"])
                vals = {"progress": (row["J_obj"] - J0) / (Jc - J0),
                        "J_norm": (row["J_true"] - J_true0) / (J_true_star - J_true0), "kl_ref": row["kl_ref"]}
                vals.update({m: row[m] for m in DIAG_METRICS if m in row})
                rows += [{**keys, "update": u, "metric": m, "value": float(v)} for m, v in vals.items()]
            rows.append({**keys, "update": -1, "metric": "run_wall_s", "value": res.wall_time_s})
    # CPU seconds of the cell: on a shared machine its wall time measures the load, this measures the work
    rows.append({"scheme": "", "critic": "", "objective": "", "update": -1, "metric": "cell_cpu_s",
                 "value": time.process_time() - cpu0})
    return rows
