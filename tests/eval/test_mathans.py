"""Math answers: extraction and equivalence on a table of (model answer, gold, expected) pairs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ultrafuser.eval.mathans import extract_answer, is_equivalent

GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
    "altogether in April and May.\n#### 72"
)

# (model answer, gold, equivalent?)
PAIRS = [
    # GSM8K style
    ("She sold 48 + 24 = 72 clips.\n#### 72", GSM8K_GOLD, True),
    ("She sold 48 + 24 = 72 clips.\n#### 71", GSM8K_GOLD, False),
    ("48/2 = 24 in May, so 72 in total. The answer is 72.", "72", True),
    ("The answer is 18.", "#### 18", True),
    ("First 3 + 4 = 7. Then 7 * 2 = 14.", "14", True),  # last number fallback
    ("First 3 + 4 = 7. Then 7 * 2 = 14.", "7", False),
    ("I am not sure.", "42", False),
    ("", "42", False),
    # thousands separators, decimals, currency, percent, units
    ("So the total is $1,234.50 dollars.", "1234.5", True),
    ("Total: 1,000,000", "1000000", True),
    ("The answer is 1,000,001", "1000000", False),
    ("He pays \\$18 in total. The answer is $18.", "18", True),
    ("The answer is 3.50", "3.5", True),
    ("The answer is 3.05", "3.5", False),
    ("That is 50% of the class. The answer is 50%.", "50", True),
    ("The area is 25 cm^2", "25", True),
    ("The answer is 7 apples.", "7", True),
    ("It cools to \u22125 degrees.", "-5", True),
    ("The answer is -5", "5", False),
    # fractions, boxed
    ("Thus \\boxed{\\frac{3}{4}}", "0.75", True),
    ("Thus \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", True),
    ("The answer is 1/2", "0.5", True),
    ("The answer is 0.333", "1/3", False),
    ("We get \\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("so x = \\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("so x = \\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{2}}{2}", False),
    ("The answer is $\\boxed{x^2+2x+1}$", "(x+1)^2", True),
    ("The answer is $\\boxed{x^2+2x}$", "(x+1)^2", False),
    ("\\boxed{\\{1, 2\\}} is the set", "\\{2, 1\\}", True),
    ("nested \\boxed{\\frac{\\pi}{\\sqrt{4}}}", "\\frac{\\pi}{2}", True),
    # multiple choice (AQuA, SAT-Math)
    ("The answer is (B).", "B", True),
    ("Answer: C", "B", False),
    ("Let me think: the answer is a bit hard. The correct option is D.", "D", True),
    ("\\boxed{E}", "E", True),
    ("(A) 12 (B) 14 ... so the answer is (C)", "C", True),
    ("(A) 12 (B) 14 ... so the answer is (C)", "A", False),
    ("B", "(B)", True),
    ("I cannot decide.", "A", False),
]


@pytest.mark.parametrize("answer, gold, expected", PAIRS)
def test_equivalence_table(answer, gold, expected):
    assert is_equivalent(answer, gold) is expected


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("blah\n#### 1,234", "number", "1234"),
        ("\\boxed{\\frac{3}{4}} and later 5", "number", "3/4"),
        ("The final answer is: **42**.", "number", "42"),
        ("no numbers", "number", None),
        ("The answer is $\\frac{\\pi}{2}$.", "latex", "\\frac{\\pi}{2}"),
        ("we find $x = 3$ and then $y=4$", "latex", "y=4"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "latex", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("The answer is (b)", "choice", None),  # lower-case letters are words, not options
        ("Answer: (D)", "choice", "D"),
        ("A.", "choice", "A"),
    ],
)
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind) == expected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        extract_answer("1", kind="integer")
    with pytest.raises(ValueError, match="empty"):
        is_equivalent("1", "  ")


def test_works_from_worker_threads():
    """math-verify's signal-based timeouts only work in the main thread: scoring must not depend on them."""
    latex = [(a, g, e) for a, g, e in PAIRS if "\\" in a or "\\" in g]
    assert len(latex) >= 8
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda p: is_equivalent(p[0], p[1]), latex))
    assert got == [e for _, _, e in latex]
