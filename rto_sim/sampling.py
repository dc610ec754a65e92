"""Vectorized sampling of responses from a layered policy (for preference data and sampled learners).

A batch of sampled trajectories is a `Trajectories` record:
    prompt  (n,)    prompt index
    actions (n, H)  tokens y_1..y_H (EOS-padded after the first EOS)
    states  (n, H)  layer-wise state indices s_1..s_H
    mask    (n, H)  bool, generated tokens through the first EOS (the response mask of the LLM side)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mdp import Layered, Responses, TokenMDP


@dataclass
class Trajectories(Responses):
    """Sampled responses (`Responses`) and their mask (n, H): generated tokens through the first EOS."""

    mask: np.ndarray

    def gather(self, layered: Layered) -> np.ndarray:
        """(n, H) layered[h][s_h, a_h], 0 outside the mask."""
        return np.where(self.mask, super().gather(layered), 0.0)


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) one draw per row of `probs` (n, A) by inverse CDF: the first a with u * sum_a' p(a') <= cdf(a),
    u ~ U[0, 1) from ONE `rng.random(n)` call (rows need not be normalized). The simulator's only token
    sampler: preference data (`sample_trajectories`) and PPO rollouts (`tabular_ppo`) both draw here."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(cdf))[:, None] * cdf[:, -1:]
    return np.minimum((u > cdf).sum(axis=1), cdf.shape[1] - 1)


def sample_trajectories(mdp: TokenMDP, policy: Layered, n: int, rng: np.random.Generator,
                        prompt: np.ndarray | None = None) -> Trajectories:
    """Draw n responses y ~ policy(.|x), x ~ rho (or the given prompts), by inverse-CDF per layer."""
    if n < 1:
        raise ValueError(f"n (number of samples) must be >= 1, got {n}")
    policy = mdp.check_policy(policy)
    x = rng.choice(mdp.n_prompts, size=n, p=mdp.rho) if prompt is None else np.asarray(prompt, np.int64)
    H = mdp.H
    actions = np.zeros((len(x), H), np.int64)
    states = np.zeros((len(x), H), np.int64)
    mask = np.zeros((len(x), H), bool)
    s = x.copy()
    alive = np.ones(len(x), bool)
    for h in range(H):
        states[:, h] = s
        a = sample_categorical(policy[h][s], rng)
        actions[:, h] = a
        mask[:, h] = alive
        if mdp.eos is not None:
            alive = alive & (a != mdp.eos)
        if h < H - 1:
            s = mdp.next_state[h][s, a]
    return Trajectories(prompt=x, actions=actions, states=states, mask=mask)
