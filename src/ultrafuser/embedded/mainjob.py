"""The main job on the embedded default (`bash scripts/main.sh` = `ultrafuser embedded run`):

1. the base: SmolLM2-135M-Instruct, rebuilt once from the shipped GGUF into a cached safetensors model;
2. fuse the three specialists — text = the instruct model, code / math = the base + the committed LoRA
   adapters (`models/embedded-default/adapters/`, made by `configs/embedded/adapter-*.yaml`);
3. train: stage 1 (the gate only, frozen specialists, cached hidden states), then a brief stage 2 (the gate
   and the specialists' LoRA adapters), balanced over the three domains (`configs/embedded/fuser.yaml`);
4. evaluate the three specialists alone and uniform logit averaging — the specialists as they were before
   fusion (stage 2 changes their adapters) — and the trained fuser on the held-out text, code and math sets
   (`data/embedded/*-heldout.jsonl`; `--humaneval` adds HumanEval);
5. write `runs/embedded/report.json` (+ report.md, gate heat map, token routing) and print the table.

`--seeds 0,1,2` repeats training and the fused model's evaluation for every further seed (`seed-N/` under the
output folder; the baselines decode greedily from fixed models, so they do not change with the seed) and reports
the fused scores' spread over seeds: the run-to-run noise the paper-claim check compares against.

Everything goes under `--out` (default `runs/embedded/`, git-ignored); a re-run resumes: training from its
last checkpoint, evaluation from its cached generations.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ultrafuser.config import ConfigError

ADAPTERS = Path("models/embedded-default/adapters")
SHIPPED = Path("models/embedded-default/fused")  # the ready-made fused default (made by `--publish`)
FUSER_CONFIG = Path("configs/embedded/fuser.yaml")
TASKS = ["embedded-text", "embedded-code", "embedded-math"]
LOSS_TASKS = ["embedded-code-loss", "embedded-math-loss"]  # held-out loss of code / math (text's is in its task)
# Held-out samples evaluated per domain by default: what fits the 15-minute budget on 2 CPU cores with native bf16
# (generating with 5 models dominates the evaluation; teacher-forced text is one pass of the specialists). Small
# samples mean wide error bars (reported); the full sets are text 48, code 40, math 60 (`--sizes all`).
DEFAULT_SIZES = "text=48,code=16,math=20"
SCORES = ("text", "code", "math", "overall")  # the report's per-model keys (domain scores and their mean)


def parse_sizes(spec: str) -> dict[str, int] | None:
    """`text=48,code=20,math=30` -> per-task sample limits; `all` -> None (every held-out sample)."""
    if spec.strip() == "all":
        return None
    out: dict[str, int] = {}
    for item in spec.split(","):
        dom, _, n = item.partition("=")
        if dom.strip() not in ("text", "code", "math") or not n.strip().isdigit() or int(n) < 1:
            raise ConfigError(f"--sizes {spec!r}: use DOMAIN=N items (text, code, math; N >= 1), or 'all'")
        out[f"embedded-{dom.strip()}"] = int(n)
        if dom.strip() != "text":
            out[f"embedded-{dom.strip()}-loss"] = int(n)
    return out


def register(sub) -> None:
    r = sub.add_parser("run", help="the main job: fuse, train (stage 1 + 2), evaluate, report")
    r.add_argument("--out", default="runs/embedded")
    r.add_argument("--config", default=str(FUSER_CONFIG), help="the fusion training config")
    r.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"held-out samples per domain (default {DEFAULT_SIZES}; 'all' = every one)")
    r.add_argument("--limit", type=int, help="evaluate only the first N held-out samples per task (overrides --sizes)")
    r.add_argument("--humaneval", action="store_true", help="also evaluate HumanEval (164 problems; --limit applies)")
    r.add_argument("--base", default="embedded:smollm2-135m-instruct", help="base model of the three specialists")
    r.add_argument("--adapters", default=str(ADAPTERS), help="folder with the code/ and math/ LoRA adapters")
    r.add_argument("--data-dir", default="data/embedded", help="folder with {text,code,math}-{train,heldout}.jsonl")
    r.add_argument("--publish", nargs="?", const=str(SHIPPED), metavar="DIR",
                   help=f"also copy the trained fused model (+ its provenance) to DIR (default {SHIPPED})")
    r.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0); the first is the main "
                   "run, the others re-train and re-evaluate the fused model to measure the seed spread")
    r.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    r.set_defaults(func=run)


def fuse(out: Path, dtype: str, base: str, adapters: Path) -> Path:
    from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
    from ultrafuser.modeling.fused import fresh_gate_state, save_fused_dir
    from ultrafuser.modeling.specialists import read_model_config, resolve_model_path

    for d in ("code", "math"):
        if not (adapters / d / "adapter_model.safetensors").is_file():
            raise ConfigError(f"the {d} adapter is missing at {adapters / d}; make it with "
                              f"`ultrafuser embedded train-adapter configs/embedded/adapter-{d}.yaml`")
    specs = [SpecialistConfig(domain="text", path=base, dtype=dtype)] + [
        SpecialistConfig(domain=d, path=base, adapter=str((adapters / d).resolve()), dtype=dtype) for d in ("code", "math")]
    cfg = FuseConfig(specialists=specs, gate=GateConfig(mode="learned"))
    hidden = read_model_config(resolve_model_path(base), specs[0])["hidden_size"]
    save_fused_dir(out, cfg, fresh_gate_state(cfg, [hidden] * 3, seed=0), extra={"hidden_sizes": [hidden] * 3})
    return out


def run(args) -> int:
    from ultrafuser.config import TrainConfig, load_yaml
    from ultrafuser.embedded.base import cpu_has_native_bf16, resolve
    from ultrafuser.eval.runner import evaluate
    from ultrafuser.modeling.cli import _quiet_transformers
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.training.loop import run as train

    _quiet_transformers()
    limit = args.limit if args.limit else parse_sizes(args.sizes)  # bad sizes fail before any work
    seeds = parse_seeds(args.seeds)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    _say("1/5 base model (built once from the shipped GGUF, then cached)")
    if args.base.startswith("embedded:"):
        resolve(args.base.split(":", 1)[1])
    timings["base_s"] = round(time.time() - t0, 1)
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    _say(f"2/5 fuse: text = {args.base}, code / math = the same base + LoRA adapters ({dtype})")
    fuse(out / "fused", dtype, args.base, Path(args.adapters))
    data = Path(args.data_dir)
    os.environ["ULTRAFUSER_EMBEDDED_DATA"] = str(data)  # where the held-out tasks read from
    if not (data / "text-train.jsonl").is_file() or not (data / "text-heldout.jsonl").is_file():
        # The text domain's replies are self-distilled from the text specialist; built once, then reused.
        from ultrafuser.embedded.textdata import build as build_text

        _say(f"    building the text-domain data once into {data} (self-distilled replies; slow on a CPU)")
        build_text(300, 48, str(data))
    train_files = [str(data / f"{d}-train.jsonl") for d in ("text", "code", "math")]

    def train_seed(seed: int, run_dir: Path) -> int:
        cfg = load_yaml(args.config, TrainConfig, [f"model={out / 'fused'}", f"output_dir={run_dir / 'train'}",
                                                   f"data.train={json.dumps(train_files)}", *args.overrides, f"seed={seed}"])
        ck = run_dir / "train" / "checkpoints"
        return train(cfg, resume=ck.is_dir() and any(ck.iterdir()))

    _say(f"3/5 train (seed {seeds[0]}): stage 1 (gate) then stage 2 (gate + adapters)")
    t = time.time()
    code = train_seed(seeds[0], out)
    if code != 0:
        return code
    timings["train_s"] = round(time.time() - t, 1)
    _say("4/5 evaluate: each specialist, uniform averaging (the specialists before fusion), the trained fuser")
    t = time.time()
    tasks = TASKS + LOSS_TASKS + (["humaneval"] if args.humaneval else [])
    # generation batches hold every sample (one batch per task); teacher-forced batches stay small, since each
    # holds (batch x reply tokens x 49k) fp32 logits for every specialist
    kw = dict(limit=limit, batch_size=64, tf_batch_size=8)
    base_model = FusedModel.from_pretrained(out / "fused")  # the original specialists (untrained gate)
    baselines = [f"specialist:{d}" for d in base_model.domains] + ["uniform"]
    evaluate(base_model, tasks, str(out / "eval"), variants=baselines, **kw)
    del base_model
    model = FusedModel.from_pretrained(out / "train" / "final")
    # the baselines' cached outputs are reused; only the trained fuser is evaluated here (+ its gate profile)
    rep = evaluate(model, tasks, str(out / "eval"), variants=baselines + ["fused"], **kw)
    del model
    timings["eval_s"] = round(time.time() - t, 1)
    seed_runs = {}
    for seed in seeds[1:]:
        _say(f"    seed {seed}: train, then evaluate the fused model (under {out / f'seed-{seed}'})")
        t = time.time()
        code = train_seed(seed, out / f"seed-{seed}")
        if code != 0:
            return code
        m = FusedModel.from_pretrained(out / f"seed-{seed}" / "train" / "final")
        r = evaluate(m, tasks, str(out / f"seed-{seed}" / "eval"), variants=["fused"], **kw)
        del m
        seed_runs[seed] = _scores(r["models"]["fused"])
        timings[f"seed_{seed}_s"] = round(time.time() - t, 1)
    _say("5/5 report")
    report = {
        "models": {v: _scores(s) for v, s in rep["models"].items()},
        "gate": rep["gate"],
        "higher_is_better": True,
        "metrics": {"text": "token accuracy on held-out replies (embedded-text)",
                    "code": "unit-test pass rate on held-out function tasks (embedded-code)",
                    "math": "exact final answer on held-out word problems (embedded-math)",
                    "overall": "mean of text, code, math"},
        "tasks": rep["models"],
        "n_samples": rep["n_samples"],
        "stderr": {v: {t: d.get("stderr") for t, d in ds.items()} for v, ds in rep["details"].items()},
        "heldout_loss": rep["heldout_loss"],
        "noise": "stderr = standard error of the mean over the held-out samples (sampling noise only)"
                 + ("; seeds = the fused model re-trained with other seeds (run-to-run noise)" if seed_runs else ""),
        "timings_s": {**timings, "total_s": round(time.time() - t0, 1)},
        "config": str(args.config),
        "eval_dir": "eval (cached generations: eval/generations/; the report recomputes from them)",
    }
    if seed_runs:
        report["seeds"] = seed_summary({seeds[0]: report["models"]["fused"], **seed_runs})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for f in ("report.md", "gate_heatmap.png", "routing.html", "routing.png"):
        if (out / "eval" / f).is_file():
            shutil.copy2(out / "eval" / f, out / f)
    if seed_runs:
        with open(out / "report.md", "a") as f:
            f.write("\n" + seed_table(report["seeds"]))
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.json in {report['timings_s']['total_s']} s")
    if args.publish:
        publish(out, Path(args.publish), report, sys.argv[1:])
        _say(f"published the trained fused model to {args.publish}")
    return 0


def _scores(model_scores: dict) -> dict:
    return {k: model_scores[k] for k in SCORES if k in model_scores}


def parse_seeds(spec: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2] (distinct integers; the first is the main run)."""
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {spec!r}: give distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def seed_summary(per_seed: dict[int, dict]) -> dict:
    """The fused model's scores per seed, their mean and (sample) standard deviation, and the range."""
    import statistics

    keys = [k for k in SCORES if all(k in s for s in per_seed.values())]
    vals = {k: [s[k] for s in per_seed.values()] for k in keys}
    return {
        "fused": {str(k): v for k, v in per_seed.items()},
        "mean": {k: statistics.fmean(v) for k, v in vals.items()},
        "sd": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in vals.items()},
        "range": {k: [min(v), max(v)] for k, v in vals.items()},
    }


def seed_table(seeds: dict) -> str:
    keys = list(seeds["mean"])
    lines = [f"### Seed spread of the fused model ({len(seeds['fused'])} seeds; percent)\n",
             "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for seed, sc in seeds["fused"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{100 * sc[k]:.1f}" for k in keys) + " |")
    lines.append("| mean ± sd | " + " | ".join(f"{100 * seeds['mean'][k]:.1f} ± {100 * seeds['sd'][k]:.1f}"
                                                for k in keys) + " |")
    return "\n".join(lines) + "\n"


def publish(run_dir: Path, dest: Path, report: dict, argv: list[str]) -> None:
    """Copy the run's trained fused model (gate + stage-2 adapters; the base is `embedded:`) to `dest`
    atomically, with `provenance.json`: the command, the training config and the run's scores."""
    import datetime
    import platform

    import torch

    from ultrafuser.modeling.fused import replace_dir

    src = run_dir / "train" / "final"
    tmp = dest.parent / f".{dest.name}.publish-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    halved = adapters_to_bf16(tmp / "specialists")
    run_dtype = portable_dtype(tmp / "ultrafuser.json")
    prov = {
        "command": "ultrafuser " + " ".join(a if not os.path.isabs(a) else Path(a).name for a in argv),
        "date": datetime.date.today().isoformat(),
        "training_config": _portable_config(run_dir / "train" / "config.yaml"),
        "models": report["models"], "gate": report["gate"], "metrics": report["metrics"],
        "n_samples": report["n_samples"], "timings_s": report["timings_s"],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "specialists_dtype": run_dtype},
        "storage": (f"stage-2 adapters ({', '.join(halved)}) stored in bfloat16 to halve the repository's size; the "
                    "scores above were measured with the run's float32 adapters") if halved else None,
        "dtype": (f"the run computed in {run_dtype}; the published model loads in float32, which every CPU runs at "
                  "full speed (bfloat16 is emulated, and slow, on CPUs without native support)")
                 if run_dtype != "float32" else None,
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    replace_dir(tmp, dest)


def portable_dtype(config_file: Path) -> str:
    """Set every CPU specialist of a fused-model config to float32; return the dtype the run used."""
    meta = json.loads(config_file.read_text())  # ultrafuser.json: {"config": FuseConfig, ...}
    used = {sp.get("dtype", "float32") for sp in meta["config"]["specialists"]}
    for sp in meta["config"]["specialists"]:
        if sp.get("device", "cpu") == "cpu":
            sp["dtype"] = "float32"
    config_file.write_text(json.dumps(meta, indent=2) + "\n")
    return ",".join(sorted(used))


def adapters_to_bf16(specialists_dir: Path) -> list[str]:
    """Rewrite every float32 `adapter_model.safetensors` under `specialists_dir` in bfloat16 (PEFT casts adapters
    back to the model's float32 when it loads them); returns the domains rewritten."""
    import torch
    from safetensors.torch import load_file, save_file

    done = []
    for f in sorted(specialists_dir.glob("*/adapter_model.safetensors")):
        tensors = load_file(str(f))
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        save_file({k: t.to(torch.bfloat16) if t.dtype == torch.float32 else t for k, t in tensors.items()}, str(f),
                  metadata={"format": "pt"})
        done.append(f.parent.name)
    return done


def _portable_config(path: Path) -> dict | None:
    """The run's resolved training config without this machine's paths (output folders, data file folders)."""
    import yaml

    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("model", None)
    cfg.pop("output_dir", None)
    if isinstance(cfg.get("data"), dict):
        for k in ("train", "eval"):
            if isinstance(cfg["data"].get(k), list):
                cfg["data"][k] = [Path(x).name for x in cfg["data"][k]]
    return cfg


def _say(msg: str) -> None:
    print(f"[ultrafuser] {msg}", file=sys.stderr, flush=True)
