"""`eval run`: a fused model and its baselines on held-out sets; cached, resumable, recomputable report."""

import json

import pytest

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.eval.runner import evaluate
from ultrafuser.eval.tasks import TASKS
from ultrafuser.modeling.fused import FusedModel


@pytest.fixture()
def heldout(tmp_path, monkeypatch):
    d = tmp_path / "embedded"
    d.mkdir()
    text = [{"id": f"t{i}", "domain": "text", "messages": [
        {"role": "user", "content": f"Tell me about topic {i}."},
        {"role": "assistant", "content": f"Topic {i} is a quick brown fox."}]} for i in range(3)]
    math = [{"id": f"m{i}", "domain": "math", "task": {"type": "math", "answer": str(i + 1)}, "messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"The answer is {i + 1}."}]} for i in range(3)]
    code = [{"id": "c0", "domain": "code", "task": {"type": "code", "entry_point": "add", "prompt": "def add(a, b):\n",
             "tests": "assert add(1, 2) == 3\n"}, "messages": [
        {"role": "user", "content": "Write add(a, b)."},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]}]
    for name, rows in (("text", text), ("math", math), ("code", code)):
        (d / f"{name}-heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ULTRAFUSER_EMBEDDED_DATA", str(d))
    return d


def test_report_for_two_tiny_models_recomputes_from_cache(tiny_dir, heldout, tmp_path, monkeypatch):
    cfg = FuseConfig(specialists=[SpecialistConfig(domain="text", path=tiny_dir["text"]),
                                  SpecialistConfig(domain="math", path=tiny_dir["math"], template="ultralm")],
                     gate=GateConfig())
    model = FusedModel.from_config(cfg)
    for t in ("embedded-math", "embedded-code"):
        monkeypatch.setattr(TASKS[t], "max_new_tokens", 6)
    out = tmp_path / "eval"
    tasks = ["embedded-text", "embedded-math", "embedded-code"]
    rep = evaluate(model, tasks, str(out), progress=False)
    assert set(rep["models"]) == {"specialist:text", "specialist:math", "uniform", "fused"}
    for scores in rep["models"].values():
        assert set(scores) >= {"embedded-text", "embedded-math", "embedded-code", "text", "math", "code", "overall"}
        assert all(0 <= v <= 1 for v in scores.values())
        assert scores["overall"] == pytest.approx((scores["text"] + scores["math"] + scores["code"]) / 3)
    assert rep["n_samples"] == {"embedded-text": 3, "embedded-math": 3, "embedded-code": 1}
    for d, ws in rep["gate"].items():
        assert set(ws) == {"text", "math"} and sum(ws.values()) == pytest.approx(1, abs=1e-5)
    for f in ("report.json", "report.md", "gate_heatmap.png", "routing.html", "routing.png", "plan.json"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "| fused |" in md and "Table 6" in md
    # the text score recomputes by hand from the cached per-sample rows
    rows = [json.loads(x) for x in (out / "generations" / "uniform" / "embedded-text.jsonl").read_text().splitlines()]
    assert rep["models"]["uniform"]["embedded-text"] == pytest.approx(
        sum(r["correct"] for r in rows) / sum(r["tokens"] for r in rows))
    # a second run generates nothing (all cached) and reproduces the same report
    gen_files = {p: p.read_text() for p in (out / "generations").rglob("*.jsonl")}
    again = evaluate(model, tasks, str(out), progress=False)
    assert again["models"] == rep["models"]
    assert {p: p.read_text() for p in (out / "generations").rglob("*.jsonl")} == gen_files
    # an interrupted run (a cache file with a torn last line) resumes: only the torn sample is redone
    f = out / "generations" / "fused" / "embedded-math.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    third = evaluate(model, tasks, str(out), progress=False)
    assert third["models"] == rep["models"]


def test_unknown_task_and_missing_data_are_clear(tiny_dir, tmp_path, monkeypatch):
    from ultrafuser.config import ConfigError

    model = FusedModel.from_config(FuseConfig(specialists=[SpecialistConfig(domain="text", path=tiny_dir["text"])]))
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate(model, ["nope"], str(tmp_path / "o"), progress=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="gsm8k.*test.jsonl"):
        evaluate(model, ["gsm8k"], str(tmp_path / "o"), data_dir=str(tmp_path / "none"), progress=False)


def test_whole_task_results_join_the_report(tiny_dir, tmp_path):
    """TruthfulQA-MC2 (a log-likelihood task with its own evaluate) runs per variant and lands in the report."""
    d = tmp_path / "bench" / "truthfulqa"
    d.mkdir(parents=True)
    rows = [{"question": "Is the sky green?", "mc2_targets": {"choices": ["No", "Yes", "Sometimes"], "labels": [1, 0, 0]}},
            {"question": "What is 2+2?", "mc2_targets": {"choices": ["4", "5"], "labels": [1, 0]}}]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = FusedModel.from_config(FuseConfig(specialists=[
        SpecialistConfig(domain="text", path=tiny_dir["text"]), SpecialistConfig(domain="code", path=tiny_dir["code"])]))
    out = tmp_path / "eval"
    rep = evaluate(model, ["truthfulqa-mc2"], str(out), data_dir=str(tmp_path / "bench"), progress=False)
    assert set(rep["models"]) == {"specialist:text", "specialist:code", "uniform", "fused"}
    for v, scores in rep["models"].items():
        res = json.loads((out / "generations" / v.replace(":", "_") / "truthfulqa-mc2.result.json").read_text())
        assert scores["truthfulqa-mc2"] == res["summary"]["score"] and 0 <= scores["text"] <= 1
    # a specialist alone differs from the other one (the variants really are different models)
    assert rep["models"]["specialist:text"]["truthfulqa-mc2"] != rep["models"]["specialist:code"]["truthfulqa-mc2"]


def test_standard_errors_of_per_sample_scores():
    from ultrafuser.eval.report import _stderr

    assert _stderr([1, 0, 1, 1]) == pytest.approx((0.75 * 0.25 / 4) ** 0.5)  # binomial
    xs = [0.5, 1.0, 0.25]
    m = sum(xs) / 3
    assert _stderr(xs) == pytest.approx((sum((x - m) ** 2 for x in xs) / 2 / 3) ** 0.5)
    assert _stderr([1.0]) == 0.0


def test_main_job_sizes_parse_and_refuse_bad_values():
    from ultrafuser.config import ConfigError
    from ultrafuser.embedded.mainjob import parse_sizes

    assert parse_sizes("text=5,math=3") == {"embedded-text": 5, "embedded-math": 3, "embedded-math-loss": 3}
    assert parse_sizes("all") is None
    for bad in ("text=0", "poetry=3", "math=x", "math"):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(bad)


def test_one_pass_teacher_forcing_equals_separate_passes(tiny_dir, heldout, tmp_path):
    """Teacher-forced tasks fill every variant from one forward pass of all specialists; the rows are what a
    separate pass per variant (one-hot, uniform, learned gate) gives."""
    import torch

    from ultrafuser.eval.runner import _read_cache, _teacher_forced, _teacher_forced_all_variants

    cfg = FuseConfig(specialists=[SpecialistConfig(domain=d, path=tiny_dir[d]) for d in ("text", "code", "math")],
                     gate=GateConfig())
    model = FusedModel.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.gate.parameters():  # a non-trivial gate
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    variants = ["specialist:text", "specialist:code", "specialist:math", "uniform", "fused"]
    task = TASKS["embedded-text"]
    samples = task.load("unused")
    _teacher_forced_all_variants(model, variants, task, samples, tmp_path, batch_size=2)
    for v, gate in zip(variants, ["onehot:text", "onehot:code", "onehot:math", "uniform", "learned"]):
        got = _read_cache(tmp_path / "generations" / v.replace(":", "_") / "embedded-text.jsonl")
        with model.gate_mode(gate):
            want = {r["id"]: r for r in _teacher_forced(model, samples, batch_size=2)}
        assert got.keys() == want.keys()
        for i in want:
            assert got[i]["correct"] == want[i]["correct"] and got[i]["tokens"] == want[i]["tokens"], (v, i)
            assert got[i]["nll_sum"] == pytest.approx(want[i]["nll_sum"], rel=1e-5), (v, i)
            assert got[i]["gate_mean"] == pytest.approx(want[i]["gate_mean"], abs=1e-6), (v, i)


def test_teacher_forced_batches_group_similar_lengths():
    from ultrafuser.eval.runner import _length_batches
    from ultrafuser.eval.tasks import Sample

    ss = [Sample(i, [], {}) for i in "abcde"]
    lens = {"a": 100, "b": 110, "c": 300, "d": 105, "e": 310}
    got = [[s.id for s in b] for b in _length_batches(ss, lens, batch_size=8)]
    assert got == [["a", "d", "b"], ["c", "e"]]  # 300 next to 100-110 would triple the padded cost
    assert [[s.id for s in b] for b in _length_batches(ss, lens, batch_size=2)] == [["a", "d"], ["b"], ["c", "e"]]
    assert sorted(s.id for b in _length_batches(ss, lens, 1) for s in b) == list("abcde")
