"""Math answers: extract the final answer from a model's text and decide whether it equals the gold one.

`extract_answer(text, kind)` looks, in this order, for GSM8K's `#### 42`, the last `\\boxed{...}`, the
last "the answer is ..." / "Answer: ..." statement, and finally the last number or math span:

- kind="number" (GSM8K, SAT-Math numeric answers): a normalised number string: thousands separators,
  currency (`$`, `\\$`), percent signs, units and a trailing period are dropped, `\\frac{a}{b}` becomes `a/b`,
  a unicode minus becomes `-` (`"$1,234.50 dollars."` -> `"1234.50"`).
- kind="choice" (AQuA, SAT-Math multiple choice): the option letter A-E, upper case.
- kind="latex" (MATH): the raw answer expression, without `$` delimiters.

`is_equivalent(pred_text, gold)` guesses the kind from the gold answer (a letter -> choice; a plain number,
possibly with `####`, `$`, `%` or separators -> number; anything else -> LaTeX), compares numbers exactly as
fractions (so `0.5 == 1/2 == \\frac{1}{2}`), and everything else with math-verify (`parse` + `verify`:
symbolic and numeric equivalence). math-verify bounds its work with `signal.alarm`, which only works in the
main thread: here its timeouts are used in the main thread and disabled in worker threads, so scoring may
run in a thread pool (a pathological expression can then take long; run such pools with a timeout).
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import Literal

Kind = Literal["number", "choice", "latex"]
_KINDS = ("number", "choice", "latex")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_STATEMENT = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:\*\*)?\s*(?:is|:|=)\s*(?:\*\*)?\s*:?\s*([^\n]+)", re.IGNORECASE
)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}|\\[dt]?frac(\d)(\d)")
_EXPONENT = re.compile(r"\^\s*\{?\s*-?\d+\s*\}?")  # cm^2, m^{3}: not the answer
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_CHOICE_PATTERNS = [
    re.compile(
        r"(?i:answer)\s*(?i:is|:)?\s*(?i:option|choice)?\s*:?\s*[(\[]?\s*([A-E])\s*[)\]]?(?![A-Za-z])"
    ),
    re.compile(r"\\boxed\s*\{\s*(?:\\text\{)?\s*\(?([A-E])\)?"),
    re.compile(r"####\s*\(?([A-E])\)?"),
    re.compile(r"^\s*\(?([A-E])\)?\s*[.):]?\s*$"),
    re.compile(r"(?i:option|choice)\s*\(?([A-E])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-E])\)"),
    re.compile(r"(?:^|\s)([A-E])[.)](?=\s|$)"),
]


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces (None if there is none)."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def _marked(text: str) -> str | None:
    """The explicitly marked final answer: `####`, then `\\boxed{}`, then an "answer is" statement."""
    gsm = _GSM8K.findall(text)
    if gsm:
        return gsm[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    statements = _STATEMENT.findall(text)
    return statements[-1].strip() if statements else None


def _clean_number_text(s: str) -> str:
    s = s.replace("\u2212", "-").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = _FRAC.sub(lambda m: f"{m.group(1) or m.group(3)}/{m.group(2) or m.group(4)}", s)
    return _EXPONENT.sub(" ", s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("%", " "))


def _normalise_number(s: str) -> str:
    s = re.sub(r"\s+", "", s.replace(",", ""))
    return s[:-1] if s.endswith(".") else s


def extract_answer(text: str, kind: Kind = "number") -> str | None:
    """The final answer in a model's `text` (module docstring), or None when there is none."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(_KINDS)}")
    if kind == "choice":
        for pattern in _CHOICE_PATTERNS:
            found = pattern.findall(text)
            if found:
                return found[-1].upper()
        return None
    marked = _marked(text)
    if kind == "latex":
        if marked is not None:
            span = _MATH_SPAN.search(marked)  # "the answer is $x = 3$, since ..." -> "x = 3"
            if span:
                return next(g for g in span.groups() if g is not None).strip()
            return marked.strip().rstrip(" .").strip("$").strip() or None
        spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(text)]
        if spans:
            return spans[-1].strip()
        marked = None  # fall back to the last number
    if marked is not None:
        numbers = _NUMBER.findall(_clean_number_text(marked))
        if numbers:
            return _normalise_number(numbers[0])
    numbers = _NUMBER.findall(_clean_number_text(text))
    return _normalise_number(numbers[-1]) if numbers else None


def _as_fraction(s: str) -> Fraction | None:
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _gold_kind(gold: str) -> Kind:
    if re.fullmatch(r"\(?[A-Ea-e]\)?", gold):
        return "choice"
    cleaned = _clean_number_text(gold).strip().rstrip(".")
    if re.fullmatch(r"\s*(?:" + _NUMBER.pattern + r")\s*", cleaned):
        return "number"
    return "latex"


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_quiet = _QuietTimeoutWarning()
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_quiet)


def _math_verify_equal(gold: str, pred: str) -> bool:
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("math answers need math-verify: pip install 'ultrafuser[eval]'") from e
    timeout = 5 if threading.current_thread() is threading.main_thread() else None  # signal.alarm: main only
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed_gold = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout)
    parsed_pred = parse(f"${pred}$", extraction_config=config, parsing_timeout=timeout)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout))


def is_equivalent(pred_text: str, gold: str | int | float, kind: Kind | None = None) -> bool:
    """Whether the final answer in `pred_text` equals `gold` (a bare answer, or a GSM8K `#### x` solution)."""
    gold_s = str(gold).strip()
    if "####" in gold_s:
        gold_s = gold_s.rsplit("####", 1)[1].strip()
    if not gold_s:
        raise ValueError("gold answer is empty")
    kind = kind or _gold_kind(gold_s)
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(_KINDS)}")
    if kind == "choice":
        return extract_answer(pred_text, "choice") == gold_s.strip("()").upper()
    pred = extract_answer(pred_text, kind)
    if pred is None:
        return False
    if kind == "number":
        gold_numbers = _NUMBER.findall(_clean_number_text(gold_s))
        g = _as_fraction(_normalise_number(gold_numbers[0])) if gold_numbers else None
        p = _as_fraction(pred)
        if g is not None and p is not None:
            return g == p or abs(float(g) - float(p)) <= 1e-9 * max(1.0, abs(float(g)))
    return _math_verify_equal(gold_s, pred)
