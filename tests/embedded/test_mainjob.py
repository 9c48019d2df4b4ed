"""The main job end to end at a reduced size (tiny random specialists, a few steps, a few examples)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import make_lora

REPO = Path(__file__).resolve().parents[2]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def small_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for split, n in (("train", 6), ("heldout", 2)):
        _write(d / f"text-{split}.jsonl", [{"id": f"t{split}{i}", "domain": "text", "source": "test", "messages": [
            {"role": "user", "content": f"Tell me about apples {i}."},
            {"role": "assistant", "content": f"Apples {i} are a quick brown fox."}]} for i in range(n)])
        _write(d / f"math-{split}.jsonl", [{"id": f"m{split}{i}", "domain": "math", "source": "test",
                                             "task": {"type": "math", "answer": str(i + 3)}, "messages": [
            {"role": "user", "content": f"Tom has {i} apples and buys 3 more. How many?"},
            {"role": "assistant", "content": f"Step 1: {i} + 3 = {i + 3}.\nThe answer is {i + 3}."}]} for i in range(n)])
        _write(d / f"code-{split}.jsonl", [{"id": f"c{split}{i}", "domain": "code", "source": "test", "task": {
            "type": "code", "entry_point": "add", "prompt": "def add(a, b):\n", "tests": f"assert add({i}, 1) == {i + 1}\n"},
            "messages": [{"role": "user", "content": f"Write add(a, b) #{i}."},
                         {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]}
            for i in range(n)])
    return d


# ~45 s on the idle 2-core machine (tiny models): part of the default run
def test_main_job_reduced(tiny_dir, small_data, tmp_path):
    adapters = tmp_path / "adapters"
    make_lora(tiny_dir["text"], adapters / "code", seed=11)
    make_lora(tiny_dir["text"], adapters / "math", seed=12)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "ultrafuser.cli", "embedded", "run", "--out", str(out), "--base", tiny_dir["text"],
           "--adapters", str(adapters), "--data-dir", str(small_data), "--limit", "2", "--publish", str(tmp_path / "pub"), "--seeds", "0,1",
           "stage1.steps=2", "stage1.per_domain=1", "stage1.micro_batch=3", "stage2.steps=1",
           "stage2.per_domain=1", "stage2.micro_batch=3", "save_every=1", "data.max_length=256"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    names = {"specialist:text", "specialist:code", "specialist:math", "uniform", "fused"}
    assert set(rep["models"]) == names
    for scores in rep["models"].values():
        assert set(scores) == {"text", "code", "math", "overall"}
        assert scores["overall"] == pytest.approx((scores["text"] + scores["code"] + scores["math"]) / 3)
    assert rep["higher_is_better"] is True
    assert set(rep["heldout_loss"]) == names
    assert all(set(x) == {"text", "code", "math"} and min(x.values()) > 0 for x in rep["heldout_loss"].values())
    assert rep["stderr"]["fused"]["embedded-math"] is not None
    assert set(rep["gate"]) == {"text", "code", "math"}
    for ws in rep["gate"].values():
        assert set(ws) == {"text", "code", "math"} and sum(ws.values()) == pytest.approx(1, abs=1e-5)
    for f in ("report.md", "gate_heatmap.png", "routing.html", "routing.png", "train/final/ultrafuser.json",
              "train/metrics.jsonl"):
        assert (out / f).is_file(), f
    assert "| fused |" in r.stdout  # the table is printed
    # every number recomputes from the saved per-sample outputs
    from ultrafuser.eval.code import score_function_tasks
    from ultrafuser.eval.mathans import is_equivalent

    gen = out / "eval" / "generations"
    for v in names:
        rows = [json.loads(x) for x in (gen / v.replace(":", "_") / "embedded-text.jsonl").read_text().splitlines()]
        assert rep["models"][v]["text"] == pytest.approx(sum(x["correct"] for x in rows) / sum(x["tokens"] for x in rows))
        held = {json.loads(x)["id"]: json.loads(x) for x in (small_data / "math-heldout.jsonl").read_text().splitlines()}
        rows = [json.loads(x) for x in (gen / v.replace(":", "_") / "embedded-math.jsonl").read_text().splitlines()]
        want = sum(is_equivalent(x["answer"], held[x["id"]]["task"]["answer"]) for x in rows) / len(rows)
        assert rep["models"][v]["math"] == pytest.approx(want)
        held = {json.loads(x)["id"]: json.loads(x) for x in (small_data / "code-heldout.jsonl").read_text().splitlines()}
        rows = [json.loads(x) for x in (gen / v.replace(":", "_") / "embedded-code.jsonl").read_text().splitlines()]
        summary, verdicts = score_function_tasks([{"task": held[x["id"]]["task"], "completion": x["answer"]} for x in rows])
        assert rep["models"][v]["code"] == pytest.approx(sum(v_["passed"] for v_ in verdicts) / len(verdicts))
    # the baselines are the specialists as they were before fusion (stage 2 trains their adapters): the cached
    # teacher-forced row of specialist:code equals the untrained fused directory's one-hot pass
    import torch

    from ultrafuser.eval.runner import _teacher_forced
    from ultrafuser.eval.tasks import get_tasks
    from ultrafuser.modeling.fused import FusedModel

    os.environ["ULTRAFUSER_EMBEDDED_DATA"] = str(small_data)
    sample = get_tasks(["embedded-text"])[0].load("")[0]
    cached = {json.loads(x)["id"]: json.loads(x)
              for x in (gen / "specialist_code" / "embedded-text.jsonl").read_text().splitlines()}[sample.id]
    for d, same in (("fused", True), ("train/final", False)):
        m = FusedModel.from_pretrained(out / d)
        with m.gate_mode("onehot:code"):
            row = _teacher_forced(m, [sample], 1)[0]
        assert (row["nll_sum"] == pytest.approx(cached["nll_sum"], rel=1e-5)) is same, d
    # --seeds 0,1: seed 1 re-trained and its fused model evaluated; the spread is reported
    seeds = rep["seeds"]
    assert set(seeds["fused"]) == {"0", "1"} and seeds["fused"]["0"] == rep["models"]["fused"]
    seed1 = json.loads((out / "seed-1" / "eval" / "report.json").read_text())
    assert set(seed1["models"]) == {"fused"}
    assert seeds["fused"]["1"] == {k: seed1["models"]["fused"][k] for k in ("text", "code", "math", "overall")}
    for k in ("text", "code", "math", "overall"):
        v = [seeds["fused"][s][k] for s in ("0", "1")]
        assert seeds["mean"][k] == pytest.approx(sum(v) / 2) and seeds["range"][k] == [min(v), max(v)]
    assert "Seed spread" in r.stdout
    # --publish copied the trained model with its provenance (no paths of this machine in it)
    prov = json.loads((tmp_path / "pub" / "provenance.json").read_text())
    assert prov["models"] == rep["models"] and prov["command"].startswith("ultrafuser embedded run")
    assert str(tmp_path) not in json.dumps(prov)
    assert (tmp_path / "pub" / "gate.safetensors").is_file() and (tmp_path / "pub" / "ultrafuser.json").is_file()
    # the published model loads in float32 on any CPU; the provenance keeps the dtype the run computed in
    run_cfg = json.loads((out / "train" / "final" / "ultrafuser.json").read_text())["config"]["specialists"]
    pub_cfg = json.loads((tmp_path / "pub" / "ultrafuser.json").read_text())["config"]["specialists"]
    assert {sp["dtype"] for sp in pub_cfg} == {"float32"}
    assert prov["machine"]["specialists_dtype"] == ",".join(sorted({sp["dtype"] for sp in run_cfg}))
    # the trained fused directory generates through the CLI
    g = subprocess.run([sys.executable, "-m", "ultrafuser.cli", "generate", str(out / "train" / "final"), "--prompt",
                        "hi", "--max-new-tokens", "3", "--json"], capture_output=True, text=True, env=env, cwd=REPO)
    assert g.returncode == 0, g.stderr[-2000:]
    for line in g.stdout.splitlines():
        assert sum(json.loads(line)["weights"].values()) == pytest.approx(1, abs=1e-5)


def test_adapter_recipes_parse():
    from ultrafuser.config import load_yaml
    from ultrafuser.embedded.adapters import AdapterRecipe

    for d in ("code", "math"):
        r = load_yaml(REPO / "configs" / "embedded" / f"adapter-{d}.yaml", AdapterRecipe)
        assert r.domain == d and r.train == [f"data/embedded/{d}-train.jsonl"] and r.seed == 0


def test_bundled_data_splits_are_disjoint():
    for d in ("code", "math"):
        train = [json.loads(x) for x in (REPO / "data" / "embedded" / f"{d}-train.jsonl").read_text().splitlines()]
        held = [json.loads(x) for x in (REPO / "data" / "embedded" / f"{d}-heldout.jsonl").read_text().splitlines()]
        assert len(held) >= 40 and len(train) >= 800
        assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held}
        assert all(r["domain"] == d and r["task"]["type"] == d for r in train + held)


@pytest.mark.parametrize("domain", ["code", "math"])
def test_committed_adapters_load_and_differ_from_base(domain):
    """The committed adapter is a valid safetensors LoRA whose update B·A is non-zero (so it changes the base),
    recorded with its recipe, and names the base portably."""
    from safetensors.torch import load_file

    d = REPO / "models" / "embedded-default" / "adapters" / domain
    cfg = json.loads((d / "adapter_config.json").read_text())
    rec = json.loads((d / "recipe.json").read_text())
    assert cfg["base_model_name_or_path"] == "embedded:smollm2-135m-instruct" and cfg["r"] == rec["recipe"]["lora_r"]
    w = load_file(str(d / "adapter_model.safetensors"))
    a = {k: v for k, v in w.items() if "lora_A" in k}
    assert len(a) == 30 * 7  # 30 layers x 7 linear layers
    delta = max(float((w[k.replace("lora_A", "lora_B")].float() @ v.float()).abs().max()) for k, v in a.items())
    assert delta > 1e-3
    rec = json.loads((d / "recipe.json").read_text())
    assert rec["recipe"]["seed"] == 0 and rec["command"].endswith(f"adapter-{domain}.yaml")
    assert rec["final_loss_mean_last5"] < rec["first_loss"]
