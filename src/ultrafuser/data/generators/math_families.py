"""The template families of the math word-problem generator.

A family draws its parameters, writes a step-by-step solution and the answer (`build`), and has a separate
one-line formula (`check`) that recomputes the answer from the parameters alone: the generator refuses any
problem where the two disagree, and `check_math_record` re-verifies a stored record the same way. Every
integer parameter appears in the problem text; answers are integers. Each family has 2-3 paraphrased wordings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    topic: str
    wordings: tuple[str, ...]
    build: Callable[[random.Random], tuple[dict[str, Any], list[str], int]]
    check: Callable[[dict[str, Any]], int]


FAMILIES: dict[str, Family] = {}


def family(name: str, topic: str, wordings: tuple[str, ...], check: Callable[[dict[str, Any]], int]):
    def deco(build):
        assert name not in FAMILIES, name
        FAMILIES[name] = Family(name, topic, wordings, build, check)
        return build

    return deco


_PEOPLE = [
    ("Ava", "she"),
    ("Liam", "he"),
    ("Mia", "she"),
    ("Noah", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Mateo", "he"),
    ("Hana", "she"),
    ("Kofi", "he"),
    ("Ines", "she"),
    ("Jonas", "he"),
    ("Priya", "she"),
    ("Tom", "he"),
    ("Yuki", "she"),
    ("Diego", "he"),
    ("Nora", "she"),
    ("Sam", "he"),
    ("Amara", "she"),
    ("Felix", "he"),
    ("Chloe", "she"),
    ("Ivan", "he"),
    ("Leila", "she"),
    ("Marco", "he"),
    ("Greta", "she"),
    ("Ali", "he"),
    ("Rosa", "she"),
    ("Ethan", "he"),
]
_GOODS = [
    ("notebooks", 2, 6),
    ("pens", 1, 4),
    ("apples", 1, 3),
    ("comic books", 4, 9),
    ("candles", 3, 8),
    ("mugs", 5, 12),
    ("sandwiches", 4, 9),
    ("toy cars", 3, 10),
    ("plant pots", 4, 11),
    ("socks", 2, 7),
]
_THINGS = ["bicycle", "tablet", "guitar", "telescope", "skateboard", "camera", "tent", "keyboard"]
_SNACKS = ["cookies", "marbles", "stickers", "crayons", "cards", "beads", "shells", "stamps"]


def person(r: random.Random, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    name, he = r.choice([p for p in _PEOPLE if p[0] not in exclude])
    his, him = ("her", "her") if he == "she" else ("his", "him")
    return {"name": name, "he": he, "He": he.capitalize(), "his": his, "His": his.capitalize(), "him": him}


def two_people(r: random.Random) -> dict[str, str]:
    a = person(r)
    b = person(r, exclude=(a["name"],))
    return {**a, "other": b["name"]}


def he_of(par: dict) -> str:
    return par["he"]


# ------------------------------------------------------------------------------------------- money


@family(
    "shopping_change",
    "Money",
    (
        "{name} buys {a} {g1} for ${p} each and {b} {g2} for ${q} each. {He} pays with a ${B} bill. How much change does {he} get?",
        "At the shop, {name} picks up {a} {g1} at ${p} apiece and {b} {g2} at ${q} apiece. If {he} hands over ${B}, how many dollars of change should {he} receive?",
        "{a} {g1} cost ${p} each and {b} {g2} cost ${q} each. {name} buys them all and pays with ${B}. What is the change in dollars?",
    ),
    check=lambda p: p["B"] - p["a"] * p["p"] - p["b"] * p["q"],
)
def _shopping_change(r):
    (g1, lo1, hi1), (g2, lo2, hi2) = r.sample(_GOODS, 2)
    a, pp, b, q = r.randint(2, 6), r.randint(lo1, hi1), r.randint(2, 6), r.randint(lo2, hi2)
    t = a * pp + b * q
    B = next(x for x in (20, 50, 100, 200) if x > t)
    par = dict(person(r), a=a, p=pp, b=b, q=q, B=B, g1=g1, g2=g2)
    steps = [
        f"The {g1} cost {a} * {pp} = {a * pp} dollars.",
        f"The {g2} cost {b} * {q} = {b * q} dollars.",
        f"Together they cost {a * pp} + {b * q} = {t} dollars.",
        f"The change is {B} - {t} = {B - t} dollars.",
    ]
    return par, steps, B - t


@family(
    "savings_goal",
    "Money",
    (
        "{name} wants a {thing} that costs ${T}. {He} has already saved ${h} and saves ${s} every week. How many weeks will it take {him} to have exactly enough?",
        "A {thing} costs ${T}. {name} has ${h} in {his} piggy bank and adds ${s} each week. After how many weeks can {he} buy the {thing}?",
    ),
    check=lambda p: (p["T"] - p["h"]) // p["s"],
)
def _savings_goal(r):
    s, w, h = r.randint(5, 25), r.randint(3, 15), r.randint(10, 90)
    T = h + s * w
    par = dict(person(r), T=T, h=h, s=s, thing=r.choice(_THINGS))
    steps = [
        f"{par['name']} still needs {T} - {h} = {T - h} dollars.",
        f"At {s} dollars a week that takes {T - h} / {s} = {w} weeks.",
    ]
    return par, steps, w


@family(
    "discount_total",
    "Percent",
    (
        "A jacket normally costs ${P}. During a sale everything is {d}% off. {name} buys {n} jackets. How much does {he} pay in total?",
        "{name} buys {n} jackets that are marked ${P} each, but the store gives {d}% off. What is the total cost in dollars?",
        "The regular price of a jacket is ${P}. With a {d}% discount, how much do {n} jackets cost?",
    ),
    check=lambda p: p["P"] * (100 - p["d"]) // 100 * p["n"],
)
def _discount_total(r):
    d = r.choice([10, 20, 25, 50])
    P = r.randint(2, 12) * {10: 10, 20: 5, 25: 4, 50: 2}[d] * 2
    n = r.randint(2, 5)
    off = P * d // 100
    par = dict(person(r), P=P, d=d, n=n)
    steps = [
        f"The discount is {d}% of {P}, which is {P} * {d} / 100 = {off} dollars.",
        f"Each jacket costs {P} - {off} = {P - off} dollars.",
        f"{n} jackets cost {n} * {P - off} = {n * (P - off)} dollars.",
    ]
    return par, steps, n * (P - off)


@family(
    "ticket_profit",
    "Money",
    (
        "A school play sells {a} adult tickets at ${p} each and {c} child tickets at ${q} each. Putting on the play cost ${C}. How much profit does the school make?",
        "For a concert, {a} adult tickets were sold for ${p} each and {c} children's tickets for ${q} each. If the costs were ${C}, what was the profit in dollars?",
    ),
    check=lambda p: p["a"] * p["p"] + p["c"] * p["q"] - p["C"],
)
def _ticket_profit(r):
    a, pp, c, q = r.randint(20, 90), r.randint(6, 15), r.randint(10, 60), r.randint(2, 5)
    rev = a * pp + c * q
    C = r.randint(rev // 5, rev // 2)
    steps = [
        f"Adult tickets bring in {a} * {pp} = {a * pp} dollars.",
        f"Child tickets bring in {c} * {q} = {c * q} dollars.",
        f"Revenue is {a * pp} + {c * q} = {rev} dollars.",
        f"Profit is {rev} - {C} = {rev - C} dollars.",
    ]
    return dict(a=a, p=pp, c=c, q=q, C=C), steps, rev - C


@family(
    "budget_items",
    "Money",
    (
        "{name} has ${B}. {He} buys {x} notebooks at ${p} each. With the money left, what is the largest number of pens at ${q} each that {he} can buy?",
        "With ${B} to spend, {name} first gets {x} notebooks costing ${p} each. Pens cost ${q} each. How many pens can {he} afford at most with the rest?",
    ),
    check=lambda p: (p["B"] - p["x"] * p["p"]) // p["q"],
)
def _budget_items(r):
    x, pp, q = r.randint(2, 6), r.randint(3, 8), r.randint(2, 7)
    B = x * pp + r.randint(q, 8 * q + q - 1)
    left = B - x * pp
    par = dict(person(r), B=B, x=x, p=pp, q=q)
    steps = [
        f"The notebooks cost {x} * {pp} = {x * pp} dollars.",
        f"{B} - {x * pp} = {left} dollars are left.",
        f"{left} / {q} = {left // q} with {left % q} left over, so {he_of(par)} can buy {left // q} pens.",
    ]
    return par, steps, left // q


@family(
    "phone_plan",
    "Money",
    (
        "A phone plan costs ${F} per month plus ${c} for every gigabyte of data used. {name} uses {u} gigabytes each month. How much does {he} pay over {m} months?",
        "{name}'s phone bill is a ${F} monthly fee plus ${c} per GB. If {he} uses {u} GB a month, what does {he} pay in total for {m} months?",
    ),
    check=lambda p: p["m"] * (p["F"] + p["c"] * p["u"]),
)
def _phone_plan(r):
    F, c, u, m = r.randint(10, 30), r.randint(2, 6), r.randint(2, 9), r.randint(2, 12)
    par = dict(person(r), F=F, c=c, u=u, m=m)
    steps = [
        f"Data costs {u} * {c} = {u * c} dollars a month.",
        f"Each month costs {F} + {u * c} = {F + u * c} dollars.",
        f"Over {m} months that is {m} * {F + u * c} = {m * (F + u * c)} dollars.",
    ]
    return par, steps, m * (F + u * c)


@family(
    "commission_pay",
    "Percent",
    (
        "A salesperson earns a base salary of ${B} a month plus {c}% commission on sales. Last month {name} sold ${S} worth of goods. How much did {he} earn?",
        "{name} gets ${B} per month plus {c}% of {his} sales. {His} sales this month were ${S}. What are {his} total earnings in dollars?",
    ),
    check=lambda p: p["B"] + p["S"] * p["c"] // 100,
)
def _commission_pay(r):
    c = r.choice([2, 4, 5, 10, 15, 20])
    S = r.randint(10, 90) * 100
    B = r.randint(8, 30) * 100
    com = S * c // 100
    par = dict(person(r), B=B, c=c, S=S)
    steps = [
        f"The commission is {c}% of {S}: {S} * {c} / 100 = {com} dollars.",
        f"Total earnings are {B} + {com} = {B + com} dollars.",
    ]
    return par, steps, B + com


@family(
    "overtime_pay",
    "Work",
    (
        "{name} earns ${w} an hour for the first 40 hours of a week and one and a half times that rate for every hour beyond 40. This week {he} worked {h} hours. How much did {he} earn?",
        "The pay is ${w} per hour up to 40 hours, and overtime hours are paid at 1.5 times the normal rate. How much does {name} make for a {h}-hour week?",
    ),
    check=lambda p: 40 * p["w"] + (p["h"] - 40) * p["w"] * 3 // 2,
)
def _overtime_pay(r):
    w, o = r.randint(6, 20) * 2, r.randint(1, 12)
    h, ot = 40 + o, w * 3 // 2
    par = dict(person(r), w=w, h=h)
    steps = [
        f"Regular pay is 40 * {w} = {40 * w} dollars.",
        f"{par['name']} worked {h} - 40 = {o} overtime hours.",
        f"The overtime rate is {w} * 1.5 = {ot} dollars, so overtime pay is {o} * {ot} = {o * ot} dollars.",
        f"Total pay is {40 * w} + {o * ot} = {40 * w + o * ot} dollars.",
    ]
    return par, steps, 40 * w + o * ot


@family(
    "car_fuel_cost",
    "Rates",
    (
        "A car uses {f} liters of fuel per 100 km. Fuel costs ${p} per liter. How much does the fuel for a {d} km trip cost?",
        "{name}'s car burns {f} liters every 100 kilometers. If gas is ${p} a liter, what does {he} spend on fuel to drive {d} km?",
    ),
    check=lambda p: p["d"] // 100 * p["f"] * p["p"],
)
def _car_fuel_cost(r):
    f, pp, k = r.randint(5, 12), r.randint(1, 3), r.randint(2, 9)
    d = 100 * k
    par = dict(person(r), f=f, p=pp, d=d)
    steps = [
        f"{d} km is {d} / 100 = {k} hundreds of kilometers.",
        f"The car uses {k} * {f} = {k * f} liters.",
        f"The fuel costs {k * f} * {pp} = {k * f * pp} dollars.",
    ]
    return par, steps, k * f * pp


# ------------------------------------------------------------------------------------------- counting


@family(
    "book_pages",
    "Reading",
    (
        "A book has {P} pages. {name} reads {r1} pages a day for {d1} days and then {r2} pages a day for {d2} days. How many pages are left?",
        "{name} is reading a {P}-page novel. For {d1} days {he} reads {r1} pages per day, then for {d2} days {he} reads {r2} pages per day. How many pages does {he} still have to read?",
    ),
    check=lambda p: p["P"] - p["r1"] * p["d1"] - p["r2"] * p["d2"],
)
def _book_pages(r):
    r1, d1, r2, d2 = r.randint(5, 20), r.randint(2, 6), r.randint(10, 30), r.randint(2, 5)
    read = r1 * d1 + r2 * d2
    P = read + r.randint(10, 150)
    par = dict(person(r), P=P, r1=r1, d1=d1, r2=r2, d2=d2)
    steps = [
        f"First {he_of(par)} reads {r1} * {d1} = {r1 * d1} pages.",
        f"Then {he_of(par)} reads {r2} * {d2} = {r2 * d2} pages.",
        f"In total {r1 * d1} + {r2 * d2} = {read} pages are read.",
        f"{P} - {read} = {P - read} pages are left.",
    ]
    return par, steps, P - read


@family(
    "share_remaining",
    "Sharing",
    (
        "{name} has {A} {s}. {He} gives {g} to {his} brother and shares the rest equally among {k} friends. How many {s} does each friend get?",
        "There are {A} {s} in a jar. {name} keeps none: {g} go to {his} teacher and the others are split evenly between {k} classmates. How many does each classmate receive?",
    ),
    check=lambda p: (p["A"] - p["g"]) // p["k"],
)
def _share_remaining(r):
    k, each, g = r.randint(2, 8), r.randint(3, 15), r.randint(2, 20)
    A = k * each + g
    par = dict(person(r), A=A, g=g, k=k, s=r.choice(_SNACKS))
    steps = [
        f"After giving away {g}, {A} - {g} = {A - g} are left.",
        f"Shared among {k}, each gets {A - g} / {k} = {each}.",
    ]
    return par, steps, each


@family(
    "bus_riders",
    "Counting",
    (
        "A bus leaves the station with {s} passengers. At the first stop {a} get off and {b} get on. At the second stop {c} get off and {d} get on. How many passengers are on the bus now?",
        "There are {s} people on a bus. {a} people leave and {b} board at stop one; at stop two, {c} leave and {d} board. How many people are on the bus after the second stop?",
    ),
    check=lambda p: p["s"] - p["a"] + p["b"] - p["c"] + p["d"],
)
def _bus_riders(r):
    s = r.randint(15, 50)
    a = r.randint(1, s - 5)
    b = r.randint(1, 20)
    c = r.randint(1, s - a + b - 1)
    d = r.randint(1, 20)
    x1 = s - a + b
    steps = [
        f"After the first stop there are {s} - {a} + {b} = {x1} passengers.",
        f"After the second stop there are {x1} - {c} + {d} = {x1 - c + d} passengers.",
    ]
    return dict(s=s, a=a, b=b, c=c, d=d), steps, x1 - c + d


@family(
    "marble_gap",
    "Comparisons",
    (
        "{name} has {a} marbles and {other} has {b} marbles. {name} gives {x} marbles to {other}. How many more marbles does {other} have than {name} now?",
        "{other} owns {b} marbles and {name} owns {a}. After {name} hands {x} of {his} marbles to {other}, how many more marbles does {other} have?",
    ),
    check=lambda p: (p["b"] + p["x"]) - (p["a"] - p["x"]),
)
def _marble_gap(r):
    a = r.randint(10, 40)
    x = r.randint(1, a // 2)
    b = r.randint(a - 2 * x + 1, a + 30) if a - 2 * x + 1 > 0 else r.randint(1, 30)
    par = dict(two_people(r), a=a, b=b, x=x)
    na, nb = a - x, b + x
    steps = [
        f"{par['name']} now has {a} - {x} = {na} marbles.",
        f"{par['other']} now has {b} + {x} = {nb} marbles.",
        f"The difference is {nb} - {na} = {nb - na}.",
    ]
    return par, steps, nb - na


@family(
    "stamp_collection",
    "Counting",
    (
        "{name} has {s} stamps. {He} buys {b} new stamps every month for {m} months and then gives {g} stamps to a friend. How many stamps does {he} have?",
        "A collector starts with {s} stamps, adds {b} stamps a month for {m} months, and finally gives away {g}. How many stamps are in the collection?",
    ),
    check=lambda p: p["s"] + p["b"] * p["m"] - p["g"],
)
def _stamp_collection(r):
    s, b, m = r.randint(20, 200), r.randint(3, 15), r.randint(2, 12)
    g = r.randint(1, s)
    par = dict(person(r), s=s, b=b, m=m, g=g)
    steps = [
        f"Over {m} months {b} * {m} = {b * m} stamps are added.",
        f"That makes {s} + {b * m} = {s + b * m} stamps.",
        f"After giving away {g}: {s + b * m} - {g} = {s + b * m - g} stamps.",
    ]
    return par, steps, s + b * m - g


@family(
    "egg_dozens",
    "Units",
    (
        "{name} buys {d} dozen eggs. {He} uses {u} eggs to bake cakes and {v} eggs for breakfast. How many eggs are left?",
        "A cook has {d} dozen eggs. {u} are used for pastries and {v} for omelets. How many eggs remain?",
    ),
    check=lambda p: 12 * p["d"] - p["u"] - p["v"],
)
def _egg_dozens(r):
    d = r.randint(2, 8)
    u = r.randint(2, 6 * d)
    v = r.randint(1, 12 * d - u)
    par = dict(person(r), d=d, u=u, v=v)
    steps = [
        f"{d} dozen is {d} * 12 = {12 * d} eggs.",
        f"{u} + {v} = {u + v} eggs are used.",
        f"{12 * d} - {u + v} = {12 * d - u - v} eggs are left.",
    ]
    return par, steps, 12 * d - u - v


@family(
    "library_books",
    "Counting",
    (
        "A library has {B} books on its shelves. Each day {l} books are borrowed and {g} are returned. How many books are on the shelves after {d} days?",
        "Every day, readers borrow {l} books from a library and bring back {g}. The library started with {B} books on the shelves. How many are there after {d} days?",
    ),
    check=lambda p: p["B"] - (p["l"] - p["g"]) * p["d"],
)
def _library_books(r):
    g = r.randint(2, 20)
    lent = g + r.randint(1, 10)
    d = r.randint(2, 10)
    B = r.randint(200, 900)
    net = lent - g
    steps = [
        f"Each day the shelves lose {lent} - {g} = {net} books.",
        f"In {d} days that is {net} * {d} = {net * d} books.",
        f"{B} - {net * d} = {B - net * d} books are left on the shelves.",
    ]
    return dict(B=B, l=lent, g=g, d=d), steps, B - net * d


@family(
    "candy_days",
    "Division",
    (
        "{name} buys {p} packs of {s} with {c} in each pack. {He} uses {e} of them every day. How many days do they last?",
        "There are {c} {s} in a pack and {name} has {p} packs. If {he} uses {e} a day, after how many days are they all gone?",
    ),
    check=lambda p: p["p"] * p["c"] // p["e"],
)
def _candy_days(r):
    e, days = r.randint(2, 9), r.randint(3, 20)
    total = e * days
    divs = [x for x in range(2, 13) if total % x == 0 and 2 <= total // x <= 30] or [1]
    pk = r.choice(divs)
    c = total // pk
    par = dict(person(r), p=pk, c=c, e=e, s=r.choice(_SNACKS))
    steps = [
        f"There are {pk} * {c} = {total} in total.",
        f"At {e} per day they last {total} / {e} = {days} days.",
    ]
    return par, steps, days


@family(
    "farm_legs",
    "Counting",
    (
        "A farm has {c} chickens, {w} cows and {d} ducks. How many legs do the animals have in total?",
        "On {name}'s farm there are {c} chickens, {d} ducks and {w} cows. Counting all their legs, how many legs are there?",
    ),
    check=lambda p: 2 * p["c"] + 4 * p["w"] + 2 * p["d"],
)
def _farm_legs(r):
    c, w, d = r.randint(3, 30), r.randint(2, 20), r.randint(1, 15)
    par = dict(person(r), c=c, w=w, d=d)
    steps = [
        f"Chickens and ducks have 2 legs: ({c} + {d}) * 2 = {2 * (c + d)} legs.",
        f"Cows have 4 legs: {w} * 4 = {4 * w} legs.",
        f"In total {2 * (c + d)} + {4 * w} = {2 * (c + d) + 4 * w} legs.",
    ]
    return par, steps, 2 * (c + d) + 4 * w


@family(
    "heads_legs",
    "Counting",
    (
        "A farm has only chickens and cows. Together they have {H} heads and {L} legs. How many cows are there?",
        "In a barn there are chickens and cows. {name} counts {H} heads and {L} legs. How many of the animals are cows?",
    ),
    check=lambda p: (p["L"] - 2 * p["H"]) // 2,
)
def _heads_legs(r):
    ch, cw = r.randint(2, 30), r.randint(2, 30)
    H, L = ch + cw, 2 * ch + 4 * cw
    par = dict(person(r), H=H, L=L)
    steps = [
        f"If all {H} animals were chickens there would be {H} * 2 = {2 * H} legs.",
        f"The extra legs are {L} - {2 * H} = {L - 2 * H}.",
        f"Each cow adds 2 extra legs, so there are {L - 2 * H} / 2 = {cw} cows.",
    ]
    return par, steps, cw


# ------------------------------------------------------------------------------------------- rates, time


@family(
    "two_leg_trip",
    "Rates",
    (
        "{name} drives at {v1} miles per hour for {t1} hours and then at {v2} miles per hour for {t2} hours. How many miles does {he} drive in total?",
        "A truck travels {t1} hours at {v1} mph, then {t2} hours at {v2} mph. What total distance in miles does it cover?",
    ),
    check=lambda p: p["v1"] * p["t1"] + p["v2"] * p["t2"],
)
def _two_leg_trip(r):
    v1, t1, v2, t2 = r.randint(30, 70), r.randint(1, 5), r.randint(20, 65), r.randint(1, 4)
    par = dict(person(r), v1=v1, t1=t1, v2=v2, t2=t2)
    steps = [
        f"The first part is {v1} * {t1} = {v1 * t1} miles.",
        f"The second part is {v2} * {t2} = {v2 * t2} miles.",
        f"In total {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} miles.",
    ]
    return par, steps, v1 * t1 + v2 * t2


@family(
    "tank_fill_time",
    "Rates",
    (
        "A water tank holds {C} liters and already contains {w} liters. A pump adds {p} liters per minute. How many minutes does it take to fill the tank?",
        "{name} is filling a {C}-liter tank that has {w} liters in it. The hose delivers {p} liters each minute. After how many minutes is the tank full?",
    ),
    check=lambda p: (p["C"] - p["w"]) // p["p"],
)
def _tank_fill_time(r):
    p, m, w = r.randint(3, 25), r.randint(4, 40), r.randint(10, 200)
    C = w + p * m
    par = dict(person(r), C=C, w=w, p=p)
    steps = [
        f"The tank needs {C} - {w} = {C - w} more liters.",
        f"At {p} liters per minute that takes {C - w} / {p} = {m} minutes.",
    ]
    return par, steps, m


@family(
    "weekly_running",
    "Rates",
    (
        "{name} runs {r} km on each weekday and {s} km on each day of the weekend. How many kilometers does {he} run in {w} weeks?",
        "Every Monday to Friday {name} jogs {r} km, and on Saturday and Sunday {he} jogs {s} km each day. What distance does {he} cover in {w} weeks?",
    ),
    check=lambda p: p["w"] * (5 * p["r"] + 2 * p["s"]),
)
def _weekly_running(r):
    a, s, w = r.randint(2, 8), r.randint(5, 15), r.randint(2, 6)
    par = dict(person(r), r=a, s=s, w=w)
    wk = 5 * a + 2 * s
    steps = [
        f"On weekdays {he_of(par)} runs 5 * {a} = {5 * a} km.",
        f"On the weekend {he_of(par)} runs 2 * {s} = {2 * s} km.",
        f"A week is {5 * a} + {2 * s} = {wk} km, so {w} weeks is {w} * {wk} = {w * wk} km.",
    ]
    return par, steps, w * wk


@family(
    "chores_time",
    "Time",
    (
        "Every day {name} spends {a} minutes washing dishes, {b} minutes vacuuming and {c} minutes walking the dog. How many minutes does {he} spend on these chores in {d} days?",
        "{name}'s daily chores take {a}, {b} and {c} minutes. How many minutes of chores is that over {d} days?",
    ),
    check=lambda p: (p["a"] + p["b"] + p["c"]) * p["d"],
)
def _chores_time(r):
    a, b, c, d = r.randint(5, 30), r.randint(5, 40), r.randint(10, 45), r.randint(2, 14)
    par = dict(person(r), a=a, b=b, c=c, d=d)
    steps = [
        f"One day takes {a} + {b} + {c} = {a + b + c} minutes.",
        f"{d} days take {d} * {a + b + c} = {d * (a + b + c)} minutes.",
    ]
    return par, steps, d * (a + b + c)


@family(
    "machine_parts",
    "Work",
    (
        "A factory runs {k} machines. Each machine makes {m} parts per hour. In a {h}-hour shift, {f} out of every 100 parts are defective. How many good parts are made in the shift?",
        "{k} machines each produce {m} parts an hour for {h} hours. Quality control rejects {f}% of the parts. How many parts pass?",
    ),
    check=lambda p: p["k"] * p["m"] * p["h"] * (100 - p["f"]) // 100,
)
def _machine_parts(r):
    k, h, f = r.randint(2, 6), r.randint(4, 10), r.choice([1, 2, 3, 4, 5, 10])
    m = 100 // math.gcd(100, k * h) * r.randint(1, 3)
    tot = k * m * h
    bad = tot * f // 100
    steps = [
        f"One machine makes {m} * {h} = {m * h} parts in the shift.",
        f"{k} machines make {k} * {m * h} = {tot} parts.",
        f"Defective parts: {tot} * {f} / 100 = {bad}.",
        f"Good parts: {tot} - {bad} = {tot - bad}.",
    ]
    return dict(k=k, m=m, h=h, f=f), steps, tot - bad


@family(
    "temperature_change",
    "Measurement",
    (
        "In the morning the temperature is {T} degrees. It drops {d} degrees every hour for {h} hours and then rises {u} degrees. What is the temperature now?",
        "The thermometer shows {T} degrees. Over the next {h} hours it falls by {d} degrees each hour, and afterwards it climbs {u} degrees. What does it show?",
    ),
    check=lambda p: p["T"] - p["d"] * p["h"] + p["u"],
)
def _temperature_change(r):
    T, d, h, u = r.randint(10, 35), r.randint(1, 4), r.randint(2, 6), r.randint(1, 9)
    x = T - d * h
    steps = [
        f"It drops {d} * {h} = {d * h} degrees.",
        f"{T} - {d * h} = {x} degrees.",
        f"Then {x} + {u} = {x + u} degrees.",
    ]
    return dict(T=T, d=d, h=h, u=u), steps, x + u


# ------------------------------------------------------------------------------------------- geometry


@family(
    "fence_cost",
    "Geometry",
    (
        "A rectangular garden is {L} meters long and {W} meters wide. Fencing costs ${c} per meter. How much does it cost to fence the whole garden?",
        "{name} wants to put a fence around a {L} m by {W} m rectangular yard. If fencing is ${c} a meter, what is the total cost?",
    ),
    check=lambda p: 2 * (p["L"] + p["W"]) * p["c"],
)
def _fence_cost(r):
    L, W, c = r.randint(5, 40), r.randint(3, 30), r.randint(2, 15)
    per = 2 * (L + W)
    par = dict(person(r), L=L, W=W, c=c)
    steps = [
        f"The perimeter is 2 * ({L} + {W}) = {per} meters.",
        f"The fence costs {per} * {c} = {per * c} dollars.",
    ]
    return par, steps, per * c


@family(
    "tile_boxes",
    "Geometry",
    (
        "A room floor is {L} feet by {W} feet. One box of tiles covers {k} square feet. How many boxes are needed to cover the floor exactly?",
        "{name} is tiling a {L} ft by {W} ft floor. Each box holds enough tiles for {k} square feet. How many boxes does {he} need?",
    ),
    check=lambda p: p["L"] * p["W"] // p["k"],
)
def _tile_boxes(r):
    k = r.choice([4, 5, 6, 8, 9, 10, 12])
    while True:
        L, W = r.randint(6, 30), r.randint(5, 25)
        if (L * W) % k == 0:
            break
    par = dict(person(r), L=L, W=W, k=k)
    steps = [f"The area is {L} * {W} = {L * W} square feet.", f"{L * W} / {k} = {L * W // k} boxes."]
    return par, steps, L * W // k


@family(
    "square_area_from_perimeter",
    "Geometry",
    (
        "A square has a perimeter of {P} centimeters. What is its area in square centimeters?",
        "The fence around a square pen is {P} meters long. What is the area of the pen in square meters?",
    ),
    check=lambda p: (p["P"] // 4) ** 2,
)
def _square_area(r):
    s = r.randint(3, 30)
    steps = [f"Each side is {4 * s} / 4 = {s}.", f"The area is {s} * {s} = {s * s}."]
    return dict(P=4 * s), steps, s * s


@family(
    "rectangle_from_perimeter",
    "Geometry",
    (
        "A rectangle has a perimeter of {P} meters and a length of {L} meters. What is its area in square meters?",
        "{name} fences a rectangular plot with {P} meters of fence. The plot is {L} meters long. What is the area of the plot?",
    ),
    check=lambda p: p["L"] * (p["P"] // 2 - p["L"]),
)
def _rect_from_perimeter(r):
    L, W = r.randint(5, 30), r.randint(2, 25)
    P = 2 * (L + W)
    par = dict(person(r), P=P, L=L)
    steps = [
        f"Length plus width is {P} / 2 = {L + W}.",
        f"The width is {L + W} - {L} = {W}.",
        f"The area is {L} * {W} = {L * W}.",
    ]
    return par, steps, L * W


# ------------------------------------------------------------------------------------------- ratios, fractions, averages


@family(
    "class_girls",
    "Fractions",
    (
        "A class has {N} students and {a}/{b} of them are boys. How many girls are in the class?",
        "There are {N} children in a school club. If {a}/{b} of the children are boys, how many are girls?",
    ),
    check=lambda p: p["N"] - p["N"] * p["a"] // p["b"],
)
def _class_girls(r):
    b = r.choice([3, 4, 5, 6, 8])
    a = r.randint(1, b - 1)
    N = b * r.randint(3, 8)
    boys = N * a // b
    steps = [f"Boys: {N} * {a} / {b} = {boys}.", f"Girls: {N} - {boys} = {N - boys}."]
    return dict(N=N, a=a, b=b), steps, N - boys


@family(
    "fruit_basket",
    "Fractions",
    (
        "A basket holds {N} pieces of fruit. One {a_word} of them are apples, and one {b_word} of the remaining fruit are oranges. The rest are bananas. How many bananas are there?",
        "There are {N} fruits in a box: 1/{a} are apples, 1/{b} of what is left are oranges, and the others are bananas. How many bananas are in the box?",
    ),
    check=lambda p: (p["N"] - p["N"] // p["a"]) - (p["N"] - p["N"] // p["a"]) // p["b"],
)
def _fruit_basket(r):
    words = {2: "half", 3: "third", 4: "quarter", 5: "fifth", 6: "sixth"}
    a, b = r.choice([2, 3, 4, 5]), r.choice([2, 3, 4, 5, 6])
    while True:
        N = a * r.randint(2, 12)
        if (N - N // a) % b == 0:
            break
    rest = N - N // a
    steps = [
        f"Apples: {N} / {a} = {N // a}.",
        f"Remaining: {N} - {N // a} = {rest}.",
        f"Oranges: {rest} / {b} = {rest // b}.",
        f"Bananas: {rest} - {rest // b} = {rest - rest // b}.",
    ]
    return dict(N=N, a=a, b=b, a_word=words[a], b_word=words[b]), steps, rest - rest // b


@family(
    "ratio_split",
    "Ratios",
    (
        "{name} and {other} share ${S} in the ratio {x}:{y}. How many dollars does {other} get?",
        "Two friends, {name} and {other}, split ${S} so that their shares are in the ratio {x} to {y}. What is {other}'s share in dollars?",
    ),
    check=lambda p: p["S"] * p["y"] // (p["x"] + p["y"]),
)
def _ratio_split(r):
    x, y = r.randint(1, 7), r.randint(1, 7)
    unit = r.randint(3, 25)
    S = (x + y) * unit
    par = dict(two_people(r), S=S, x=x, y=y)
    steps = [
        f"There are {x} + {y} = {x + y} parts.",
        f"Each part is {S} / {x + y} = {unit} dollars.",
        f"{par['other']} gets {y} * {unit} = {y * unit} dollars.",
    ]
    return par, steps, y * unit


@family(
    "test_average_needed",
    "Averages",
    (
        "{name} scored {s1}, {s2} and {s3} on three tests. What score does {he} need on the fourth test to have an average of {M}?",
        "After three quizzes with scores of {s1}, {s2} and {s3}, {name} wants a four-quiz average of exactly {M}. What must {he} score on the last quiz?",
    ),
    check=lambda p: 4 * p["M"] - p["s1"] - p["s2"] - p["s3"],
)
def _average_needed(r):
    while True:
        s1, s2, s3, M = r.randint(55, 98), r.randint(55, 98), r.randint(55, 98), r.randint(65, 92)
        need = 4 * M - s1 - s2 - s3
        if 40 <= need <= 100:
            break
    par = dict(person(r), s1=s1, s2=s2, s3=s3, M=M)
    steps = [
        f"An average of {M} over 4 tests needs a total of 4 * {M} = {4 * M}.",
        f"The first three add up to {s1} + {s2} + {s3} = {s1 + s2 + s3}.",
        f"The fourth score must be {4 * M} - {s1 + s2 + s3} = {need}.",
    ]
    return par, steps, need


@family(
    "population_growth",
    "Percent",
    (
        "A town has {P} people. This year the population grows by {r}%, and then {k} people move away. How many people live in the town now?",
        "The population of a village was {P}. It increased by {r}% and afterwards {k} residents left. What is the population now?",
    ),
    check=lambda p: p["P"] + p["P"] * p["r"] // 100 - p["k"],
)
def _population_growth(r):
    rr = r.choice([5, 10, 20, 25, 50])
    P = r.randint(4, 80) * 100
    g = P * rr // 100
    k = r.randint(10, g)
    steps = [
        f"The growth is {P} * {rr} / 100 = {g} people.",
        f"{P} + {g} = {P + g} people.",
        f"After {k} leave: {P + g} - {k} = {P + g - k}.",
    ]
    return dict(P=P, r=rr, k=k), steps, P + g - k


@family(
    "age_sum",
    "Ages",
    (
        "{name} is {x} years older than {other}. {other} is {y} years old. What will the sum of their ages be in {z} years?",
        "{other} is {y} and {name} is {x} years older. In {z} years, how old will they be together?",
    ),
    check=lambda p: (p["y"] + p["x"] + p["z"]) + (p["y"] + p["z"]),
)
def _age_sum(r):
    x, y, z = r.randint(2, 30), r.randint(4, 40), r.randint(2, 15)
    par = dict(two_people(r), x=x, y=y, z=z)
    a_now = y + x
    steps = [
        f"{par['name']} is {y} + {x} = {a_now} years old.",
        f"In {z} years {par['name']} will be {a_now} + {z} = {a_now + z}.",
        f"{par['other']} will be {y} + {z} = {y + z}.",
        f"Together: {a_now + z} + {y + z} = {a_now + y + 2 * z}.",
    ]
    return par, steps, a_now + y + 2 * z


@family(
    "cookie_flour",
    "Cooking",
    (
        "A recipe uses {f} cups of flour to make {c} cookies. How many cups of flour are needed for {N} cookies?",
        "{name} needs {f} cups of flour for every batch of {c} cookies. {He} wants to bake {N} cookies. How many cups of flour does {he} need?",
    ),
    check=lambda p: p["N"] // p["c"] * p["f"],
)
def _cookie_flour(r):
    f, c, k = r.randint(1, 4), r.choice([12, 18, 24, 30, 36]), r.randint(2, 8)
    N = c * k
    par = dict(person(r), f=f, c=c, N=N)
    steps = [f"{N} cookies are {N} / {c} = {k} batches.", f"The flour needed is {k} * {f} = {k * f} cups."]
    return par, steps, k * f


@family(
    "tomato_harvest",
    "Farming",
    (
        "A garden has {rows} rows with {c} tomato plants in each row. Each plant gives {y} tomatoes. The tomatoes are packed in boxes of {b}. How many boxes are filled?",
        "{name} grows tomatoes in {rows} rows of {c} plants. Every plant yields {y} tomatoes, and {he} packs them {b} to a box. How many full boxes does {he} get?",
    ),
    check=lambda p: p["rows"] * p["c"] * p["y"] // p["b"],
)
def _tomato_harvest(r):
    b = r.choice([5, 6, 10, 12])
    while True:
        rows, c, y = r.randint(2, 9), r.randint(3, 12), r.randint(4, 20)
        if (rows * c * y) % b == 0:
            break
    par = dict(person(r), rows=rows, c=c, y=y, b=b)
    plants, tom = rows * c, rows * c * y
    steps = [
        f"There are {rows} * {c} = {plants} plants.",
        f"They give {plants} * {y} = {tom} tomatoes.",
        f"{tom} / {b} = {tom // b} boxes.",
    ]
    return par, steps, tom // b


@family(
    "pizza_leftover",
    "Food",
    (
        "{name} orders {n} pizzas cut into {s} slices each. {k} people each eat {e} slices. How many slices are left?",
        "At a party there are {n} pizzas with {s} slices apiece. If {k} guests eat {e} slices each, how many slices remain?",
    ),
    check=lambda p: p["n"] * p["s"] - p["k"] * p["e"],
)
def _pizza_leftover(r):
    n, s = r.randint(2, 8), r.choice([6, 8, 10, 12])
    e = r.randint(1, 4)
    k = r.randint(2, n * s // e)
    par = dict(person(r), n=n, s=s, k=k, e=e)
    steps = [
        f"There are {n} * {s} = {n * s} slices.",
        f"{k} * {e} = {k * e} slices are eaten.",
        f"{n * s} - {k * e} = {n * s - k * e} slices are left.",
    ]
    return par, steps, n * s - k * e


@family(
    "consecutive_sum",
    "Number sense",
    (
        "The sum of three consecutive whole numbers is {S}. What is the largest of the three numbers?",
        "Three consecutive integers add up to {S}. Find the biggest one.",
    ),
    check=lambda p: p["S"] // 3 + 1,
)
def _consecutive_sum(r):
    m = r.randint(5, 300)
    S = 3 * m
    steps = [f"The middle number is the average: {S} / 3 = {m}.", f"The largest is {m} + 1 = {m + 1}."]
    return dict(S=S), steps, m + 1
