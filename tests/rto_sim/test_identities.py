"""Property tests: every identity of docs/theory.md section 2 on random trees and automata (hypothesis).
The same functions produce experiment E0's table."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rto_sim.identities import IDENTITIES, random_instance

instances = st.builds(
    random_instance,
    seed=st.integers(0, 10_000),
    structure=st.sampled_from(["tree", "last_token", "random_automaton"]),
    A=st.integers(2, 3),
    H=st.integers(1, 5),
    eos=st.booleans(),
    n_prompts=st.integers(1, 2),
    beta=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
    reward_scale=st.sampled_from([0.3, 1.0, 2.0]),
)


@pytest.mark.parametrize("name", list(IDENTITIES))
@settings(max_examples=25, deadline=None)
@given(inst=instances)
def test_identity_holds(name, inst):
    fn, tol = IDENTITIES[name]
    assert fn(inst) <= tol


def test_identities_detect_a_broken_planner(monkeypatch):
    """The checks compare independent computations: a soft-Bellman bug (V off by a constant factor)
    must be caught by the Gibbs and telescoping identities."""
    import rto_sim.identities as ident
    from rto_sim import exact

    real = exact.soft_bellman

    def broken(mdp, reward, beta):
        sol = real(mdp, reward, beta)
        sol.V = [v * 1.01 for v in sol.V]
        return sol

    monkeypatch.setattr(ident, "soft_bellman", broken)
    inst = random_instance(1, "tree", A=3, H=3, beta=0.5)
    assert ident.gibbs_equivalence(inst) > 1e-4
    assert ident.telescoping(inst) > 1e-4
