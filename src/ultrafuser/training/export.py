"""Write a trained fused-model directory (the unit every other stage reads).

    OUT/final/
        ultrafuser.json            the fused config; specialist paths inside the directory are relative (./…)
        gate.safetensors           the trained gate
        specialists/DOMAIN/        stage 2 `full`: the fine-tuned model (safetensors + tokenizer);
                                   stage 2 `lora`: the trained LoRA adapter (adapter_config.json + safetensors),
                                   its `path` in the config stays the original base model
        adapters/DOMAIN/           stage 2 `full` only, for specialists that were adapters on a shared base:
                                   the shared base is saved once under specialists/FIRST_DOMAIN_OF_THE_GROUP

After stage 1 only (or as OUT/stage1), the directory holds the config (pointing at the original
specialists, with absolute paths) and the trained gate. Everything is assembled in a temporary directory
next to the target and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ultrafuser.modeling.fused import replace_dir, save_fused_dir


def _abs_ref(ref: str | None, base_dir) -> str | None:
    """A reference that stays valid outside the source directory: relative local paths made absolute."""
    if ref is None or ref.startswith("embedded:"):
        return ref
    if base_dir is not None and ref.startswith(("./", "../")):
        return str((Path(base_dir) / ref).resolve())
    p = Path(ref)
    return str(p.resolve()) if p.exists() else ref


def _save_adapter(spec, dest: Path) -> None:
    scratch = dest.parent / f".{dest.name}.peft"
    spec.peft_model.save_pretrained(str(scratch), selected_adapters=[spec.adapter])
    # PEFT writes a non-"default" adapter into a sub-directory named after it (and a README beside it)
    saved = scratch / spec.adapter if (scratch / spec.adapter / "adapter_config.json").is_file() else scratch
    shutil.move(str(saved), str(dest))
    shutil.rmtree(scratch, ignore_errors=True)
    if spec.config.path.startswith("embedded:"):  # PEFT wrote the cache folder of this machine; name it portably
        import json

        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = spec.config.path
        (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_dense(spec, dest: Path) -> None:
    """Save a specialist's (possibly shared) model without any injected adapter layers."""
    m = spec.model
    if spec.peft_model is not None:
        sd = {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if ".lora_" not in k}
        m.save_pretrained(str(dest), state_dict=sd)
    else:
        m.save_pretrained(str(dest))
    spec.tokenizer.save_pretrained(str(dest))


def export_fused(model, out_dir: str | os.PathLike, *, base_dir, trained: str | None, extra: dict) -> Path:
    """Write `model` as a fused directory at `out_dir`. `trained`: None (gate only), 'full' or 'lora'."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        specs = []
        saved_models: dict[int, Path] = {}
        for s in model.specialists:
            path, adapter = _abs_ref(s.config.path, base_dir), _abs_ref(s.config.adapter, base_dir)
            if trained == "lora":
                adapter = tmp / "specialists" / s.domain
                _save_adapter(s, adapter)
            elif trained == "full":
                if id(s.model) not in saved_models:
                    saved_models[id(s.model)] = tmp / "specialists" / s.domain
                    _save_dense(s, saved_models[id(s.model)])
                path = saved_models[id(s.model)]
                if s.adapter is not None:
                    adapter = tmp / "adapters" / s.domain
                    _save_adapter(s, adapter)
                else:
                    adapter = None
            specs.append(s.config.model_copy(update={"path": str(path), "adapter": None if adapter is None else str(adapter)}))
        cfg = model.config.model_copy(update={"specialists": specs})
        gate = {k: v.detach().cpu() for k, v in model.gate.state_dict().items()} if model.gate is not None else None
        meta = {"vocab_size": model.vocab_size, "eos_token_id": model.eos_token_id,
                "hidden_sizes": [s.hidden_size for s in model.specialists], **extra}
        save_fused_dir(tmp, cfg, gate, extra=meta)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
