"""rto_sim.token_task: gold returns, enumeration, sampling, Bradley-Terry labels, task.json (numpy only)."""

import json

import numpy as np
import pytest
from scipy.special import expit

from rto_sim import TokenMDP, enumerate_responses, make_features
from rto_sim.token_task import TokenTask, make_token_task


@pytest.fixture(scope="module")
def task():
    return make_token_task(3, 4, 2, structure="last_token", feature_kind="bigram", beta=0.5, rho=[0.3, 0.7],
                           seed=4)


def test_gold_return_matches_closed_forms():
    """Unigram: R(y) = sum_t theta[y_t]; positional: R(y) = sum_t theta[t A + y_t] (EOS included, nothing after)."""
    for kind, idx in (("unigram", lambda t, a, A: a), ("positional", lambda t, a, A: t * A + a)):
        tk = make_token_task(4, 3, 2, feature_kind=kind, seed=1)
        for p, y in [(0, [3]), (1, [0, 1, 3]), (0, [2, 2, 2]), (1, [1, 0, 2]), (1, [0, 3])]:
            want = sum(tk.theta[idx(t, a, 4)] for t, a in enumerate(y))
            assert tk.gold_return(p, y) == pytest.approx(want, abs=1e-12), (kind, y)


def test_enumeration_is_every_valid_response_once(task):
    e = task.enumerate()
    assert len(e) == task.n_prompts * task.num_responses == 2 * (1 + 2 + 4 + 8 + 16)
    resp = e.responses()
    assert all(task.is_valid(y) for y in resp)
    for p in range(task.n_prompts):
        mine = [tuple(y) for y, q in zip(resp, e.prompt) if q == p]
        assert len(set(mine)) == len(mine) == task.num_responses
    # gold returns by the next_state walk equal the enumeration's layered sums; pi_ref sums to 1 per prompt
    assert np.allclose(task.gold_returns(e.prompt, resp), e.returns, atol=1e-12)
    mass = np.bincount(e.prompt, weights=np.exp(e.log_pi_ref))
    assert np.allclose(mass, 1.0, atol=1e-12)


@pytest.mark.parametrize("bad, msg", [
    ([], "empty"), ([0, 1, 0, 1, 2], "more than H"), ([2, 0], "after EOS"), ([0, 1], "no EOS"),
    ([0, 5], "outside"), ([-1, 2], "outside"), ("ab", "sequence of action ids"),
])
def test_invalid_responses_are_refused(task, bad, msg):
    with pytest.raises(ValueError, match=msg):
        task.gold_return(0, bad)
    assert not task.is_valid(bad)


def test_h_tokens_without_eos_is_valid(task):
    assert task.is_valid([0, 1, 1, 0]) and task.is_valid([0, 1, 1, 2]) and task.is_valid([2])
    with pytest.raises(ValueError, match="prompt index"):
        task.gold_return(2, [2])


def test_sft_samples_follow_pi_ref(task):
    """Empirical response frequencies match exp(log pi_ref(y|x)) rho(x) within 4.5 standard errors."""
    n = 40_000
    x, ys = task.sample_responses(n, seed=0)
    e = task.enumerate()
    index = {(int(p), tuple(y)): i for i, (p, y) in enumerate(zip(e.prompt, e.responses()))}
    counts = np.bincount([index[(int(p), tuple(y))] for p, y in zip(x, ys)], minlength=len(e))
    prob = np.exp(e.log_pi_ref) * task.rho[e.prompt]
    z = (counts / n - prob) / np.sqrt(prob * (1 - prob) / n)
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    rows = task.sft_rows(5, seed=1)
    for r in rows:
        y = task.parse_response(r["response"])
        assert r["prompt"] == task.prompt_words[r["prompt_index"]]
        assert r["R"] == pytest.approx(task.gold_return(r["prompt_index"], y))
        assert r["response"].endswith(task.eos_word) == (y[-1] == task.eos)
    assert task.sft_rows(5, seed=1) == rows


def test_labels_are_sampled_bradley_terry(task):
    """P(first chosen) = sigmoid(R1 - R2): the empirical rate matches, and labels are not the argmax."""
    n = 20_000
    x, first = task.sample_responses(n, seed=2)
    _, second = task.sample_responses(n, seed=3, prompts=x)
    lab = task.label_pairs(x, first, second, seed=4)
    R1, R2 = task.gold_returns(x, first), task.gold_returns(x, second)
    assert np.allclose(lab.p_first, expit(R1 - R2))
    se = np.sqrt((lab.p_first * (1 - lab.p_first)).sum()) / n
    assert abs(lab.first_preferred.mean() - lab.p_first.mean()) < 4 * se
    against = (lab.chosen_return < lab.rejected_return).mean()
    assert against > 0.05                                    # argmax labels would give exactly 0
    for i in range(50):
        assert (lab.chosen[i], lab.rejected[i]) == ((first[i], second[i]) if lab.first_preferred[i]
                                                    else (second[i], first[i]))
    again = task.label_pairs(x, first, second, seed=4)
    assert np.array_equal(again.first_preferred, lab.first_preferred)
    with pytest.raises(ValueError, match="equal length"):
        task.label_pairs(x[:3], first[:2], second[:3], seed=0)


def test_json_round_trip(task, tmp_path):
    path = str(tmp_path / "task.json")
    task.to_json(path)
    back = TokenTask.from_json(path)
    e, f = task.enumerate(), back.enumerate()
    assert np.array_equal(e.returns, f.returns) and np.array_equal(e.log_pi_ref, f.log_pi_ref)
    assert back.token_words == task.token_words and back.prompt_words == task.prompt_words
    assert back.beta == task.beta and np.array_equal(back.rho, task.rho) and back.mdp.kind == "last_token"
    d = json.loads(open(path).read())
    assert d["A"] == 3 and d["H"] == 4 and d["n_prompts"] == 2 and d["structure"] == "last_token"
    assert d["features"]["kind"] == "bigram" and len(d["theta"]) == task.features.d


def test_json_detects_tampering_and_missing_fields(task):
    d = json.loads(task.to_json())
    d["theta"][0] += 0.5
    with pytest.raises(ValueError, match="does not reproduce"):
        TokenTask.from_json(json.dumps(d))
    d = json.loads(task.to_json())
    del d["seeds"]
    with pytest.raises(ValueError, match=r"missing the fields \['seeds'\]"):
        TokenTask.from_json(json.dumps(d))
    d = json.loads(task.to_json())
    d["format"] = "other/9"
    with pytest.raises(ValueError, match="format"):
        TokenTask.from_dict(d)
    with pytest.raises(ValueError, match="not a JSON"):
        TokenTask.from_json("{not json")


def test_validation_names_the_field():
    mdp = TokenMDP.tree(3, 2, eos=False)
    phi = make_features(mdp, "unigram")
    with pytest.raises(ValueError, match="eos=True"):
        TokenTask(mdp, phi, np.zeros(phi.d))
    mdp = TokenMDP.tree(3, 2, eos=True)
    phi = make_features(mdp, "unigram")
    other = make_features(TokenMDP.tree(3, 3, eos=True), "unigram")
    with pytest.raises(ValueError, match="make_features"):
        TokenTask(mdp, other, np.zeros(other.d))
    with pytest.raises(ValueError, match="theta"):
        TokenTask(mdp, phi, np.zeros(phi.d + 1))
    with pytest.raises(ValueError, match="beta"):
        TokenTask(mdp, phi, np.zeros(phi.d), beta=0.0)
    with pytest.raises(ValueError, match="token_words"):
        TokenTask(mdp, phi, np.zeros(phi.d), token_words=["a", "b"])
    with pytest.raises(ValueError, match="whitespace"):
        TokenTask(mdp, phi, np.zeros(phi.d), token_words=["a", "b c", "<eos>"])
    with pytest.raises(ValueError, match="duplicate"):
        TokenTask(mdp, phi, np.zeros(phi.d), token_words=["a", "a", "<eos>"])
    with pytest.raises(ValueError, match="share"):
        TokenTask(mdp, phi, np.zeros(phi.d), prompt_words=["a0"])
    t = TokenTask(mdp, phi, np.ones(phi.d))
    with pytest.raises(ValueError, match="make_token_task"):
        t.to_json()
    with pytest.raises(ValueError, match="structure"):
        make_token_task(3, 2, structure="graph")


def test_lift_to_tree_keeps_returns_and_reference(task):
    tree, reward = task.lift_to_tree()
    assert tree.kind == "tree"
    et = enumerate_responses(tree)
    e = task.enumerate()
    assert np.array_equal(et.actions, e.actions) and np.array_equal(et.prompt, e.prompt)
    assert np.allclose(et.returns(reward), e.returns, atol=1e-12)
    assert np.allclose(et.log_prob(tree.log_pi_ref), e.log_pi_ref, atol=1e-12)


def test_module_imports_neither_torch_nor_transformers():
    """token_task.py itself imports only the standard library, numpy, scipy and rto_sim (a static check: other
    rto_sim modules may load torch for the shared core), and importing it never loads transformers."""
    import ast
    import subprocess
    import sys

    import rto_sim.token_task as mod

    tree = ast.parse(open(mod.__file__).read())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"__future__", "json", "os", "dataclasses", "numpy", "scipy"}, roots
    code = "import sys, rto_sim.token_task; sys.exit(1 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eos_logit_makes_responses_longer_and_round_trips(tmp_path):
    """eos_logit adds to pi_ref's EOS logit in every live state (then renormalizes); theta* is drawn under the
    shifted reference (return variance as asked); task.json rebuilds it; a task.json without the key is eos_logit 0."""
    base = make_token_task(3, 6, 2, structure="last_token", feature_kind="bigram", return_var=0.5, seed=3)
    long = make_token_task(3, 6, 2, structure="last_token", feature_kind="bigram", return_var=0.5, eos_logit=-2.0,
                           seed=3)
    for h in range(6):
        live = ~long.mdp.absorbing[h]
        p, q = base.mdp.pi_ref[h][live], long.mdp.pi_ref[h][live]
        odds = lambda x: x[:, -1] / x[:, :-1].sum(axis=1)   # noqa: E731
        assert np.allclose(odds(q), np.exp(-2.0) * odds(p), rtol=1e-12)
        assert np.allclose(q[:, :-1] / q[:, :-1].sum(1, keepdims=True), p[:, :-1] / p[:, :-1].sum(1, keepdims=True))
    e, f = base.enumerate(), long.enumerate()
    mean_len = [float((np.exp(x.log_pi_ref) * x.length).sum() / 2) for x in (e, f)]
    assert mean_len[1] > mean_len[0] + 1
    R, w = f.returns.reshape(2, -1), np.exp(f.log_pi_ref).reshape(2, -1)
    var = (w * (R - (w * R).sum(1, keepdims=True)) ** 2).sum(1)
    assert var.mean() == pytest.approx(0.5, rel=1e-6)
    path = tmp_path / "task.json"
    long.to_json(str(path))
    back = TokenTask.from_json(str(path))
    assert np.array_equal(back.enumerate().log_pi_ref, f.log_pi_ref) and back.recipe["eos_logit"] == -2.0
    d = json.loads(base.to_json())
    d.pop("eos_logit")
    assert TokenTask.from_dict(d).recipe["eos_logit"] == 0.0
    with pytest.raises(ValueError, match="eos_logit"):
        make_token_task(3, 3, 1, eos_logit=float("nan"))
