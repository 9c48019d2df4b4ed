"""Typed, validated configuration for every UltraFuser run (importable without torch).

One definition per concept: a fused model (`FuseConfig`: specialists + gate), a training run
(`TrainConfig`: a fused model + data + the two stages). Every model is frozen and rejects unknown keys;
contradictions are refused with a message that names the fix. `load_yaml` reads a YAML file and applies
`key.path=value` overrides from the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FUSED_CONFIG_NAME = "ultrafuser.json"
GATE_WEIGHTS_NAME = "gate.safetensors"
FORMAT_VERSION = 1

# The paper's three templates (paper.md §2.4), usable by name in any config: `template: ultralm`.
TEMPLATE_PRESETS: dict[str, str] = {
    "ultralm": "User: {instruction}\nAssistant:",
    "llama2-inst": "[INST] {instruction} [/INST]",
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
    ),
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the value and the fix."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecialistConfig(_Frozen):
    """One specialist: a Hugging Face causal LM (local dir or hub id), optionally plus a PEFT LoRA adapter.

    `template` is either a preset name (`ultralm`, `llama2-inst`, `alpaca`), a format string with one
    `{instruction}` slot (and optionally `{system}`), a Jinja chat template (contains `{{` or `{%`), or
    None for the tokenizer's own chat template.
    """

    domain: str
    path: str
    adapter: str | None = None
    template: str | None = None
    turn_separator: str = "\n"  # between a reply's end and the next turn, for format-string templates
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: str | None = None

    @field_validator("domain")
    @classmethod
    def _domain_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"domain {v!r} must be letters, digits, '_', '-' or '.' (e.g. text, code, math)")
        return v

    @field_validator("template")
    @classmethod
    def _template_ok(cls, v: str | None) -> str | None:
        if v is None or v in TEMPLATE_PRESETS or "{{" in v or "{%" in v:
            return v
        slots = re.findall(r"\{([^{}]*)\}", v)
        if slots.count("instruction") != 1:
            raise ValueError(
                f"template {v!r} needs exactly one {{instruction}} slot (e.g. 'User: {{instruction}}\\nAssistant:'),"
                f" or a preset name: {', '.join(TEMPLATE_PRESETS)}"
            )
        unknown = sorted(set(slots) - {"instruction", "system"})
        if unknown:
            raise ValueError(f"template {v!r} has unknown slot(s) {unknown}; allowed: {{instruction}}, {{system}}")
        return v


class GateConfig(_Frozen):
    """The gate: `learned` (shared MLP hidden -> inner -> ReLU -> 1), `uniform`, or `onehot` on one domain."""

    mode: Literal["learned", "uniform", "onehot"] = "learned"
    onehot_domain: str | None = None
    inner_size: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self) -> GateConfig:
        if self.mode == "onehot" and not self.onehot_domain:
            raise ValueError("gate mode 'onehot' needs onehot_domain (e.g. --gate onehot:code)")
        if self.mode != "onehot" and self.onehot_domain:
            raise ValueError(f"onehot_domain={self.onehot_domain!r} is only valid with mode 'onehot'")
        return self

    @classmethod
    def parse(cls, spec: str) -> GateConfig:
        """Parse the CLI form: `learned`, `uniform` or `onehot:DOMAIN`."""
        if spec.startswith("onehot:"):
            return cls(mode="onehot", onehot_domain=spec.split(":", 1)[1])
        if spec in ("learned", "uniform"):
            return cls(mode=spec)
        raise ConfigError(f"--gate {spec!r}: use learned, uniform or onehot:DOMAIN")


class FuseConfig(_Frozen):
    """A fused model: the specialists (order = gate order) and the gate."""

    specialists: list[SpecialistConfig]
    gate: GateConfig = GateConfig()
    eos_token: str | None = None  # the shared end-of-reply token; default: first specialist's eos token
    response_tokenizer: int = 0  # index of the specialist whose tokenizer tokenizes replies (all must agree)

    @model_validator(mode="after")
    def _check(self) -> FuseConfig:
        if not self.specialists:
            raise ValueError("a fused model needs at least one specialist (--specialist DOMAIN=PATH)")
        domains = [s.domain for s in self.specialists]
        dup = sorted({d for d in domains if domains.count(d) > 1})
        if dup:
            raise ValueError(f"domain(s) {dup} given twice; every specialist needs its own domain name")
        if self.gate.mode == "onehot" and self.gate.onehot_domain not in domains:
            raise ValueError(f"onehot domain {self.gate.onehot_domain!r} is not one of the specialists {domains}")
        if not 0 <= self.response_tokenizer < len(self.specialists):
            raise ValueError(f"response_tokenizer={self.response_tokenizer} is not a specialist index")
        return self

    @property
    def domains(self) -> list[str]:
        return [s.domain for s in self.specialists]


# ----------------------------------------------------------------------------------------------- training


class DataConfig(_Frozen):
    """Training data: JSONL / Parquet files or a saved `datasets` dataset, records with `domain` + `messages`."""

    train: list[str]
    max_length: int = Field(1024, ge=8)
    # 'drop': an example whose aligned sequence is longer than max_length is skipped and counted;
    # 'truncate_turns': later turns are dropped until it fits (never cutting inside a reply); else skipped.
    too_long: Literal["drop", "truncate_turns"] = "drop"
    domains: list[str] | None = None  # default: the fused model's domains

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class StageConfig(_Frozen):
    steps: int = Field(ge=0)
    lr: float = Field(2e-5, gt=0)
    per_domain: int = Field(ge=1)  # examples from each domain per optimizer step (paper: 64 / 32)
    micro_batch: int = Field(8, ge=1)  # examples per forward/backward; accumulation splits a step
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)
    trainable: Literal["gate", "full", "lora"] = "gate"
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = 32.0
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cache_hidden_states: bool = False  # stage 1 only: frozen specialists' outputs computed once and reused
    cache_max_gb: float = Field(8.0, gt=0)  # refuse a stage-1 cache estimated larger than this (per process)
    gradient_checkpointing: bool = False
    # fp32 master weights for trainable bf16 / fp16 parameters (one process or DDP): they train in fp32 (AdamW
    # state too) while autocast computes in bf16, and go back to their own dtype when the run exports. false:
    # train them in their own dtype (8 bytes per parameter less; updates under 2^-8 of a weight round away).
    # FSDP / DeepSpeed runs follow their engine's mixed-precision setting instead.
    master_weights: bool = True

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.warmup_steps > self.steps > 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        return self


_STAGE_DEFAULTS = {  # paper §2.1
    "stage1": {"steps": 400, "lr": 2e-5, "per_domain": 64, "trainable": "gate"},
    "stage2": {"steps": 0, "lr": 2e-5, "per_domain": 32, "trainable": "full"},
}


class TrainConfig(_Frozen):
    """One training run: `ultrafuser train CONFIG [key=value ...]`."""

    model: FuseConfig | str  # a FuseConfig, or the path of a fused-model directory
    data: DataConfig
    output_dir: str
    seed: int = 0
    stage1: StageConfig = StageConfig(steps=400, lr=2e-5, per_domain=64, trainable="gate")
    stage2: StageConfig = StageConfig(steps=0, lr=2e-5, per_domain=32, trainable="full")
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    tensorboard: bool = False

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        # A partial stage section (`stage2: {steps: 500}`) keeps the paper's other values for that stage.
        if isinstance(data, dict):
            data = dict(data)
            for name, defaults in _STAGE_DEFAULTS.items():
                if isinstance(data.get(name), dict):
                    data[name] = {**defaults, **data[name]}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stage1.trainable != "gate":
            raise ValueError("stage1.trainable must be 'gate' (stage 1 trains only the gate, paper §2.1)")
        if self.stage2.trainable == "gate":
            raise ValueError("stage2.trainable must be 'full' or 'lora' (stage 2 trains the specialists too)")
        if self.stage2.cache_hidden_states:
            raise ValueError("stage2.cache_hidden_states is impossible: stage 2 changes the specialists")
        return self


# ----------------------------------------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=VALUE` overrides (VALUE parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value (e.g. stage1.steps=10)")
        k, v = item.split("=", 1)
        _set_path(tree, k.strip(), yaml.safe_load(v))
    return tree


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented keys of this section)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_yaml(path: str | os.PathLike, model: type[BaseModel], overrides: list[str] | None = None) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    apply_overrides(tree, overrides or [])
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p))) from None
