"""The families of the Python function-task generator.

A family draws its constants (and a function name among synonyms), and returns a `Spec`: signature,
docstring, the reference body (source text), test inputs, and an `oracle` — a separate implementation in this
file, written differently from the reference body — that computes each test's expected value. The unit tests
are `assert f(args) == expected` lines, so a reference that disagrees with its oracle fails its own tests
(the generator's tests run every reference against its tests).
"""

from __future__ import annotations

import calendar
import itertools
import math
import operator
import random
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any


@dataclass
class Spec:
    fname: str
    args: str  # the parameter list of the signature, e.g. "nums: list[int], k: int"
    ret: str
    doc: str
    body: str  # indented by 4 spaces, ends with a newline
    oracle: Callable[..., Any]
    inputs: list[tuple]
    params: dict[str, Any] = field(default_factory=dict)
    imports: str = ""  # module-level imports the reference needs (also shown in the prompt)


@dataclass(frozen=True)
class CodeFamily:
    name: str
    topic: str
    build: Callable[[random.Random], Spec]


CODE_FAMILIES: dict[str, CodeFamily] = {}


def code_family(name: str, topic: str):
    def deco(build):
        assert name not in CODE_FAMILIES, name
        CODE_FAMILIES[name] = CodeFamily(name, topic, build)
        return build

    return deco


def _ints(r: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


_WORDS = (
    "apple river stone cloud tiger lemon piano rocket garden silver window orange planet candle "
    "yellow forest bridge dragon mirror anchor violet castle harbor meadow"
).split()


def _sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(_WORDS) for _ in range(n))


# ------------------------------------------------------------------------------------------- numbers


@code_family("sum_multiples", "Loops")
def _sum_multiples(r):
    k = r.choice([3, 4, 5, 6, 7, 9])
    return Spec(
        r.choice(["sum_multiples", f"sum_of_multiples_of_{k}", "multiples_total"]),
        "n: int",
        "int",
        f"Return the sum of all positive multiples of {k} that are smaller than n (0 if there are none).",
        f"    return sum(x for x in range({k}, n, {k}))\n",
        lambda n: k * ((n - 1) // k) * ((n - 1) // k + 1) // 2 if n > 1 else 0,
        [(0,), (1,), (k,), (k + 1,), (10 * k + 1,), (r.randint(20, 300),)],
        {"k": k},
    )


@code_family("digit_power_sum", "Numbers")
def _digit_power_sum(r):
    p = r.choice([1, 2, 3])
    what = {
        1: "the sum of its digits",
        2: "the sum of the squares of its digits",
        3: "the sum of the cubes of its digits",
    }[p]

    def oracle(n):
        t = 0
        while n:
            n, d = divmod(n, 10)
            t += d**p
        return t

    return Spec(
        r.choice(["digit_power_sum", "digits_score", "sum_digit_powers"]),
        "n: int",
        "int",
        f"Given a non-negative integer n, return {what}.",
        f"    return sum(int(d) ** {p} for d in str(n))\n",
        oracle,
        [(0,), (7,), (10,), (r.randint(100, 999),), (r.randint(10**4, 10**6),)],
        {"p": p},
    )


@code_family("fib_mod", "Recursion")
def _fib_mod(r):
    m = r.choice([10, 97, 100, 1000, 10007])

    def oracle(n):  # fast doubling
        def fd(k):
            if k == 0:
                return (0, 1)
            a, b = fd(k // 2)
            c, d = a * (2 * b - a), a * a + b * b
            return (d, c + d) if k % 2 else (c, d)

        return fd(n)[0] % m

    return Spec(
        r.choice(["fib_mod", "fibonacci_mod", f"fib_mod_{m}"]),
        "n: int",
        "int",
        f"Return the n-th Fibonacci number modulo {m}, where fib(0) = 0 and fib(1) = 1.",
        f"    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % {m}\n    return a\n",
        oracle,
        [(0,), (1,), (2,), (10,), (r.randint(20, 90),), (r.randint(100, 500),)],
        {"m": m},
    )


@code_family("gcd_list", "Numbers")
def _gcd_list(r):
    g = r.randint(2, 9)
    cases = [([g * r.randint(1, 20) for _ in range(r.randint(2, 5))],) for _ in range(3)] + [
        ([7, 13],),
        ([12],),
    ]
    return Spec(
        r.choice(["gcd_list", "greatest_common_divisor_of", "list_gcd"]),
        "nums: list[int]",
        "int",
        "Return the greatest common divisor of a non-empty list of positive integers.",
        "    result = nums[0]\n    for x in nums[1:]:\n        a, b = result, x\n        while b:\n"
        "            a, b = b, a % b\n        result = a\n    return result\n",
        lambda nums: reduce(math.gcd, nums),
        cases,
    )


@code_family("is_prime", "Numbers")
def _is_prime(r):
    return Spec(
        r.choice(["is_prime", "check_prime", "prime_test"]),
        "n: int",
        "bool",
        "Return True if n is a prime number and False otherwise (numbers below 2 are not prime).",
        "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
        "            return False\n        i += 1\n    return True\n",
        lambda n: n >= 2 and all(n % d for d in range(2, n)),
        [(0,), (1,), (2,), (9,), (r.choice([13, 17, 19, 23, 29, 31]),), (r.randint(30, 400),)],
    )


@code_family("count_primes_below", "Numbers")
def _count_primes(r):
    return Spec(
        r.choice(["count_primes_below", "prime_count", "num_primes_under"]),
        "n: int",
        "int",
        "Return how many prime numbers are strictly smaller than n.",
        "    if n < 3:\n        return 0\n    sieve = [True] * n\n    sieve[0] = sieve[1] = False\n"
        "    for i in range(2, int(n ** 0.5) + 1):\n        if sieve[i]:\n            for j in range(i * i, n, i):\n"
        "                sieve[j] = False\n    return sum(sieve)\n",
        lambda n: sum(1 for k in range(2, n) if all(k % d for d in range(2, int(math.isqrt(k)) + 1))),
        [(0,), (2,), (3,), (10,), (r.randint(20, 200),)],
    )


@code_family("collatz_steps", "Loops")
def _collatz(r):
    def oracle(n):
        return 0 if n == 1 else 1 + oracle(n // 2 if n % 2 == 0 else 3 * n + 1)

    return Spec(
        r.choice(["collatz_steps", "collatz_length", "steps_to_one"]),
        "n: int",
        "int",
        "Return how many steps the Collatz process takes to reach 1 from n >= 1: an even number is halved, "
        "an odd number becomes 3 * n + 1.",
        "    steps = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n        steps += 1\n"
        "    return steps\n",
        oracle,
        [(1,), (2,), (6,), (r.randint(7, 60),), (r.randint(61, 500),)],
    )


@code_family("to_base", "Numbers")
def _to_base(r):
    b = r.randint(2, 9)

    def oracle(n):
        return str(n) if n < b else oracle(n // b) + str(n % b)

    return Spec(
        r.choice(["to_base", f"to_base_{b}", "convert_base"]),
        "n: int",
        "str",
        f"Return the representation of the non-negative integer n in base {b}, as a string of digits.",
        f"    if n == 0:\n        return '0'\n    digits = []\n    while n > 0:\n        n, d = divmod(n, {b})\n"
        f"        digits.append(str(d))\n    return ''.join(reversed(digits))\n",
        oracle,
        [(0,), (1,), (b,), (r.randint(10, 99),), (r.randint(100, 5000),)],
        {"base": b},
    )


@code_family("to_roman", "Strings")
def _to_roman(r):
    def oracle(n):
        th, h, t, o = n // 1000, n // 100 % 10, n // 10 % 10, n % 10
        hs = ["", "C", "CC", "CCC", "CD", "D", "DC", "DCC", "DCCC", "CM"]
        ts = ["", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"]
        os_ = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
        return "M" * th + hs[h] + ts[t] + os_[o]

    return Spec(
        r.choice(["to_roman", "int_to_roman", "roman_numeral"]),
        "n: int",
        "str",
        "Return the Roman numeral for 1 <= n <= 3999 (using subtractive forms such as IV and CM).",
        "    table = [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),\n"
        "             (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]\n"
        "    out = ''\n    for value, sym in table:\n        while n >= value:\n            out += sym\n"
        "            n -= value\n    return out\n",
        oracle,
        [(1,), (4,), (9,), (r.randint(10, 99),), (r.randint(100, 3999),)],
    )


@code_family("count_leap_years", "Dates")
def _leap(r):
    return Spec(
        r.choice(["count_leap_years", "leap_years_between", "num_leap_years"]),
        "start: int, end: int",
        "int",
        "Return how many leap years there are from year start to year end, both included (Gregorian rules: "
        "divisible by 4, except centuries not divisible by 400).",
        "    count = 0\n    for y in range(start, end + 1):\n        if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0:\n"
        "            count += 1\n    return count\n",
        lambda start, end: sum(calendar.isleap(y) for y in range(start, end + 1)),
        [(2000, 2000), (1900, 1900), (1996, 2004), (r.randint(1800, 1900), r.randint(1950, 2100))],
    )


# ------------------------------------------------------------------------------------------- lists


@code_family("rotate_list", "Lists")
def _rotate(r):
    left = r.random() < 0.5
    side = "left" if left else "right"

    def oracle(xs, k):
        d = deque(xs)
        d.rotate(-k if left else k)
        return list(d)

    body = "    if not xs:\n        return []\n    k %= len(xs)\n" + (
        "    return xs[k:] + xs[:k]\n" if left else "    return xs[len(xs) - k:] + xs[:len(xs) - k]\n"
    )
    return Spec(
        r.choice([f"rotate_{side}", "rotate_list", f"shift_{side}"]),
        "xs: list[int], k: int",
        "list[int]",
        f"Return a new list with the elements of xs rotated {side} by k positions (k >= 0 may exceed the length).",
        body,
        oracle,
        [([], 3), ([1, 2, 3], 0), ([1, 2, 3, 4, 5], 2), (_ints(r, 6), r.randint(1, 14))],
        {"side": side},
    )


@code_family("running_agg", "Lists")
def _running(r):
    kind = r.choice(["sum", "max", "min"])
    op = {"sum": operator.add, "max": max, "min": min}[kind]
    upd = {
        "sum": "acc = acc + x",
        "max": "acc = x if x > acc else acc",
        "min": "acc = x if x < acc else acc",
    }[kind]
    return Spec(
        r.choice([f"running_{kind}", f"prefix_{kind}", f"cumulative_{kind}"]),
        "xs: list[int]",
        "list[int]",
        f"Return the running {kind} of xs: element i is the {kind} of xs[0..i].",
        f"    out = []\n    acc = None\n    for x in xs:\n        if acc is None:\n            acc = x\n"
        f"        else:\n            {upd}\n        out.append(acc)\n    return out\n",
        lambda xs: list(itertools.accumulate(xs, op)),
        [([],), ([5],), (_ints(r, 5),), (_ints(r, 8),)],
        {"kind": kind},
    )


@code_family("flatten", "Lists")
def _flatten(r):
    return Spec(
        r.choice(["flatten", "flatten_once", "concat_lists"]),
        "xss: list[list[int]]",
        "list[int]",
        "Concatenate the inner lists of xss into one list, keeping the order.",
        "    return [x for xs in xss for x in xs]\n",
        lambda xss: sum(xss, []),
        [([],), ([[], []],), ([[1], [2, 3]],), ([_ints(r, r.randint(0, 3)) for _ in range(4)],)],
    )


@code_family("chunk", "Lists")
def _chunk(r):
    size = r.randint(2, 4)

    def oracle(xs):
        out, cur = [], []
        for x in xs:
            cur.append(x)
            if len(cur) == size:
                out.append(cur)
                cur = []
        return out + ([cur] if cur else [])

    return Spec(
        r.choice(["chunk", f"chunks_of_{size}", "split_into_groups"]),
        "xs: list[int]",
        "list[list[int]]",
        f"Split xs into consecutive groups of {size} elements; the last group may be shorter.",
        f"    return [xs[i:i + {size}] for i in range(0, len(xs), {size})]\n",
        oracle,
        [([],), (_ints(r, size),), (_ints(r, size + 1),), (_ints(r, 3 * size + 1),)],
        {"size": size},
    )


@code_family("dedupe", "Lists")
def _dedupe(r):
    return Spec(
        r.choice(["dedupe", "unique_in_order", "remove_duplicates"]),
        "xs: list[int]",
        "list[int]",
        "Return xs without repeated values, keeping the first occurrence of each, in order.",
        "    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n"
        "            out.append(x)\n    return out\n",
        lambda xs: list(dict.fromkeys(xs)),
        [([],), ([1, 1, 1],), (_ints(r, 8, 0, 5),), (_ints(r, 12, -3, 3),)],
    )


@code_family("clamp_all", "Lists")
def _clamp(r):
    lo = r.randint(-10, 5)
    hi = lo + r.randint(3, 20)
    return Spec(
        r.choice(["clamp_all", "clip_values", "clamp_to_range"]),
        "xs: list[int]",
        "list[int]",
        f"Return xs with every value below {lo} replaced by {lo} and every value above {hi} replaced by {hi}.",
        f"    return [min(max(x, {lo}), {hi}) for x in xs]\n",
        lambda xs: [lo if x < lo else hi if x > hi else x for x in xs],
        [([],), ([lo, hi],), (_ints(r, 6, lo - 10, hi + 10),), (_ints(r, 9, lo - 30, hi + 30),)],
        {"lo": lo, "hi": hi},
    )


@code_family("pairwise_diffs", "Lists")
def _diffs(r):
    absolute = r.random() < 0.5
    expr = "abs(b - a)" if absolute else "b - a"
    return Spec(
        r.choice(["pairwise_diffs", "gaps", "differences"]),
        "xs: list[int]",
        "list[int]",
        ("Return the absolute differences" if absolute else "Return the differences xs[i + 1] - xs[i]")
        + " between neighbouring elements of xs (an empty list if xs has fewer than two elements).",
        f"    return [{expr} for a, b in zip(xs, xs[1:])]\n",
        lambda xs: [abs(xs[i + 1] - xs[i]) if absolute else xs[i + 1] - xs[i] for i in range(len(xs) - 1)],
        [([],), ([4],), (_ints(r, 5),), (_ints(r, 7),)],
        {"absolute": absolute},
    )


@code_family("transpose", "Lists")
def _transpose(r):
    def mat():
        rows, cols = r.randint(1, 4), r.randint(1, 4)
        return [_ints(r, cols, 0, 9) for _ in range(rows)]

    return Spec(
        r.choice(["transpose", "transpose_matrix", "flip_matrix"]),
        "m: list[list[int]]",
        "list[list[int]]",
        "Return the transpose of the rectangular matrix m (a list of rows); the transpose of [] is [].",
        "    return [list(row) for row in zip(*m)]\n",
        lambda m: [[m[i][j] for i in range(len(m))] for j in range(len(m[0]))] if m else [],
        [([],), ([[1, 2, 3]],), (mat(),), (mat(),)],
    )


@code_family("merge_sorted", "Lists")
def _merge(r):
    return Spec(
        r.choice(["merge_sorted", "merge_two_sorted", "combine_sorted"]),
        "a: list[int], b: list[int]",
        "list[int]",
        "Merge two lists sorted in ascending order into one sorted list (keep duplicates).",
        "    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
        "            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n"
        "            j += 1\n    return out + a[i:] + b[j:]\n",
        lambda a, b: sorted(a + b),
        [
            ([], []),
            ([1, 3], []),
            (sorted(_ints(r, 4)), sorted(_ints(r, 5))),
            (sorted(_ints(r, 6)), sorted(_ints(r, 3))),
        ],
    )


@code_family("second_largest", "Lists")
def _second(r):
    def oracle(xs):
        u = sorted(set(xs))
        return u[-2] if len(u) >= 2 else None

    return Spec(
        r.choice(["second_largest", "runner_up", "second_max"]),
        "xs: list[int]",
        "int | None",
        "Return the second largest distinct value in xs, or None if xs has fewer than two distinct values.",
        "    best = second = None\n    for x in xs:\n        if best is None or x > best:\n"
        "            if best is not None:\n                second = best\n            best = x\n"
        "        elif x != best and (second is None or x > second):\n            second = x\n    return second\n",
        oracle,
        [([],), ([3, 3],), ([1, 2],), (_ints(r, 6),), (_ints(r, 9, 0, 5),)],
    )


@code_family("max_subarray", "Algorithms")
def _kadane(r):
    return Spec(
        r.choice(["max_subarray", "max_subarray_sum", "best_segment_sum"]),
        "xs: list[int]",
        "int",
        "Return the largest sum of a non-empty contiguous sub-list of the non-empty list xs.",
        "    best = cur = xs[0]\n    for x in xs[1:]:\n        cur = max(x, cur + x)\n        best = max(best, cur)\n"
        "    return best\n",
        lambda xs: max(sum(xs[i:j]) for i in range(len(xs)) for j in range(i + 1, len(xs) + 1)),
        [([-3],), ([-2, -1, -4],), (_ints(r, 6, -10, 10),), (_ints(r, 10, -10, 10),)],
    )


@code_family("dot_product", "Lists")
def _dot(r):
    n = r.randint(2, 6)
    return Spec(
        r.choice(["dot_product", "dot", "inner_product"]),
        "a: list[int], b: list[int]",
        "int",
        "Return the dot product of two lists of the same length.",
        "    return sum(x * y for x, y in zip(a, b))\n",
        lambda a, b: sum(a[i] * b[i] for i in range(len(a))),
        [([], []), ([2], [3]), (_ints(r, n, -5, 9), _ints(r, n, -5, 9)), (_ints(r, n + 2), _ints(r, n + 2))],
    )


@code_family("sum_squares_parity", "Lists")
def _sum_sq(r):
    even = r.random() < 0.5
    word = "even" if even else "odd"

    def oracle(xs):
        t = 0
        for x in xs:
            if (x % 2 == 0) == even:
                t += x * x
        return t

    return Spec(
        r.choice([f"sum_{word}_squares", f"{word}_square_sum", "square_sum_filtered"]),
        "xs: list[int]",
        "int",
        f"Return the sum of the squares of the {word} numbers in xs.",
        f"    return sum(x * x for x in xs if x % 2 == {0 if even else 1})\n",
        oracle,
        [([],), ([1, 2, 3, 4],), (_ints(r, 7),)],
        {"parity": word},
    )


@code_family("first_above", "Lists")
def _first_above(r):
    t = r.randint(0, 30)
    return Spec(
        r.choice(["first_above", f"first_index_over_{t}", "find_first_greater"]),
        "xs: list[int]",
        "int",
        f"Return the index of the first element of xs greater than {t}, or -1 if there is none.",
        f"    for i, x in enumerate(xs):\n        if x > {t}:\n            return i\n    return -1\n",
        lambda xs: next((i for i in range(len(xs)) if xs[i] > t), -1),
        [([],), ([t],), ([t, t + 1],), (_ints(r, 6, -10, t + 10),)],
        {"threshold": t},
    )


# ------------------------------------------------------------------------------------------- strings


@code_family("count_chars", "Strings")
def _count_chars(r):
    chars = r.choice(["aeiou", "".join(sorted(r.sample("bcdfghklmnprst", 3)))])
    what = "vowels (a, e, i, o, u)" if chars == "aeiou" else "letters " + ", ".join(chars)
    return Spec(
        r.choice(["count_vowels" if chars == "aeiou" else f"count_{chars}", "count_letters", "letter_count"]),
        "s: str",
        "int",
        f"Return how many characters of s are {what}, ignoring case.",
        f"    return sum(1 for ch in s.lower() if ch in {chars!r})\n",
        lambda s: sum(s.lower().count(c) for c in chars),
        [("",), ("AEIOU xyz",), (_sentence(r, 3),), (_sentence(r, 5).title(),)],
        {"chars": chars},
    )


@code_family("reverse_words", "Strings")
def _reverse_words(r):
    letters = r.random() < 0.5

    def oracle(s):
        words = s.split()
        if letters:
            return " ".join("".join(reversed(w)) for w in words)
        out: list[str] = []
        for w in words:
            out.insert(0, w)
        return " ".join(out)

    return Spec(
        r.choice(["reverse_each_word" if letters else "reverse_words", "flip_words", "mirror_words"]),
        "s: str",
        "str",
        (
            "Reverse the letters of every word of s, keeping the word order"
            if letters
            else "Return the words of s in reverse order"
        )
        + "; words are separated by single spaces.",
        "    return ' '.join(w[::-1] for w in s.split())\n"
        if letters
        else "    return ' '.join(s.split()[::-1])\n",
        oracle,
        [("",), ("one",), (_sentence(r, 3),), (_sentence(r, 5),)],
        {"letters": letters},
    )


@code_family("caesar", "Strings")
def _caesar(r):
    k = r.randint(1, 25)
    low = "abcdefghijklmnopqrstuvwxyz"
    table = str.maketrans(low, low[k:] + low[:k])
    return Spec(
        r.choice(["caesar", f"shift_by_{k}", "caesar_encode"]),
        "s: str",
        "str",
        f"Shift every lowercase letter of s forward by {k} places in the alphabet (wrapping from z to a); "
        "leave every other character unchanged.",
        f"    out = []\n    for ch in s:\n        if 'a' <= ch <= 'z':\n"
        f"            out.append(chr((ord(ch) - ord('a') + {k}) % 26 + ord('a')))\n        else:\n"
        f"            out.append(ch)\n    return ''.join(out)\n",
        lambda s: s.translate(table),
        [("",), ("xyz",), ("Hello, World!",), (_sentence(r, 4),)],
        {"shift": k},
    )


@code_family("clean_palindrome", "Strings")
def _palindrome(r):
    def oracle(s):
        t = re.sub(r"[^0-9a-z]", "", s.lower())
        return t == "".join(reversed(t))

    w = r.choice(_WORDS)
    return Spec(
        r.choice(["is_palindrome", "clean_palindrome", "reads_same_backwards"]),
        "s: str",
        "bool",
        "Return True if s reads the same forwards and backwards when only letters and digits are kept and "
        "case is ignored.",
        "    kept = [ch.lower() for ch in s if ch.isalnum()]\n    return kept == kept[::-1]\n",
        oracle,
        [("",), ("A man, a plan, a canal: Panama",), (w,), (w + "!" + w[::-1].upper(),), ("ab",)],
    )


@code_family("most_common_char", "Strings")
def _most_common(r):
    def oracle(s):
        chars = sorted(set(s) - {" "})
        return max(chars, key=lambda c: (s.count(c), -ord(c))) if chars else ""

    return Spec(
        r.choice(["most_common_char", "top_char", "most_frequent_letter"]),
        "s: str",
        "str",
        "Return the character (ignoring spaces) that occurs most often in s; on a tie return the smallest one; "
        "return '' if there is none.",
        "    counts = Counter(ch for ch in s if ch != ' ')\n    if not counts:\n        return ''\n"
        "    best = max(counts.values())\n    return min(ch for ch, c in counts.items() if c == best)\n",
        oracle,
        [("",), ("abba",), (_sentence(r, 3),), (_sentence(r, 6),)],
        imports="from collections import Counter\n",
    )


@code_family("count_long_words", "Strings")
def _long_words(r):
    k = r.randint(3, 6)
    return Spec(
        r.choice(["count_long_words", f"words_longer_than_{k}", "long_word_count"]),
        "s: str",
        "int",
        f"Return how many whitespace-separated words of s have more than {k} characters.",
        f"    return sum(1 for w in s.split() if len(w) > {k})\n",
        lambda s: len([w for w in s.split() if len(w) > k]),
        [("",), ("a bb ccc dddd eeeee ffffff ggggggg",), (_sentence(r, 6),)],
        {"k": k},
    )


@code_family("run_length", "Strings")
def _rle(r):
    count_first = r.random() < 0.5
    fmt = "f'{len(group)}{ch}'" if count_first else "f'{ch}{len(group)}'"

    def oracle(s):
        return "".join(
            f"{len(list(g))}{c}" if count_first else f"{c}{len(list(g))}" for c, g in itertools.groupby(s)
        )

    ex = "'aaab' -> '3a1b'" if count_first else "'aaab' -> 'a3b1'"
    return Spec(
        r.choice(["run_length", "rle_encode", "compress_runs"]),
        "s: str",
        "str",
        f"Run-length encode s: every run of equal characters becomes {'its length then the character' if count_first else 'the character then its length'} ({ex}).",
        "    out = []\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
        f"            j += 1\n        ch, group = s[i], s[i:j]\n        out.append({fmt})\n        i = j\n"
        "    return ''.join(out)\n",
        oracle,
        [("",), ("a",), ("aaabbc",), ("".join(r.choice("ab") * r.randint(1, 3) for _ in range(5)),)],
        {"count_first": count_first},
    )


@code_family("camel_to_snake", "Strings")
def _camel(r):
    def word():
        return r.choice(_WORDS)

    return Spec(
        r.choice(["camel_to_snake", "to_snake_case", "snake_case"]),
        "name: str",
        "str",
        "Convert a camelCase or PascalCase identifier made of letters to snake_case (all lowercase, "
        "an underscore before each uppercase letter except at the start).",
        "    out = []\n    for i, ch in enumerate(name):\n        if ch.isupper() and i > 0:\n"
        "            out.append('_')\n        out.append(ch.lower())\n    return ''.join(out)\n",
        lambda name: re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(),
        [
            ("x",),
            ("camelCase",),
            (word() + word().title() + word().title(),),
            (word().title() + word().title(),),
        ],
    )


@code_family("count_overlapping", "Strings")
def _overlap(r):
    return Spec(
        r.choice(["count_overlapping", "count_occurrences", "substring_count"]),
        "s: str, sub: str",
        "int",
        "Return how many times the non-empty string sub occurs in s, counting overlapping occurrences.",
        "    count = 0\n    start = s.find(sub)\n    while start != -1:\n        count += 1\n"
        "        start = s.find(sub, start + 1)\n    return count\n",
        lambda s, sub: sum(s.startswith(sub, i) for i in range(len(s))),
        [
            ("", "a"),
            ("aaaa", "aa"),
            ("abababa", "aba"),
            ("".join(r.choice("ab") for _ in range(12)), r.choice(["ab", "ba", "aa"])),
        ],
    )


@code_family("balanced_brackets", "Algorithms")
def _balanced(r):
    pairs = r.choice(["()[]", "(){}", "()[]{}", "()<>"])
    closers = {pairs[i + 1]: pairs[i] for i in range(0, len(pairs), 2)}
    desc = " ".join(pairs[i : i + 2] for i in range(0, len(pairs), 2))

    def oracle(s):
        s = "".join(c for c in s if c in pairs)
        prev = None
        while prev != s:
            prev = s
            for i in range(0, len(pairs), 2):
                s = s.replace(pairs[i : i + 2], "")
        return s == ""

    def rand():
        return "".join(r.choice(pairs) for _ in range(r.randint(2, 8)))

    return Spec(
        r.choice(["is_balanced", "balanced_brackets", "brackets_ok"]),
        "s: str",
        "bool",
        f"Return True if the brackets {desc} in s are balanced and properly nested; other characters are ignored.",
        f"    closers = {closers!r}\n    stack = []\n    for ch in s:\n        if ch in closers.values():\n"
        "            stack.append(ch)\n        elif ch in closers:\n            if not stack or stack.pop() != closers[ch]:\n"
        "                return False\n    return not stack\n",
        oracle,
        [
            ("",),
            (pairs[0] + "x" + pairs[1],),
            (pairs[1] + pairs[0],),
            (pairs[:2] + pairs[-2:],),
            (rand(),),
            (rand(),),
        ],
        {"pairs": pairs},
    )


@code_family("is_anagram", "Strings")
def _anagram(r):
    w = r.choice(_WORDS)
    shuffled = "".join(r.sample(w, len(w)))
    return Spec(
        r.choice(["is_anagram", "are_anagrams", "same_letters"]),
        "a: str, b: str",
        "bool",
        "Return True if a and b contain the same letters the same number of times, ignoring case and spaces.",
        "    return sorted(a.replace(' ', '').lower()) == sorted(b.replace(' ', '').lower())\n",
        lambda a, b: Counter(a.lower().replace(" ", "")) == Counter(b.lower().replace(" ", "")),
        [("", ""), ("Listen", "Silent"), (w, shuffled.upper()), (w, w + "s"), ("dormitory", "dirty room")],
    )


@code_family("capitalize_words", "Strings")
def _capitalize(r):
    def oracle(s):
        out, start = [], True
        for ch in s:
            out.append(ch.upper() if start else ch)
            start = ch == " "
        return "".join(out)

    return Spec(
        r.choice(["capitalize_words", "title_words", "upper_first_letters"]),
        "s: str",
        "str",
        "Return s with the first character of every space-separated word made uppercase; nothing else changes.",
        "    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
        oracle,
        [("",), ("hello world",), (_sentence(r, 4),), ("a  b",)],
    )


# ------------------------------------------------------------------------------------------- mappings


@code_family("invert_dict", "Dictionaries")
def _invert(r):
    def oracle(d):
        out = {}
        for k in d:
            out[d[k]] = k
        return out

    keys = r.sample(_WORDS, 4)
    return Spec(
        r.choice(["invert_dict", "swap_keys_values", "reverse_mapping"]),
        "d: dict[str, int]",
        "dict[int, str]",
        "Return a new dict mapping each value of d to its key (the values of d are distinct).",
        "    return {v: k for k, v in d.items()}\n",
        oracle,
        [({},), ({"a": 1},), ({k: i * 3 for i, k in enumerate(keys)},)],
    )


@code_family("fizzbuzz_words", "Loops")
def _fizzbuzz(r):
    a, b = r.sample([2, 3, 4, 5, 7], 2)
    wa, wb = r.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap"], 2)

    def oracle(n):
        out = []
        for i in range(1, n + 1):
            word = ""
            if i % a == 0:
                word += wa
            if i % b == 0:
                word += wb
            out.append(word or str(i))
        return out

    return Spec(
        r.choice(["fizzbuzz", f"{(wa + wb).lower()}", "number_words"]),
        "n: int",
        "list[str]",
        f"Return a list for the numbers 1..n: '{wa}' for multiples of {a}, '{wb}' for multiples of {b}, "
        f"'{wa}{wb}' for multiples of both, and the number as a string otherwise.",
        f"    out = []\n    for i in range(1, n + 1):\n        if i % {a} == 0 and i % {b} == 0:\n"
        f"            out.append('{wa}{wb}')\n        elif i % {a} == 0:\n            out.append('{wa}')\n"
        f"        elif i % {b} == 0:\n            out.append('{wb}')\n        else:\n            out.append(str(i))\n"
        f"    return out\n",
        oracle,
        [(0,), (a * b,), (r.randint(5, 25),)],
        {"a": a, "b": b, "wa": wa, "wb": wb},
    )
