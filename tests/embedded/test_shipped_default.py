"""The ready-made fused default committed at models/embedded-default/fused loads offline and generates; its
gate's weights sum to 1 per token; its provenance records the run that made it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "embedded-default" / "fused"


def test_shipped_default_is_complete_and_portable():
    meta = json.loads((SHIPPED / "ultrafuser.json").read_text())
    specs = meta["config"]["specialists"]
    assert [s["domain"] for s in specs] == ["text", "code", "math"]
    assert all(s["path"] == "embedded:smollm2-135m-instruct" for s in specs)
    for s in specs[1:]:  # the stage-2 adapters travel inside the directory
        assert s["adapter"].startswith("./") and (SHIPPED / s["adapter"] / "adapter_model.safetensors").is_file()
    assert (SHIPPED / "gate.safetensors").is_file() and meta["gate_sha256"]
    prov = json.loads((SHIPPED / "provenance.json").read_text())
    assert prov["command"].startswith("ultrafuser embedded run")
    assert set(prov["models"]) == {"specialist:text", "specialist:code", "specialist:math", "uniform", "fused"}
    text = json.dumps(meta) + json.dumps(prov) + "".join(
        p.read_text() for p in SHIPPED.glob("specialists/*/adapter_config.json"))
    assert "/root" not in text and "/home" not in text and "/tmp" not in text and "/work" not in text


def test_shipped_default_generates_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "ultrafuser.cli", "generate", str(SHIPPED), "--prompt",
                        "What is 12 + 30?", "--max-new-tokens", "6", "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 7
    for line in lines:
        assert set(line["weights"]) == {"text", "code", "math"}
        assert sum(line["weights"].values()) == pytest.approx(1, abs=1e-5)
