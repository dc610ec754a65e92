"""Per-token heat map of the DPO implicit reward beta * log(pi_dpo/pi_ref) on sample responses.

A small deterministic run ((h, last token) automaton, A=4 with EOS, H=6, bigram reward, N preference pairs
from pi_ref, tabular DPO at beta = 1 over the automaton's states: parameter sharing makes the DPO solution
identifiable; on the full tree the unregularized DPO logits diverge, the tree-tabular trap) writes its
tidy table OUT/heatmap/results.csv; the figure reads it. Three rows per response: the true token reward
r(s,a), the exact DPO reward of pi*_beta (= r + V*(s') - V*(s), a potential-shaped r, docs/theory.md identity 2)
and the fitted DPO model's reward."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from rto_sim import TokenMDP, draw_theta, implicit_token_reward, make_features, sample_trajectories, soft_bellman
from rto_sim.learners import fit_tabular_dpo
from rto_sim.preferences import sample_preferences
from rto_sim.results import write_table

from .style import plt, save

CONFIG = {"A": 4, "H": 6, "feature": "bigram", "beta": 1.0, "n_pairs": 4000, "n_show": 8, "seed": 0}


def compute(out: Path, quick: bool) -> tuple[pd.DataFrame, float]:
    cfg = dict(CONFIG, n_pairs=1000 if quick else CONFIG["n_pairs"])
    t0 = time.perf_counter()
    mdp = TokenMDP.last_token_automaton(cfg["A"], cfg["H"], eos=True, seed=cfg["seed"])
    phi = make_features(mdp, cfg["feature"])
    r = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=cfg["seed"] + 1))
    star = soft_bellman(mdp, r, cfg["beta"])
    data = sample_preferences(mdp, r, cfg["n_pairs"], seed=cfg["seed"] + 2)
    fit = fit_tabular_dpo(data, mdp, cfg["beta"])
    show = sample_trajectories(mdp, mdp.pi_ref, cfg["n_show"], np.random.default_rng(cfg["seed"] + 3))
    rows = []
    for name, layered in (("true r(s,a)", r), ("exact DPO reward of pi*", implicit_token_reward(mdp, star.policy,
                                                                                                   cfg["beta"])),
                          (f"fitted DPO (N={cfg['n_pairs']})", implicit_token_reward(mdp, fit.policy, cfg["beta"]))):
        vals = show.gather(layered)
        for i in range(len(show)):
            for h in range(mdp.H):
                if show.mask[i, h]:
                    rows.append({"reward": name, "response": i, "position": h, "token": int(show.actions[i, h]),
                                 "value": float(vals[i, h])})
    df = pd.DataFrame(rows)
    write_table(df, out / "heatmap" / "results", "csv")
    return df, time.perf_counter() - t0


def draw(out: Path, quick: bool) -> list[Path]:
    df, wall = compute(out, quick)
    names = list(dict.fromkeys(df.reward))
    n_resp, H = df.response.max() + 1, df.position.max() + 1
    vmax = float(np.abs(df.value).max())
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), sharey=True)
    for ax, name in zip(axes, names):
        d = df[df.reward == name]
        grid = np.full((n_resp, H), np.nan)
        grid[d.response, d.position] = d.value
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for _, row in d.iterrows():
            tok = "EOS" if row.token == CONFIG["A"] - 1 else str(row.token)
            ax.text(row.position, row.response, tok, ha="center", va="center", fontsize=6)
        ax.set(title=name, xlabel="token position")
        ax.grid(False)
    axes[0].set_ylabel("sample response (from pi_ref)")
    fig.colorbar(im, ax=axes, shrink=0.8)
    cap = (f"DPO implicit token reward: (h, last token) automaton, A={CONFIG['A']} (token {CONFIG['A'] - 1} = EOS), "
           f"H={CONFIG['H']}, "
           f"{CONFIG['feature']} reward, beta={CONFIG['beta']}, {'quick' if quick else 'full'}; wall {wall:.1f}s. "
           "The DPO rewards differ from r by a potential (theory identity 2), so they share sums, not values.")
    return save(fig, out, "DPO_token_reward_heatmap", cap)
