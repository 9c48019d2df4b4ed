"""Two processes (gloo, CPU) reach the same losses as one process with the same global batch.

Each process takes n / 2 of every domain's n examples per step; the loss is the token mean over the
whole step on all processes, so the two runs compute the same quantity and differ only in float summation
order (DDP averages gradients across processes; each process runs one intra-op thread). Tolerance:
1e-5 relative on every per-step loss, per-domain loss and gate weight.

The fast test forks two ranks with the environment `torchrun` gives them (RANK, WORLD_SIZE, MASTER_ADDR,
...), so `Accelerator` sets up MULTI_CPU/gloo exactly as under a launcher; the slow test goes through
`accelerate launch` itself.
"""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import fork_training, read_jsonl, run_inproc, train_config

TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(cfg, timeout: float = 240.0) -> list[int]:
    port = free_port()
    pids = [fork_training(cfg, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    codes: dict[int, int] = {}
    deadline = time.time() + timeout
    while len(codes) < 2 and time.time() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = -9
    return [codes[p] for p in pids]


def assert_close_runs(a_dir: Path, b_dir: Path) -> None:
    a, b = read_jsonl(a_dir / "metrics.jsonl"), read_jsonl(b_dir / "metrics.jsonl")
    assert [x["step"] for x in a] == [x["step"] for x in b] and a
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["seq_tokens"] == y["seq_tokens"]
        assert math.isclose(x["loss"], y["loss"], rel_tol=TOL), (x["step"], x["loss"], y["loss"])
        for d in x["loss_by_domain"]:
            assert math.isclose(x["loss_by_domain"][d], y["loss_by_domain"][d], rel_tol=TOL)
            for s in x["gate"][d]:
                assert math.isclose(x["gate"][d][s], y["gate"][d][s], rel_tol=TOL)
    assert read_jsonl(a_dir / "samples.jsonl") == read_jsonl(b_dir / "samples.jsonl")


def cfg_for(out, fused_dir, data_file):
    return train_config(out, fused_dir, data_file, stage1__steps=2, stage2__steps=2, stage2__trainable="full",
                        stage1__micro_batch=2, stage2__micro_batch=2, save_every=100)


def test_two_processes_reach_the_same_losses_as_one(tmp_path, fused_dir, data_file):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_inproc(cfg_for(one, fused_dir, data_file)) == 0
    assert run_two_ranks(cfg_for(two, fused_dir, data_file)) == [0, 0]
    assert_close_runs(one, two)
    assert (two / "final" / "specialists" / "math" / "model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_launch_two_processes_on_cpu(tmp_path, fused_dir, data_file):
    """The real launcher: `accelerate launch --multi_gpu --num_processes 2` (on a CPU-only host the script's
    `Accelerator(cpu=True)` makes it MULTI_CPU / gloo; `--cpu` alone would start a single process)."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    import yaml

    one, two = tmp_path / "one", tmp_path / "two"
    assert run_inproc(cfg_for(one, fused_dir, data_file)) == 0
    cfg = cfg_for(two, fused_dir, data_file)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "ultrafuser.cli", "train",
           str(p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_runs(one, two)
