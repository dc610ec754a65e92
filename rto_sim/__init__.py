"""rto_sim: exact token-MDP simulator for Reinforced Token Optimization (RTO).

Importing the package loads nothing heavy: names are resolved from their submodules on first use.
The torch algorithm core that the LLM trainer shares is `rto_sim.core` (torch only).

    from rto_sim import TokenMDP, make_features, draw_theta, soft_bellman, evaluate
    mdp = TokenMDP.tree(A=3, H=4, eos=True)
    phi = make_features(mdp, "unigram")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=0.25))
    sol = soft_bellman(mdp, r, beta=0.5)           # V*, Q*, pi*_beta
    evaluate(mdp, sol.policy, r, beta=0.5).J       # J_beta(pi*)
"""

import importlib

# Public names -> the submodule that defines them. Loaded on first use (PEP 562), so that
# `import rto_sim.core` (torch only) does not pay for scipy, and `rto-sim --help` stays fast.
_EXPORTS = {
    "exact": ("Enumeration", "PolicyValue", "SoftSolution", "argmax_policy", "enumerate_responses", "evaluate",
              "implicit_token_reward", "occupancy", "return_moments", "rto_reward_table", "soft_bellman",
              "sub_optimality"),
    "features": ("FEATURE_KINDS", "FeatureMap", "draw_theta", "make_features"),
    "mdp": ("TokenMDP", "safe_log"),
    "sampling": ("Trajectories", "sample_trajectories"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rto_sim' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
