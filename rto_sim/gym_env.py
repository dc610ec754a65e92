"""A gymnasium environment over a TokenMDP, for sampling-based learners.

Observation: the flat state index (layer offset + index in layer), Discrete(sum_h n_h).
Action: a token, Discrete(A). Reward: the token reward r(s_h, a_h) (or, with `sentence_reward`, the
whole return paid at the final token). The episode terminates after H tokens or at EOS (the
absorbing remainder has zero reward and zero KL, so stopping there loses nothing).
info: {"h": position, "prompt": prompt index, "log_pi_ref": log pi_ref(a|s) of the taken token}.
"""

from __future__ import annotations

import gymnasium as gym

from .mdp import Layered, TokenMDP


class TokenMDPEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, mdp: TokenMDP, reward: Layered, sentence_reward: bool = False):
        self.mdp = mdp
        self.reward = mdp.check_reward(reward)
        self.sentence_reward = sentence_reward
        self.offsets = mdp.flat_offsets()
        self.observation_space = gym.spaces.Discrete(int(self.offsets[-1]))
        self.action_space = gym.spaces.Discrete(mdp.A)
        self._h = 0
        self._s = 0
        self._prompt = 0
        self._ret = 0.0

    def _obs(self) -> int:
        return int(self.offsets[self._h] + self._s)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "prompt" in options:
            self._prompt = int(options["prompt"])
        else:
            self._prompt = int(self.np_random.choice(self.mdp.n_prompts, p=self.mdp.rho))
        self._h, self._s, self._ret = 0, self._prompt, 0.0
        return self._obs(), {"h": 0, "prompt": self._prompt}

    def step(self, action):
        a = int(action)
        if not 0 <= a < self.mdp.A:
            raise ValueError(f"action must be in [0, {self.mdp.A}), got {action!r}")
        h, s = self._h, self._s
        r = float(self.reward[h][s, a])
        self._ret += r
        info = {"h": h, "prompt": self._prompt, "log_pi_ref": float(self.mdp.log_pi_ref[h][s, a])}
        terminated = h == self.mdp.H - 1 or (self.mdp.eos is not None and a == self.mdp.eos)
        if not terminated:
            self._s = int(self.mdp.next_state[h][s, a])
            self._h = h + 1
        obs = self._obs()
        if self.sentence_reward:
            r = self._ret if terminated else 0.0
        return obs, r, terminated, False, info
