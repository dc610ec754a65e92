"""Gymnasium environments over a TokenMDP: `TokenMDPEnv` (one episode, for sampling-based learners) and
`TokenMDPVectorEnv` (B episodes in lockstep, the rollout generator of `rto_sim.tabular_ppo`).

TokenMDPEnv. Observation: the flat state index (layer offset + index in layer), Discrete(sum_h n_h).
Action: a token, Discrete(A). Reward: the token reward r(s_h, a_h) (or, with `sentence_reward`, the
whole return paid at the final token). The episode terminates after H tokens or at EOS (the
absorbing remainder has zero reward and zero KL, so stopping there loses nothing).
info: {"h": position, "prompt": prompt index, "log_pi_ref": log pi_ref(a|s) of the taken token}.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

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


class TokenMDPVectorEnv(gym.vector.VectorEnv):
    """`num_envs` episodes of a TokenMDP stepped together with numpy (no Python loop over episodes).

    Observation: the flat state index offsets[h] + s (int64, shape (num_envs,)); action: a token id
    (num_envs,). Every episode lasts exactly H steps: after EOS the state is absorbing (zero reward,
    zero KL, masked out), so the B episodes stay in lockstep like right-padded LLM responses.
    `terminated` is True for all envs at step H (next-step autoreset afterwards).
    Reward: the token reward `reward[h][s, a]` if a `reward` table is given (diagnostics only; PPO's
    rewards are assembled by `rto_sim.core.compute_rto_rewards`), else 0.
    info: "layer" h, "state" (num_envs,) layer-wise index s_h, "valid" (num_envs,) bool (the token is
    generated before or at the first EOS), "log_pi_ref" (num_envs,) log pi_ref(a | s); reset info:
    "prompt", "state", "layer".
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, mdp: TokenMDP, num_envs: int, reward: Layered | None = None):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        self.mdp = mdp
        self.num_envs = int(num_envs)
        self.reward = None if reward is None else mdp.check_reward(reward)
        self.offsets = mdp.flat_offsets()
        self.single_observation_space = gym.spaces.Discrete(int(self.offsets[-1]))
        self.single_action_space = gym.spaces.Discrete(mdp.A)
        self.observation_space = gym.spaces.MultiDiscrete(np.full(self.num_envs, int(self.offsets[-1])))
        self.action_space = gym.spaces.MultiDiscrete(np.full(self.num_envs, mdp.A))
        self._h = 0
        self._s = np.zeros(self.num_envs, np.int64)
        self._alive = np.ones(self.num_envs, bool)
        self._prompt = np.zeros(self.num_envs, np.int64)
        self._needs_reset = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "prompt" in options:
            prompt = np.asarray(options["prompt"], np.int64)
            if prompt.shape != (self.num_envs,):
                raise ValueError(f"options['prompt'] must have shape ({self.num_envs},), got {prompt.shape}")
        else:
            prompt = self.np_random.choice(self.mdp.n_prompts, size=self.num_envs, p=self.mdp.rho)
        self._prompt = prompt.astype(np.int64)
        self._h, self._s = 0, self._prompt.copy()
        self._alive = np.ones(self.num_envs, bool)
        self._needs_reset = False
        return self.offsets[0] + self._s, {"prompt": self._prompt.copy(), "state": self._s.copy(), "layer": 0}

    def step(self, actions):
        if self._needs_reset:            # next-step autoreset: this call only resets
            obs, info = self.reset()
            z = np.zeros(self.num_envs)
            return obs, z, z.astype(bool), z.astype(bool), info
        a = np.asarray(actions, dtype=np.int64)
        if a.shape != (self.num_envs,) or np.any((a < 0) | (a >= self.mdp.A)):
            raise ValueError(f"actions must be {self.num_envs} token ids in [0, {self.mdp.A})")
        h, s = self._h, self._s
        valid = self._alive.copy()
        r = np.zeros(self.num_envs) if self.reward is None else np.where(valid, self.reward[h][s, a], 0.0)
        info = {"layer": h, "state": s.copy(), "valid": valid, "log_pi_ref": self.mdp.log_pi_ref[h][s, a]}
        if self.mdp.eos is not None:
            self._alive &= a != self.mdp.eos
        done = h == self.mdp.H - 1
        if done:
            self._needs_reset = True
            obs = self.offsets[h] + s
        else:
            self._s = self.mdp.next_state[h][s, a]
            self._h = h + 1
            obs = self.offsets[h + 1] + self._s
        term = np.full(self.num_envs, done)
        return obs, r, term, np.zeros(self.num_envs, bool), info
