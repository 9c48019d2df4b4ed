"""Training data in: conversations with a domain, aligned across specialists, length-checked, hashed.

Sources: `.jsonl` / `.parquet` files or `datasets.save_to_disk` directories of records (the record format
of `ultrafuser.data.records`: `id`, `domain`, `messages`, ...). Every conversation is aligned with the fused
model's own function (`FusedModel.align`: each specialist's template around shared reply tokens).

Length limit (`data.max_length`): measured on the **longest** specialist sequence of the aligned example
(templates differ in length, and every specialist must see the whole conversation). What happens to an
example that is longer is stated by `data.too_long` and never cuts a reply:

- `drop` (default): the example is skipped;
- `truncate_turns`: whole later user/assistant turns are removed until the rest fits; an example whose
  first turn alone does not fit is skipped.

Both are counted per domain and reported (`DataReport.summary()`); nothing is ever cut mid-answer.

The data hash (`TrainingData.hash`) is a sha256 over every record read (id, domain, messages, in file
order): a resumed run compares it to refuse changed data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ultrafuser.config import ConfigError, DataConfig
from ultrafuser.data.conversation import Aligned

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One aligned training conversation (token ids stored compactly as int32 arrays)."""

    id: str
    domain: str
    input_ids: list[np.ndarray]  # per specialist
    target_positions: list[np.ndarray]  # per specialist
    targets: np.ndarray  # shared reply ids

    @classmethod
    def from_aligned(cls, id: str, domain: str, a: Aligned) -> Example:
        return cls(
            id=id,
            domain=domain,
            input_ids=[np.asarray(x, dtype=np.int32) for x in a.input_ids],
            target_positions=[np.asarray(x, dtype=np.int32) for x in a.target_positions],
            targets=np.asarray(a.targets, dtype=np.int32),
        )

    def aligned(self) -> Aligned:
        return Aligned(
            input_ids=[x.tolist() for x in self.input_ids],
            target_positions=[x.tolist() for x in self.target_positions],
            targets=self.targets.tolist(),
        )

    @property
    def n_targets(self) -> int:
        return int(self.targets.shape[0])

    @property
    def seq_tokens(self) -> int:
        """Tokens over all specialists' sequences (the work one forward pass does)."""
        return int(sum(x.shape[0] for x in self.input_ids))

    @property
    def max_len(self) -> int:
        return int(max(x.shape[0] for x in self.input_ids))


@dataclass
class DataReport:
    files: list[str]
    max_length: int
    policy: str
    read: int = 0
    kept: Counter = field(default_factory=Counter)
    too_long_dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    other_domain: Counter = field(default_factory=Counter)
    duplicate_ids: int = 0

    def summary(self) -> str:
        kept = ", ".join(f"{d} {n}" for d, n in self.kept.items())
        lines = [f"data: {self.read} records read from {len(self.files)} source(s); training on {sum(self.kept.values())} "
                 f"({kept})"]
        if self.too_long_dropped:
            lines.append(
                f"data: {sum(self.too_long_dropped.values())} longer than max_length={self.max_length} tokens were "
                f"dropped ({dict(self.too_long_dropped)}); policy too_long={self.policy!r}"
            )
        if self.truncated:
            lines.append(f"data: {sum(self.truncated.values())} were cut to fewer whole turns to fit "
                         f"max_length={self.max_length} ({dict(self.truncated)}); no reply was cut")
        if self.other_domain:
            lines.append(f"data: skipped {sum(self.other_domain.values())} records of domains not trained on "
                         f"({dict(self.other_domain)}); set data.domains to change this")
        if self.duplicate_ids:
            lines.append(f"data: {self.duplicate_ids} records repeat an earlier record's id (kept)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "files": self.files, "max_length": self.max_length, "policy": self.policy, "read": self.read,
            "kept": dict(self.kept), "too_long_dropped": dict(self.too_long_dropped),
            "truncated": dict(self.truncated), "other_domain": dict(self.other_domain),
            "duplicate_ids": self.duplicate_ids,
        }


@dataclass
class TrainingData:
    domains: list[str]
    examples: dict[str, list[Example]]  # domain -> its examples, in file order
    report: DataReport
    hash: str

    @property
    def sizes(self) -> dict[str, int]:
        return {d: len(self.examples[d]) for d in self.domains}


# --------------------------------------------------------------------------------------------- reading


def read_conversations(path: str) -> Iterator[dict]:
    """Yield {"id", "domain", "messages"} from a .jsonl / .parquet file or a saved `datasets` directory."""
    try:
        from ultrafuser.data.records import iter_records
    except ImportError:  # pragma: no cover - records.py is another module's; plain JSONL still works
        iter_records = None
    if iter_records is not None:
        for r in iter_records(path):
            yield {"id": r.id, "domain": r.domain, "messages": [m.model_dump() for m in r.messages]}
        return
    p = Path(path)  # pragma: no cover
    if p.suffix != ".jsonl" or not p.is_file():  # pragma: no cover
        raise ConfigError(f"data file {path!r}: only .jsonl can be read without ultrafuser.data.records")
    with open(p, encoding="utf-8") as f:  # pragma: no cover
        for n, line in enumerate(f, 1):
            if line.strip():
                d = json.loads(line)
                if not all(k in d for k in ("id", "domain", "messages")):
                    raise ConfigError(f"{path}:{n}: a record needs id, domain and messages")
                yield {"id": d["id"], "domain": d["domain"], "messages": d["messages"]}


def _turns(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """Split into (leading system message(s), [user, assistant] turns)."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    body = messages[len(head):]
    return head, [body[i : i + 2] for i in range(0, len(body), 2)]


def load_training_data(
    cfg: DataConfig,
    align: Callable[[list[dict]], Aligned],
    domains: Sequence[str],
    context_length: int | None = None,
) -> TrainingData:
    """Read, align, length-check and hash the training records (see the module docstring)."""
    if context_length is not None and cfg.max_length > context_length:
        raise ConfigError(
            f"data.max_length={cfg.max_length} exceeds the fused model's context length {context_length} "
            f"(the smallest specialist's); set data.max_length <= {context_length}"
        )
    domains = list(cfg.domains or domains)
    report = DataReport(files=list(cfg.train), max_length=cfg.max_length, policy=cfg.too_long)
    examples: dict[str, list[Example]] = {d: [] for d in domains}
    h = hashlib.sha256()
    seen: set[str] = set()
    for path in cfg.train:
        for rec in read_conversations(path):
            report.read += 1
            h.update(json.dumps([rec["id"], rec["domain"], rec["messages"]], ensure_ascii=False,
                                sort_keys=True).encode("utf-8") + b"\n")
            if rec["domain"] not in examples:
                report.other_domain[rec["domain"]] += 1
                continue
            if rec["id"] in seen:
                report.duplicate_ids += 1
            seen.add(rec["id"])
            a = _fit(rec, align, cfg, report)
            if a is not None:
                examples[rec["domain"]].append(Example.from_aligned(rec["id"], rec["domain"], a))
                report.kept[rec["domain"]] += 1
    return TrainingData(domains=domains, examples=examples, report=report, hash=h.hexdigest())


def _fit(rec: dict, align, cfg: DataConfig, report: DataReport) -> Aligned | None:
    try:
        a = align(rec["messages"])
    except ValueError as e:  # TemplateError and friends are ValueErrors with a message naming the fix
        raise ConfigError(f"record {rec['id']!r} (domain {rec['domain']!r}) cannot be aligned: {e}") from None
    if max(a.lengths) <= cfg.max_length:
        return a
    if cfg.too_long == "truncate_turns":
        head, turns = _turns(rec["messages"])
        for k in range(len(turns) - 1, 0, -1):
            shorter = align(head + [m for t in turns[:k] for m in t])
            if max(shorter.lengths) <= cfg.max_length:
                report.truncated[rec["domain"]] += 1
                return shorter
    report.too_long_dropped[rec["domain"]] += 1
    return None


__all__ = ["DataReport", "Example", "TrainingData", "load_training_data", "read_conversations"]
