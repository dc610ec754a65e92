"""rto_sim: exact token-MDP simulator for Reinforced Token Optimization (RTO).

numpy/scipy only at import time; the torch algorithm core is `rto_sim.core` (import it explicitly).

    from rto_sim import TokenMDP, make_features, draw_theta, soft_bellman, evaluate
    mdp = TokenMDP.tree(A=3, H=4, eos=True)
    phi = make_features(mdp, "unigram")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=0.25))
    sol = soft_bellman(mdp, r, beta=0.5)           # V*, Q*, pi*_beta
    evaluate(mdp, sol.policy, r, beta=0.5).J       # J_beta(pi*)
"""

from .exact import (
    Enumeration,
    PolicyValue,
    SoftSolution,
    argmax_policy,
    enumerate_responses,
    evaluate,
    implicit_token_reward,
    occupancy,
    return_moments,
    rto_reward_table,
    soft_bellman,
    sub_optimality,
)
from .features import FEATURE_KINDS, FeatureMap, draw_theta, make_features
from .mdp import TokenMDP, safe_log
from .sampling import Trajectories, sample_trajectories

__version__ = "0.1.0"

__all__ = [
    "TokenMDP", "safe_log", "FeatureMap", "FEATURE_KINDS", "make_features", "draw_theta",
    "SoftSolution", "PolicyValue", "Enumeration", "soft_bellman", "argmax_policy", "evaluate", "occupancy",
    "sub_optimality", "return_moments", "implicit_token_reward", "enumerate_responses", "rto_reward_table",
    "Trajectories", "sample_trajectories",
]
