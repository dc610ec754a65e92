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

from .mdp import Layered, TokenMDP


@dataclass
class Trajectories:
    prompt: np.ndarray
    actions: np.ndarray
    states: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def gather(self, layered: Layered) -> np.ndarray:
        """(n, H) layered[h][s_h, a_h], 0 outside the mask."""
        vals = np.stack([layered[h][self.states[:, h], self.actions[:, h]] for h in range(self.actions.shape[1])],
                        axis=1)
        return np.where(self.mask, vals, 0.0)

    def returns(self, reward: Layered) -> np.ndarray:
        return self.gather(reward).sum(axis=1)


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
        cdf = np.cumsum(policy[h][s], axis=1)
        u = rng.random(len(x))[:, None] * cdf[:, -1:]
        a = np.minimum((u > cdf).sum(axis=1), mdp.A - 1)
        actions[:, h] = a
        mask[:, h] = alive
        if mdp.eos is not None:
            alive = alive & (a != mdp.eos)
        if h < H - 1:
            s = mdp.next_state[h][s, a]
    return Trajectories(prompt=x, actions=actions, states=states, mask=mask)
