"""The record format: one conversation per record, the contract between data, training and evaluation.

```
{"id": "3f0c...",                      # stable, derived from domain + messages (record_id)
 "domain": "code",                     # text | code | math | any user-defined domain
 "meta_topic": "Web Development",      # or null
 "sub_topic": "HTML Basics",           # or null
 "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
 "source": "ultrachat2-pipeline",      # or "import:alpaca", "generator:math-word-problems", ...
 "provenance": {...} or {},            # teacher model, sampling, prompt versions, attempts, raw answer sha256, ...
 "task": null | {"type": "math", "answer": "42"}
             | {"type": "code", "entry_point": "f", "prompt": "def f(...):\n    \"\"\"doc\"\"\"\n", "tests": "assert ..."}}
```

`messages` is an optional system message, then user/assistant turns alternating, ending with an assistant
message. Files: JSONL (one record per line, the canonical form; byte-deterministic), Parquet (written through
`datasets`, so `provenance` and `task` are `Json` columns that `datasets.load_dataset("parquet", ...)`
decodes back into objects) and `datasets.save_to_disk` directories (read only). No torch import here;
`datasets` / `pyarrow` are imported only when Parquet or a saved dataset is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ultrafuser.config import ConfigError

RECORD_FIELDS = ("id", "domain", "meta_topic", "sub_topic", "messages", "source", "provenance", "task")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class MathTask(_Frozen):
    """A math problem with an exact final answer (compared after normalisation by the scorer)."""

    type: Literal["math"] = "math"
    answer: str


class CodeTask(_Frozen):
    """A Python function task: `prompt` (signature + docstring) is completed; `tests` are plain asserts."""

    type: Literal["code"] = "code"
    entry_point: str
    prompt: str
    tests: str


Task = Annotated[Union[MathTask, CodeTask], Field(discriminator="type")]


class Record(_Frozen):
    id: str
    domain: str
    meta_topic: str | None = None
    sub_topic: str | None = None
    messages: list[Message]
    source: str
    provenance: dict[str, Any] = {}
    task: Task | None = None

    @model_validator(mode="after")
    def _check_messages(self) -> "Record":
        check_messages(self.messages)
        return self

    def to_json_line(self) -> str:
        """The canonical JSONL line (fixed key order, UTF-8, no trailing spaces), without the newline."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_messages(messages: list[Message]) -> None:
    """Raise ValueError unless: optional system first, then user/assistant alternating, ending with assistant."""
    roles = [m.role for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body:
        raise ValueError("messages must hold at least one user and one assistant message")
    for i, role in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise ValueError(
                f"messages roles {roles} must be: optional system, then user/assistant alternating "
                f"(position {i + (len(roles) - len(body))} is {role!r}, expected {want!r})"
            )
    if body[-1] != "assistant":
        raise ValueError(f"messages roles {roles} must end with an assistant message")


def record_id(domain: str, messages: list[Message] | list[dict]) -> str:
    """Stable content-derived id: sha256 over the domain and the messages (24 hex chars)."""
    msgs = [
        m.model_dump() if isinstance(m, Message) else {"role": m["role"], "content": m["content"]}
        for m in messages
    ]
    blob = json.dumps(
        {"domain": domain, "messages": msgs}, ensure_ascii=False, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def make_record(
    *,
    domain: str,
    messages: list[dict] | list[Message],
    source: str,
    meta_topic: str | None = None,
    sub_topic: str | None = None,
    provenance: dict[str, Any] | None = None,
    task: dict | MathTask | CodeTask | None = None,
) -> Record:
    """Build a validated Record with its content-derived id."""
    msgs = [m if isinstance(m, Message) else Message(**m) for m in messages]
    return Record(
        id=record_id(domain, msgs),
        domain=domain,
        meta_topic=meta_topic,
        sub_topic=sub_topic,
        messages=msgs,
        source=source,
        provenance=provenance or {},
        task=task,
    )


_TASK_ADAPTER: TypeAdapter = TypeAdapter(Task)


def record_from_dict(d: dict[str, Any], where: str = "record") -> Record:
    """Validate a dict into a Record; `task` fields that are null (Parquet) are dropped first."""
    d = dict(d)
    if isinstance(d.get("task"), dict):
        d["task"] = {k: v for k, v in d["task"].items() if v is not None}
    if d.get("provenance") is None:
        d["provenance"] = {}
    try:
        return Record.model_validate(d)
    except ValidationError as e:
        errs = "; ".join(
            f"{'.'.join(str(p) for p in x['loc']) or '(record)'}: {x['msg']}" for x in e.errors()
        )
        raise ConfigError(f"{where} is not a valid record: {errs}") from None


# ----------------------------------------------------------------------------------------------- writing


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records atomically (temp file + rename) as canonical JSONL; returns the count."""
    lines = [r.to_json_line() + "\n" for r in records]
    atomic_write_bytes(Path(path), "".join(lines).encode("utf-8"))
    return len(lines)


def _hf_features():
    from datasets import Features, Json, List, Value

    return Features(
        {
            "id": Value("string"),
            "domain": Value("string"),
            "meta_topic": Value("string"),
            "sub_topic": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "source": Value("string"),
            "provenance": Json(),
            "task": Json(),
        }
    )


def write_parquet(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records as Parquet through `datasets` (provenance/task as `Json` columns), atomically."""
    from datasets import Dataset

    rows = [r.to_dict() for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: [row[k] for row in rows] for k in RECORD_FIELDS}
    # The Arrow table carries the `huggingface` features metadata, so load_dataset("parquet") restores Json().
    table = Dataset.from_dict(cols, features=_hf_features()).data.table
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(rows)


def write_records(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write to `.jsonl` or `.parquet` (chosen by the file suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return write_jsonl(records, path)
    if suffix == ".parquet":
        return write_parquet(records, path)
    raise ConfigError(f"output {str(path)!r}: use a .jsonl or .parquet file name")


# ----------------------------------------------------------------------------------------------- reading


def _iter_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            yield record_from_dict(d, f"{path}:{n}")


def _decode_json_cell(v: Any) -> Any:
    return json.loads(v) if isinstance(v, (str, bytes)) else v


def _iter_rows(rows: Iterable[dict], where: str) -> Iterator[Record]:
    for n, row in enumerate(rows):
        row = {k: row.get(k) for k in RECORD_FIELDS if k in row}
        for k in ("provenance", "task"):
            if k in row:
                row[k] = _decode_json_cell(row[k])
        yield record_from_dict(row, f"{where} row {n}")


def _iter_table(table, where: str) -> Iterator[Record]:
    # extension<arrow.json> columns come back as their JSON text; _iter_rows decodes them.
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = ({k: cols[k][i] for k in cols} for i in range(table.num_rows))
    yield from _iter_rows(rows, where)


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """Iterate records from a .jsonl file, a .parquet file, or a `datasets.save_to_disk` directory."""
    p = Path(path)
    if p.is_dir():
        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            raise ConfigError(
                f"{str(p)!r} is a directory but not a saved `datasets` dataset (no dataset_info.json)"
            )
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise ConfigError(f"{str(p)!r} holds splits {list(ds)}; point at one split's directory")
            ds = next(iter(ds.values()))
        # Read the Arrow table itself: Json columns stay JSON text and are decoded exactly by _iter_rows.
        yield from _iter_table(ds.with_format("arrow")[:], str(p))
        return
    if not p.is_file():
        raise ConfigError(f"data file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(p)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _iter_table(pq.read_table(p), str(p))
    else:
        raise ConfigError(
            f"{str(p)!r}: records are read from .jsonl, .parquet or a saved `datasets` directory"
        )


def read_records(path: str | os.PathLike) -> list[Record]:
    """All records of a .jsonl / .parquet file or a `datasets.save_to_disk` directory, validated."""
    return list(iter_records(path))
