"""Prompt templates of the construction pipeline, and parsers for the teacher's answers.

Templates are plain text files, one per stage, shipped in `ultrafuser/data/prompts/`. A domain-specific file
`{stage}.{domain}.txt` wins over the generic `{stage}.txt`; a user directory (`prompts_dir` in the build
config) wins over the shipped files. Slots are written `{name}`; only the slots listed in `SLOTS` for the stage
are allowed (any other `{identifier}` is an error, so a typo cannot silently reach the teacher); other braces,
like JSON examples, are left alone. A template's version is the sha256 of its content (12 hex chars): editing a
template changes the cache keys of exactly the requests that use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ultrafuser.config import ConfigError

PACKAGE_PROMPTS = Path(__file__).parent / "prompts"

_COMMON = ("domain", "domain_description")
SLOTS: dict[str, tuple[str, ...]] = {
    "meta_topics": _COMMON + ("count",),
    "sub_topics": _COMMON + ("meta_topic", "count"),
    "instructions": _COMMON
    + (
        "meta_topic",
        "sub_topic",
        "sub_topic_relevance",
        "sub_topic_example",
        "count",
        "batch_note",
    ),
    "related_strong": _COMMON + ("meta_topic", "sub_topic", "instruction", "count"),
    "related_weak": _COMMON + ("meta_topic", "sub_topic", "instruction", "count"),
    "complicate": _COMMON + ("meta_topic", "sub_topic", "instruction"),
    "simulate_user": _COMMON + ("conversation",),
    "respond_system": _COMMON,
}

_SLOT_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptTemplate:
    stage: str
    path: str
    text: str

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def render(self, **values: object) -> str:
        """Fill the slots; values for slots the template does not use are ignored."""
        missing = sorted(set(_SLOT_RE.findall(self.text)) - set(values))
        if missing:
            raise ConfigError(f"prompt {self.path}: no value for slot(s) {missing}")
        return _SLOT_RE.sub(lambda m: str(values[m.group(1)]), self.text)


def load_template(stage: str, domain: str, prompts_dir: str | Path | None = None) -> PromptTemplate:
    """Find the template for (stage, domain): user dir first, domain-specific before generic."""
    if stage not in SLOTS:
        raise ConfigError(f"unknown prompt stage {stage!r}; stages: {', '.join(SLOTS)}")
    dirs = ([Path(prompts_dir)] if prompts_dir else []) + [PACKAGE_PROMPTS]
    if prompts_dir and not Path(prompts_dir).is_dir():
        raise ConfigError(f"prompts_dir {str(prompts_dir)!r} is not a directory")
    for d in dirs:
        for name in (f"{stage}.{domain}.txt", f"{stage}.txt"):
            p = d / name
            if p.is_file():
                text = p.read_text(encoding="utf-8")
                unknown = sorted(set(_SLOT_RE.findall(text)) - set(SLOTS[stage]))
                if unknown:
                    raise ConfigError(
                        f"prompt {p}: unknown slot(s) {unknown}; allowed for stage {stage!r}: "
                        + ", ".join("{" + s + "}" for s in SLOTS[stage])
                    )
                return PromptTemplate(stage=stage, path=str(p), text=text)
    raise ConfigError(
        f"no prompt template for stage {stage!r} (looked for {stage}.{domain}.txt / {stage}.txt in {dirs})"
    )


# ----------------------------------------------------------------------------------------------- parsing


class ParseError(ValueError):
    """The teacher's answer could not be read in the form the stage asked for."""


_FENCE_RE = re.compile(r"^```[A-Za-z0-9_+-]*\s*\n(.*?)\n?```\s*$", re.S)
_ITEM_RE = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*\u2022])\s+")


def _strip_fence(text: str) -> str:
    t = text.strip()
    m = _FENCE_RE.match(t)
    return m.group(1).strip() if m else t


def _json_array_prefix(text: str) -> list | None:
    """Decode the elements of the first JSON array in `text`, tolerating a cut-off tail (returns the whole
    elements decoded before the cut); None when there is no array."""
    start = text.find("[")
    if start < 0:
        return None
    dec = json.JSONDecoder()
    i, items = start + 1, []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return items
        try:
            val, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return items if items else None
        items.append(val)


def _numbered_items(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if _ITEM_RE.match(line):
            if current is not None:
                items.append("\n".join(current).strip())
            current = [_ITEM_RE.sub("", line, count=1)]
        elif current is not None:
            current.append(line)
    if current is not None:
        items.append("\n".join(current).strip())
    return [i for i in items if i]


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def parse_list(text: str, truncated: bool = False) -> list[str]:
    """A list of strings from a JSON array (preferred), a numbered/bulleted list, or one item per line.

    With `truncated` (finish_reason == "length") the last item of a non-JSON list is dropped: it may be cut.
    Duplicates (case-insensitive) are dropped, order kept."""
    t = _strip_fence(text)
    arr = _json_array_prefix(t)
    if arr or (arr == [] and t.startswith("[")):  # a JSON array (an empty one only if it is the whole answer)
        raw = []
        for x in arr:
            if isinstance(x, dict):
                x = x.get("instruction") or x.get("name") or x.get("text") or ""
            if isinstance(x, str):
                raw.append(x)
    else:
        raw = _numbered_items(t) or [ln for ln in t.splitlines() if ln.strip()]
        if truncated and raw:
            raw = raw[:-1]
    out, seen = [], set()
    for x in raw:
        x = _unquote(x)
        key = " ".join(x.lower().split())
        if x and key not in seen:
            seen.add(key)
            out.append(x)
    if not out:
        raise ParseError("no list items found (expected a JSON array of strings or a numbered list)")
    return out


def parse_sub_topics(text: str, truncated: bool = False) -> list[dict[str, str]]:
    """Sub-topics as {"name", "relevance", "example_use"}: a JSON array of objects, or lines
    `Name | relevance | example use` / `Name: relevance` (numbered or not)."""
    t = _strip_fence(text)
    arr = _json_array_prefix(t)
    out: list[dict[str, str]] = []
    if arr or (arr == [] and t.startswith("[")):
        for x in arr:
            if isinstance(x, dict) and str(x.get("name", "")).strip():
                out.append(
                    {
                        "name": str(x["name"]).strip(),
                        "relevance": str(x.get("relevance", "") or "").strip(),
                        "example_use": str(x.get("example_use", x.get("example", "")) or "").strip(),
                    }
                )
            elif isinstance(x, str) and x.strip():
                out.append({"name": x.strip(), "relevance": "", "example_use": ""})
    else:
        lines = _numbered_items(t) or [ln for ln in t.splitlines() if ln.strip()]
        if truncated and lines:
            lines = lines[:-1]
        for ln in lines:
            ln = " ".join(ln.split())
            parts = [p.strip() for p in re.split(r"\s+\|\s+|\s+[\u2014\u2013]\s+", ln) if p.strip()]
            if len(parts) == 1 and ":" in parts[0]:
                parts = [p.strip() for p in parts[0].split(":", 1)]
            name = parts[0].strip("*_ ").strip()
            if name:
                out.append(
                    {
                        "name": name,
                        "relevance": parts[1] if len(parts) > 1 else "",
                        "example_use": parts[2] if len(parts) > 2 else "",
                    }
                )
    seen, uniq = set(), []
    for s in out:
        k = s["name"].lower()
        if k not in seen:
            seen.add(k)
            uniq.append(s)
    if not uniq:
        raise ParseError("no sub-topics found (expected a JSON array of {name, relevance, example_use})")
    return uniq


_LABEL_RE = re.compile(r"^(?:rewritten instruction|instruction|user|new instruction)\s*:\s*", re.I)


def parse_text(text: str, truncated: bool = False) -> str:
    """A single piece of text (a rewritten instruction, a simulated user turn): labels and quotes removed."""
    if truncated:
        raise ParseError("the answer was cut off (finish_reason == 'length')")
    t = _unquote(_LABEL_RE.sub("", _strip_fence(text).strip()))
    if not t:
        raise ParseError("empty answer")
    return t
