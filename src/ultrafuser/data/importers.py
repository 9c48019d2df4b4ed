"""Import local instruction files into the record format.

Formats (a `.json` file holding an array, or `.jsonl` with one object per line):

  alpaca        {"instruction", "input" (optional), "output"}            -- Alpaca, Evol-Instruct (WizardLM/Coder)
                (Evol-Instruct releases in ShareGPT form, with "conversations", use --format sharegpt)
  mathinstruct  {"instruction", "output", "source"}                      -- MathInstruct (MAmmoTH); domain math
  sharegpt      {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]} (+ optional "id")

The user turn of an Alpaca record is the instruction, followed by a blank line and the input when there is one.
ShareGPT roles: system -> system, human/user -> user, gpt/assistant/chatgpt/bard/model -> assistant; a trailing
user turn without an answer is dropped; conversations that do not alternate are skipped (counted).

Domain, unless given (`--domain`): MathInstruct -> math; otherwise `classify_domain`, by these rules in order:
  1. code  if any message holds a ``` fence, or the user text names a language or code artefact as a whole word
           (python, javascript, java, c++, sql, html, css, regex, json, compile, debug, bug, script, api, algorithm,
           code, programming, recursion, unit test, pandas, git, docker, ...), or holds `def f(` / `function f(`,
           or asks to "write/implement/create a ... function|class|method|program|script";
  2. math  if the user text holds arithmetic (`3 + 4`, `12 / 5`, `2^3`), an assignment-like `x = 3`, LaTeX math
           (`\\frac`, `\\sqrt`, `$...$`), or a math keyword (calculate, compute, solve, equation, integral,
           derivative, probability, "sum of", percent, ratio, "how many", "how much", average, median, area,
           perimeter, volume, prime, divisible, fraction, algebra, geometry, polynomial, simplify, theorem, prove, ...);
  3. text  otherwise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError
from ultrafuser.data.records import Record, make_record, write_records

FORMATS = ("alpaca", "mathinstruct", "sharegpt")

_CODE_WORDS = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|ruby|php|kotlin|swift|scala|bash|sql|html|css|"
    r"regex|regular expression|json|yaml|compile|compiler|debug|debugging|bug|script|api|algorithm|source code|"
    r"code|coding|programming|snippet|recursion|unit tests?|dataframe|pandas|numpy|react|django|flask|git|docker)\b"
    r"|\bdef\s+\w+\(|\bfunction\s+\w+\s*\("
    r"|\b(?:write|implement|create) (?:a|an) (?:\w+ ){0,3}(?:function|class|method|program|script)\b",
    re.I,
)
_MATH_WORDS = re.compile(
    r"\b(calculate|compute|solve|equations?|integral|derivative|probability|sum of|percent|percentage|ratio|"
    r"how many|how much|average|median|area|perimeter|volume|prime|divisible|fraction|algebra|geometry|triangle|"
    r"circle|polynomial|simplify|theorem|prove)\b",
    re.I,
)
_MATH_SYMBOLS = re.compile(r"\d\s*[-+*/^×÷]\s*\d|\\frac|\\sqrt|\$[^$\n]+\$|\b[a-z]\s*=\s*[-\d(]")


def classify_domain(messages: list[dict[str, str]]) -> str:
    """'code', 'math' or 'text' by the rules in the module docstring."""
    if any("```" in m["content"] for m in messages):
        return "code"
    user = "\n".join(m["content"] for m in messages if m["role"] == "user")
    if _CODE_WORDS.search(user):
        return "code"
    if _MATH_SYMBOLS.search(user) or _MATH_WORDS.search(user):
        return "math"
    return "text"


@dataclass
class ImportReport:
    fmt: str
    input: str
    output: str
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    domains: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        doms = ", ".join(f"{k}: {v}" for k, v in sorted(self.domains.items())) or "none"
        return (
            f"imported {self.written} of {self.read} {self.fmt} records from {self.input} to {self.output} "
            f"(domains: {doms}; skipped: {skipped})"
        )


def _read_objects(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise ConfigError(f"input file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json input must hold an array of records")
        yield from enumerate(data, 1)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None


_ROLE = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


class _Skip(Exception):
    pass


def _alpaca_messages(obj: dict) -> list[dict[str, str]]:
    instr, out = obj.get("instruction"), obj.get("output")
    if not isinstance(instr, str) or not instr.strip():
        raise _Skip("missing_instruction")
    if not isinstance(out, str) or not out.strip():
        raise _Skip("missing_output")
    inp = obj.get("input")
    user = instr.strip() + (f"\n\n{inp.strip()}" if isinstance(inp, str) and inp.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}]


def _sharegpt_messages(obj: dict) -> list[dict[str, str]]:
    conv = obj.get("conversations", obj.get("conversation"))
    if not isinstance(conv, list) or not conv:
        raise _Skip("missing_conversations")
    msgs = []
    for turn in conv:
        if not isinstance(turn, dict):
            raise _Skip("bad_turn")
        role = _ROLE.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None:
            raise _Skip("unknown_role")
        if not isinstance(value, str):
            raise _Skip("bad_turn")
        msgs.append({"role": role, "content": value.strip()})
    if msgs and msgs[-1]["role"] == "user":
        msgs = msgs[:-1]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise _Skip("no_answered_turn")
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)):
        raise _Skip("not_alternating")
    if any(not m["content"] for m in body):
        raise _Skip("empty_turn")
    return msgs


def import_records(
    path: str | Path, fmt: str, domain: str | None = None
) -> tuple[list[Record], ImportReport]:
    """Read `path` in format `fmt` into records (unvalidated duplicates kept; ids are content-derived)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if domain is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", domain):
        raise ConfigError(f"--domain {domain!r} must be letters, digits, '_', '-' or '.'")
    p = Path(path)
    rep = ImportReport(fmt, str(p), "")
    records: list[Record] = []
    for n, obj in _read_objects(p):
        rep.read += 1
        if not isinstance(obj, dict):
            rep.skipped["not_an_object"] += 1
            continue
        try:
            msgs = _sharegpt_messages(obj) if fmt == "sharegpt" else _alpaca_messages(obj)
        except _Skip as s:
            rep.skipped[str(s)] += 1
            continue
        dom = domain or ("math" if fmt == "mathinstruct" else classify_domain(msgs))
        prov: dict[str, Any] = {"file": p.name, "line": n}
        if fmt == "mathinstruct" and isinstance(obj.get("source"), str):
            prov["origin"] = obj["source"]
        if fmt == "sharegpt" and obj.get("id") is not None:
            prov["original_id"] = str(obj["id"])
        records.append(make_record(domain=dom, messages=msgs, source=f"import:{fmt}", provenance=prov))
        rep.domains[dom] += 1
    rep.written = len(records)
    return records, rep


def import_file(path: str | Path, out: str | Path, fmt: str, domain: str | None = None) -> ImportReport:
    """`ultrafuser data import`: convert and write (.jsonl or .parquet)."""
    records, rep = import_records(path, fmt, domain)
    if not records:
        raise ConfigError(f"{path}: no usable {fmt} records ({rep.summary()})")
    write_records(records, out)
    rep.output = str(out)
    return rep
