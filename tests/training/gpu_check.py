"""Manual GPU check of the training entry point (not collected by pytest; needs CUDA):

    PYTHONPATH=src python tests/training/gpu_check.py OUT_DIR

1. one GPU, precision auto (bf16 where supported), stage 1 + stage 2 (LoRA): runs, loss finite, final dir loads;
2. one GPU, fp32: SIGKILL inside gradient accumulation, resume, compare every per-step loss with an uninterrupted
   run (reported, not asserted: CUDA kernels may use atomics);
3. FSDP (configs/accelerate/fsdp.yaml) with one process, bf16 specialists: stage 1 run, then stage 2 (full) from
   its output (checkpoint and export dtypes reported: fp32 master weights under the config's bf16 mixed precision);
4. one GPU, bf16 specialists, stage 2 full with fp32 master weights (the default): checkpoint weights fp32, the
   export bf16 and equal to them rounded; killed and resumed, the final checkpoint compared with an uninterrupted
   run (reported).
Prints and writes OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "training"), str(ROOT / "tests"), str(ROOT / "src")]


def sh(cmd, env=None, timeout=300):
    t = time.time()
    r = subprocess.run(cmd, check=False, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    text = r.stdout + r.stderr
    if r.returncode not in (0, -9):  # show the first traceback, not the launcher's
        i = text.find("Traceback")
        print("\n".join(text[i if i >= 0 else 0 :].splitlines()[:60]), file=sys.stderr)
    return {"cmd": " ".join(map(str, cmd[-6:])), "rc": r.returncode, "seconds": round(time.time() - t, 1),
            "tail": text[-1500:]}


def metrics(out):
    p = Path(out) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def main(out: Path, only_fsdp: bool = False) -> None:
    import yaml
    from tinymodels import make_llama, make_lora, make_tokenizer
    from trainkit import make_records

    from ultrafuser.data.records import write_records

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    paths = {d: make_llama(out / "tiny" / d, tok, seed=i + 1) for i, d in enumerate(("text", "code", "math"))}
    del make_lora
    write_records(make_records(), out / "train.jsonl")
    py = sys.executable
    cli = [py, "-m", "ultrafuser.cli"]
    res = {"fuse": sh(cli + ["fuse", "--out", str(out / "fused")] + [f"--specialist={d}={p}" for d, p in paths.items()])}
    base = {"model": str(out / "fused"), "data": {"train": [str(out / "train.jsonl")], "max_length": 128},
            "save_every": 1, "keep_last": 3,
            "stage1": {"steps": 3, "per_domain": 2, "micro_batch": 4, "lr": 5e-2},
            "stage2": {"steps": 3, "per_domain": 2, "micro_batch": 4, "lr": 1e-2, "trainable": "lora", "lora_r": 4}}

    def cfg(name, **over):
        tree = json.loads(json.dumps(base))
        for k, v in over.items():
            node = tree
            ks = k.split(".")
            for x in ks[:-1]:
                node = node.setdefault(x, {})
            node[ks[-1]] = v
        tree["output_dir"] = str(out / name)
        p = out / f"{name}.yaml"
        p.write_text(yaml.safe_dump(tree))
        return str(p)

    if only_fsdp:
        return fsdp(out, res, cfg, py, cli, paths)
    # 1. auto precision on one GPU
    res["auto"] = sh(cli + ["train", cfg("auto", precision="auto")])
    res["auto_loss"] = [m["loss"] for m in metrics(out / "auto")]
    res["auto_generate"] = sh(cli + ["generate", str(out / "auto" / "final"), "--prompt", "hi", "--max-new-tokens", "3"])
    # 2. fp32 kill + resume vs uninterrupted
    res["ref"] = sh(cli + ["train", cfg("ref", precision="fp32")])
    c = cfg("killed", precision="fp32")
    res["kill"] = sh(cli + ["train", c], env={"ULTRAFUSER_FAULT": "accum@3=kill"})
    res["resume"] = sh(cli + ["train", c, "--resume"])
    a, b = metrics(out / "ref"), metrics(out / "killed")
    res["resume_losses"] = [(x["loss"], y["loss"]) for x, y in zip(a, b)]
    res["resume_bit_identical"] = [x["loss"] for x in a] == [y["loss"] for y in b]
    master(out, res, cfg, cli, paths)
    fsdp(out, res, cfg, py, cli, paths)


def fuse16(out, res, cli, paths):
    if not (out / "fused16").is_dir():
        res["fuse_bf16"] = sh(cli + ["fuse", "--out", str(out / "fused16"), "--dtype", "bfloat16"]
                              + [f"--specialist={d}={p}" for d, p in paths.items()])


def master(out, res, cfg, cli, paths):
    # 4. bf16 specialists, stage 2 full, fp32 master weights
    import torch
    from safetensors.torch import load_file

    fuse16(out, res, cli, paths)
    over = {"model": str(out / "fused16"), "precision": "auto", "stage1.steps": 0, "stage2.steps": 3,
            "stage2.trainable": "full", "stage2.lr": 1e-5}
    res["master"] = sh(cli + ["train", cfg("master", **over)])
    c = cfg("master_killed", **over)
    res["master_kill"] = sh(cli + ["train", c], env={"ULTRAFUSER_FAULT": "accum@2=kill"})
    res["master_resume"] = sh(cli + ["train", c, "--resume"])
    try:
        ck = load_file(str(out / "master" / "checkpoints" / "step-00000003" / "model.safetensors"))
        k = next(x for x in ck if x.startswith("models.0.") and x.endswith("up_proj.weight"))
        ex = load_file(str(next((out / "master" / "final" / "specialists" / "text").glob("*.safetensors"))))
        kk = k.removeprefix("models.0.")
        res["master_checkpoint_dtype"] = str(ck[k].dtype)
        res["master_export_dtype"] = str(ex[kk].dtype)
        res["master_export_is_rounded_master"] = bool(torch.equal(ex[kk], ck[k].to(torch.bfloat16)))
        ck2 = load_file(str(out / "master_killed" / "checkpoints" / "step-00000003" / "model.safetensors"))
        res["master_resume_max_abs_diff"] = max(float((ck[x].float() - ck2[x].float()).abs().max()) for x in ck)
        res["master_losses"] = [m["loss"] for m in metrics(out / "master")]
    except Exception as e:  # noqa: BLE001 - reported, not raised
        res["master_error"] = f"{type(e).__name__}: {e}"


def fsdp(out, res, cfg, py, cli, paths):
    # 3. FSDP, one process, bf16 specialists: stage 1, then stage 2 (full) from its output; the shipped config's
    # mixed precision (bf16) keeps fp32 sharded weights: the checkpoint's specialist weights are fp32, the export bf16
    from safetensors.torch import load_file

    fuse16(out, res, cli, paths)
    acc = [py, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
           "--num_processes", "1", "-m", "ultrafuser.cli", "train"]
    s1 = {"model": str(out / "fused16"), "precision": "auto", "stage2.steps": 0}
    res["fsdp_stage1"] = sh(acc + [cfg("fsdp1", **s1)])
    res["fsdp_stage2"] = sh(acc + [cfg("fsdp2", precision="auto", model=str(out / "fsdp1" / "stage1"),
                                       **{"stage1.steps": 0, "stage2.trainable": "full"})])
    res["fsdp_losses"] = [m["loss"] for m in metrics(out / "fsdp1")] + [m["loss"] for m in metrics(out / "fsdp2")]
    res["fsdp_resume"] = sh(acc + [cfg("fsdp1", **s1), "--resume"])
    try:
        ck = load_file(str(sorted((out / "fsdp2" / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
        k = next(x for x in ck if x.startswith("models.0.") and x.endswith("up_proj.weight"))
        ex = load_file(str(next((out / "fsdp2" / "final" / "specialists" / "text").glob("*.safetensors"))))
        res["fsdp_checkpoint_dtype"] = str(ck[k].dtype)
        res["fsdp_export_dtype"] = str(ex[k.removeprefix("models.0.")].dtype)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        res["fsdp_dtype_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(res, indent=1))
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), only_fsdp="fsdp" in sys.argv[2:])
