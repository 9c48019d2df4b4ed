"""Instruction data for UltraFuser (import-light: no torch, no network libraries at import time).

- `records`: the record format (one conversation per record) and JSONL / Parquet / saved-dataset I/O;
- `pipeline` (+ `buildconfig`, `prompting`, `prompts/*.txt`, `teacher`, `executor`, `store`): the UltraChat 2
  construction pipeline against any OpenAI-compatible teacher, planned, resumable, deterministic;
- `quality`: answer validation, MinHash dedup, 13-gram decontamination, statistics;
- `importers`: Alpaca / Evol-Instruct, MathInstruct and ShareGPT files;
- `generators`: offline math word problems and Python function tasks (the embedded default's data).

    from ultrafuser.data import Record, read_records, write_records
"""

from ultrafuser.data.records import (
    CodeTask,
    MathTask,
    Message,
    Record,
    iter_records,
    make_record,
    read_records,
    record_id,
    write_records,
)

__all__ = [
    "CodeTask",
    "MathTask",
    "Message",
    "Record",
    "iter_records",
    "make_record",
    "read_records",
    "record_id",
    "write_records",
]
