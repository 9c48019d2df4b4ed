"""The balanced sampler (paper §2.3): exact counts, determinism, no repeats before exhaustion, exact resume."""

import json

import pytest

from ultrafuser.data.sampler import BalancedSampler, SamplerError, plan_micro_batches

SIZES = {"text": 11, "code": 7, "math": 4}


def stream(sampler, n, steps):
    return [sampler.next_step(n) for _ in range(steps)]


def test_exactly_n_per_domain_and_no_duplicate_within_a_step():
    s = BalancedSampler(SIZES, seed=3)
    for step in stream(s, 3, 40):
        assert list(step.indices) == list(SIZES)
        for d, idx in step.indices.items():
            assert len(idx) == 3
            assert len(set(idx)) == 3, (d, idx)
            assert all(0 <= i < SIZES[d] for i in idx)


def test_deterministic_under_a_seed():
    a = [x.indices for x in stream(BalancedSampler(SIZES, seed=7), 3, 10)]
    b = [x.indices for x in stream(BalancedSampler(SIZES, seed=7), 3, 10)]
    c = [x.indices for x in stream(BalancedSampler(SIZES, seed=8), 3, 10)]
    assert a == b
    assert a != c


@pytest.mark.parametrize("n", [1, 3, 4])
def test_each_walk_visits_every_example_once_before_reshuffling(n):
    s = BalancedSampler(SIZES, seed=1)
    steps = stream(s, n, 30)
    for d, size in SIZES.items():
        draws = [i for st in steps for i in st.indices[d]]
        walks = [draws[k : k + size] for k in range(0, len(draws) - size + 1, size)]
        assert len(walks) >= 2
        for w in walks:
            assert sorted(w) == list(range(size)), (d, w)
        assert len({tuple(w) for w in walks}) > 1  # a new walk is a new order


def test_small_domain_is_rewalked_and_reported():
    s = BalancedSampler(SIZES, seed=0)
    steps = stream(s, 3, 3)  # 9 draws each: math (4 examples) re-walked twice, code (7) once, text (11) never
    flagged = [d for st in steps for d in st.rewalked]
    assert flagged.count("math") == 2 and flagged.count("code") == 1 and "text" not in flagged
    assert s.state_dict()["domains"]["math"]["epoch"] == 2


def test_state_is_plain_json_and_resumes_exactly():
    ref = BalancedSampler(SIZES, seed=5)
    want = [x.indices for x in stream(ref, 3, 12)]
    s = BalancedSampler(SIZES, seed=5)
    got = [x.indices for x in stream(s, 3, 5)]
    state = json.loads(json.dumps(s.state_dict()))
    s2 = BalancedSampler(SIZES, seed=5)
    s2.load_state_dict(state)
    got += [x.indices for x in stream(s2, 3, 7)]
    assert got == want


def test_clear_errors():
    with pytest.raises(SamplerError, match=r"'math' has 4.*at most 4"):
        BalancedSampler(SIZES, seed=0).next_step(5)
    with pytest.raises(SamplerError, match="no training examples"):
        BalancedSampler({"text": 3, "math": 0}, seed=0)
    s = BalancedSampler(SIZES, seed=0)
    with pytest.raises(SamplerError, match="unknown key"):
        s.load_state_dict({**s.state_dict(), "bogus": 1})
    with pytest.raises(SamplerError, match="seed"):
        BalancedSampler(SIZES, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(SamplerError, match="data changed"):
        BalancedSampler({**SIZES, "math": 5}, seed=0).load_state_dict(s.state_dict())


def test_micro_batches_and_processes_split_a_step_without_changing_it():
    step = BalancedSampler(SIZES, seed=0).next_step(4)
    whole = plan_micro_batches(step, 0, 1, 5)
    assert [len(m) for m in whole] == [5, 5, 2]
    assert sorted(x for m in whole for x in m) == sorted((d, i) for d, idx in step.indices.items() for i in idx)
    parts = [plan_micro_batches(step, r, 2, 3) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    union = sorted(x for p in parts for m in p for x in m)
    assert union == sorted(x for m in whole for x in m)
    for p in parts:
        flat = [x for m in p for x in m]
        assert all(sum(1 for d, _ in flat if d == dom) == 2 for dom in SIZES)
    with pytest.raises(SamplerError, match="multiple of 3"):
        plan_micro_batches(step, 0, 3, 4)
