"""The build config: one YAML per dataset build (`ultrafuser data build CONFIG [--plan-only] [key=value ...]`).

Frozen pydantic models that reject unknown keys; relative paths are relative to the current directory.
See `configs/data/*.yaml` for commented examples.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ultrafuser.data.teacher import SamplingConfig, TeacherConfig

StageName = Literal[
    "meta_topics",
    "sub_topics",
    "instructions",
    "related_strong",
    "related_weak",
    "complicate",
    "simulate_user",
    "respond",
]
STAGES: tuple[str, ...] = get_args(StageName)

DEFAULT_DESCRIPTIONS = {
    "text": "general knowledge, writing, reasoning and everyday conversation",
    "code": "programming and software engineering",
    "math": "mathematics, from arithmetic to advanced topics",
}
DEFAULT_CHECKS = {"code": ["code"], "math": ["math"]}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DomainSpec(_Frozen):
    """One domain of the dataset and how many items each stage asks for (paper §3.1)."""

    name: str
    description: str | None = None  # fills {domain_description}; default for text/code/math, else the name
    meta_topics: int | list[str] = 10  # how many the teacher proposes, or a fixed list (skips that stage)
    sub_topics_per_meta_topic: int = Field(10, ge=1)
    sub_topics_used: int | None = Field(
        None, ge=1
    )  # a seeded sample of the sub-topics per meta-topic; null: all
    instructions_per_sub_topic: int = Field(5, ge=1)
    instructions_per_request: int = Field(25, ge=1)  # more per sub-topic are asked for in several requests
    strong_related: int = Field(
        1, ge=0
    )  # strongly related instructions per instruction (in-context expansion)
    weak_related: int = Field(1, ge=0)
    complicate_share: float = Field(0.3, ge=0, le=1)  # share of the pool rewritten to be harder (paper: 30%)
    multi_turn_share: float = Field(0.0, ge=0, le=1)  # share continued by a simulated user
    max_extra_turns: int = Field(
        1, ge=1, le=20
    )  # a continued conversation gets 1..max_extra_turns more turns
    checks: list[Literal["code", "math"]] | None = (
        None  # answer checks; default: code for code, math for math
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(
                f"domain name {v!r} must be letters, digits, '_', '-' or '.' (e.g. text, code, math)"
            )
        return v

    @field_validator("meta_topics")
    @classmethod
    def _meta_ok(cls, v: int | list[str]) -> int | list[str]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("meta_topics must be >= 1 (a count) or a non-empty list of topic names")
        else:
            if not v or any(not t.strip() for t in v):
                raise ValueError("meta_topics list must be non-empty and hold no empty names")
            if len({t.strip().lower() for t in v}) != len(v):
                raise ValueError("meta_topics list has duplicates")
        return v

    @model_validator(mode="after")
    def _check(self) -> "DomainSpec":
        if self.sub_topics_used is not None and self.sub_topics_used > self.sub_topics_per_meta_topic:
            raise ValueError(
                f"sub_topics_used={self.sub_topics_used} exceeds sub_topics_per_meta_topic="
                f"{self.sub_topics_per_meta_topic}"
            )
        return self

    @property
    def domain_description(self) -> str:
        return self.description or DEFAULT_DESCRIPTIONS.get(self.name, f"the domain '{self.name}'")

    @property
    def answer_checks(self) -> list[str]:
        return list(self.checks) if self.checks is not None else DEFAULT_CHECKS.get(self.name, [])

    @property
    def n_meta(self) -> int:
        return len(self.meta_topics) if isinstance(self.meta_topics, list) else self.meta_topics

    @property
    def n_sub_used(self) -> int:
        return self.sub_topics_used or self.sub_topics_per_meta_topic

    @property
    def instruction_batches(self) -> list[int]:
        """How many instructions each request for one sub-topic asks for."""
        n, per = self.instructions_per_sub_topic, self.instructions_per_request
        return [min(per, n - i) for i in range(0, n, per)]


class SamplingOverride(_Frozen):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


class EvalFile(_Frozen):
    """A local JSONL evaluation set: `fields` of each line (default: every string value) are decontaminated."""

    path: str
    fields: list[str] | None = None
    name: str | None = None  # shown in the report; default: the file name


class DedupConfig(_Frozen):
    enabled: bool = True
    field: Literal["instruction", "conversation"] = "instruction"  # user turns, or every message
    threshold: float = Field(
        0.85, gt=0, le=1
    )  # MinHash Jaccard estimate at or above which a record is dropped
    num_perm: int = Field(128, ge=16, le=1024)


class DecontamConfig(_Frozen):
    enabled: bool = True
    ngram: int = Field(13, ge=1)
    eval_sets: list[str] = []  # named sets, e.g. [humaneval]
    files: list[EvalFile] = []


class QualityConfig(_Frozen):
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontamConfig = DecontamConfig()
    extra_refusal_patterns: list[str] = []  # regexes (case-insensitive) matched at the start of an answer

    @field_validator("extra_refusal_patterns")
    @classmethod
    def _regex_ok(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"extra_refusal_patterns: {p!r} is not a valid regex ({e})") from None
        return v


class BuildConfig(_Frozen):
    """One dataset build."""

    output: str  # .jsonl or .parquet; beside it: <stem>.stats.json and <stem>.rejected.jsonl
    work_dir: str | None = None  # the request store lives here; default: <output>.work
    seed: int = (
        0  # every random choice (sub-topic samples, which items get harder / multi-turn) derives from it
    )
    teacher: TeacherConfig
    sampling: SamplingConfig = SamplingConfig()
    stage_sampling: dict[StageName, SamplingOverride] = {}
    prompts_dir: str | None = None  # templates here win over the shipped ones (same file names)
    domains: list[DomainSpec]
    quality: QualityConfig = QualityConfig()

    @field_validator("output")
    @classmethod
    def _output_ok(cls, v: str) -> str:
        if Path(v).suffix.lower() not in (".jsonl", ".parquet"):
            raise ValueError(f"output {v!r} must end in .jsonl or .parquet")
        return v

    @model_validator(mode="after")
    def _check(self) -> "BuildConfig":
        if not self.domains:
            raise ValueError("domains: give at least one domain (e.g. - name: code)")
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain(s) {dup} listed twice")
        return self

    def sampling_for(self, stage: str) -> SamplingConfig:
        o = self.stage_sampling.get(stage)  # type: ignore[call-overload]
        if o is None:
            return self.sampling
        return self.sampling.model_copy(update={k: v for k, v in o.model_dump().items() if v is not None})

    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output + ".work")

    @property
    def store_path(self) -> Path:
        return self.work_path / "requests.jsonl"

    @property
    def stats_path(self) -> Path:
        return self.output_path.with_suffix(".stats.json")

    @property
    def rejected_path(self) -> Path:
        return self.output_path.with_suffix(".rejected.jsonl")
