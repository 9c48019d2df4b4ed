"""Checkpoints: safetensors + JSON only, written atomically, verified before use, rotated.

Layout of one checkpoint (taken at a step boundary, after the optimizer step of `step`):

    OUT/checkpoints/step-00000120/
        model.safetensors        the parameters that train in the current stage (FusedModel names)
        optimizer.safetensors    AdamW state tensors, "<param name>::exp_avg" / "::exp_avg_sq" / "::step"
        optimizer.json           param groups (lr, betas, ... and their parameter names), non-tensor state
        scheduler.json           the LR scheduler's state_dict
        rng.safetensors          torch CPU generator state (uint8), CUDA generator states if any
        rng.json                 Python `random` and numpy global generator states
        trainer_state.json       step, stage, step within the stage, sampler state, run fingerprint
        manifest.json            written last: sha256 and size of every file above

Atomicity: everything is written into `OUT/checkpoints/.tmp-step-…` (each file fsync'ed), the manifest
last, then the directory is renamed to `step-…` (and the parent fsync'ed). A directory named `step-…`
therefore always holds a manifest; a crash, SIGKILL or full disk at any point leaves at most a `.tmp-…`
directory, which is never read and is removed by the next save. Loading verifies every checksum, so a
flipped byte is reported, naming the file. Rotation keeps the newest `keep_last` checkpoints and only runs
after the new one is in place (older ones are renamed to `.del-…` before they are deleted).

Nothing here pickles or unpickles: tensors go through safetensors, everything else through JSON.
Non-finite values are refused at save time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrafuser.config import ConfigError
from ultrafuser.modeling.fused import sha256_file as _sha256
from ultrafuser.training.faults import fault

CKPT_FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, damaged or does not fit this run; the message says what to do."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or value about to be saved is NaN or infinite."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# --------------------------------------------------------------------------------------------- files




def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    _fsync_file(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{what}: {k!r} holds NaN or inf values; refusing to save it")


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(root: str | os.PathLike, step: int, files: dict[str, Any], keep_last: int) -> Path:
    """Write `files` (name.safetensors -> {name: tensor}, name.json -> JSON value) as checkpoint `step`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if name.endswith(".safetensors") and not name.startswith("rng"):
            check_finite(content, f"checkpoint {step} {name}")
    _remove_stale(root)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = {}
        for i, (name, content) in enumerate(files.items()):
            path = tmp / name
            if name.endswith(".safetensors"):
                _write_tensors(path, content)
            elif name.endswith(".json"):
                _write_json(path, content)
            else:  # pragma: no cover - programming error
                raise ValueError(f"checkpoint file {name!r} must be .safetensors or .json")
            if i == 0:
                fault("ckpt_write", step)
            entries[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        _write_json(tmp / MANIFEST, {"format": CKPT_FORMAT, "step": step, "files": entries})
        _fsync_dir(tmp)
        final = root / checkpoint_name(step)
        if final.exists():  # the same step saved again (e.g. a forced resume): replace it whole
            old = root / f".del-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _rotate(root, keep_last, keep=final)
    return final


def _remove_stale(root: Path) -> None:
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def _rotate(root: Path, keep_last: int, keep: Path) -> None:
    done = list_checkpoints(root)
    for c in done[: max(0, len(done) - keep_last)]:
        if c.path == keep:
            continue
        trash = root / f".del-{c.path.name}-{os.getpid()}"
        c.path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    def verify(self) -> Checkpoint:
        """Check the manifest and every file's size and sha256; raise CheckpointError naming the problem."""
        try:
            man = self.manifest
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no readable manifest ({e}); it is incomplete") from None
        if man.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has format {man.get('format')!r}; this version reads {CKPT_FORMAT}")
        for name, meta in man["files"].items():
            p = self.path / name
            if not p.is_file():
                raise CheckpointError(f"checkpoint {str(self.path)!r} lacks {name}; it is damaged")
            if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
                raise CheckpointError(
                    f"checkpoint {str(self.path)!r}: {name} does not match its checksum (damaged or altered). "
                    "Resume from an earlier checkpoint with --resume PATH, or delete this one."
                )
        return self

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / name))

    def json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


def list_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints (named `step-…`, holding a manifest), oldest first. Temp dirs are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).is_file():
            try:
                out.append(Checkpoint(p, int(p.name[len(PREFIX):])))
            except ValueError:
                continue
    return sorted(out, key=lambda c: c.step)


def find_checkpoint(root: str | os.PathLike, which: str = "latest") -> Checkpoint:
    """The newest complete checkpoint (`which="latest"`) or the one at path `which`, verified."""
    if which != "latest":
        p = Path(which)
        if not (p / MANIFEST).is_file():
            raise CheckpointError(f"{which!r} is not a complete checkpoint directory (no {MANIFEST})")
        return Checkpoint(p, int(json.loads((p / MANIFEST).read_text())["step"])).verify()
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(
            f"--resume: no complete checkpoint in {str(root)!r}; nothing to resume. Run without --resume to start "
            "a new run (or check output_dir)."
        )
    return found[-1].verify()


# --------------------------------------------------------------------------------------------- optimizer


def optimizer_files(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Flatten an optimizer's state: tensors keyed "<param name>::<key>", the rest as JSON."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        pname = order[i]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pname}::{k}"] = v
            else:
                scalars.setdefault(pname, {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        gg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        gg["params"] = [order[i] for i in g["params"]]
        groups.append(gg)
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict) -> None:
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != order:
        missing = sorted(set(saved) ^ set(order))[:5]
        raise CheckpointError(f"the checkpoint's optimizer holds other parameters than this stage trains (e.g. {missing})")
    index = {n: i for i, n in enumerate(order)}
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pname, _, k = key.rpartition("::")
        state.setdefault(index[pname], {})[k] = v
    for pname, kv in meta["scalars"].items():
        state.setdefault(index[pname], {}).update(kv)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in meta["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------- RNG


def rng_files() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(state), gauss],
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    return tensors, meta


def set_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


__all__ = [
    "Checkpoint", "CheckpointError", "NonFiniteError", "check_finite", "find_checkpoint", "list_checkpoints",
    "load_optimizer", "optimizer_files", "rng_files", "save_checkpoint", "set_rng",
]
