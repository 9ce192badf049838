"""Write cai's bundled maths problems: arithmetic and short word problems in five levels of difficulty,
each with its exact answer, split into a train set and a held-out set that share no problem.

    python scripts/make_maths.py                      # rewrites data/maths_train.jsonl, data/maths_heldout.jsonl
    python scripts/make_maths.py --per-level 200 --heldout-per-level 40 --seed 7 --out-dir /tmp/maths

The same options give the same bytes (one seeded `random.Random`, no clock, no hash order), so the
bundled files can be checked against a fresh run. Levels:

    1  one-digit addition and subtraction          What is 7 + 5?
    2  two-digit addition and subtraction          What is 48 - 19?
    3  one-digit multiplication, three-term sums   What is 6 * 8?   What is 4 + 9 - 3?
    4  one-step word problems (add, take away, groups of)
    5  two-step word problems

Every record carries the arithmetic it asks for (`expression`, Python syntax over integers) beside
`answer`, so a reader (and tests/test_maths_data.py) can check every answer by evaluating it. A problem is its arithmetic, whatever the wording (`key`: the terms
added and the terms taken away, each a sorted product, so 3 + 5, 5 + 3 and "Ana has 3 apples and gets
5 more" are one problem): the held-out set is drawn first, and no train problem repeats one of its keys,
nor does any problem appear twice.

It lives in scripts/ rather than in cai/: the pipeline never runs it (it reads the files it wrote, as
it reads any prompt file), and it is no measurement, which is what bench/ holds.
"""

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

# Appended to every question: one final number the maths reward can read (the last number in the reply).
INSTRUCTION = "Give the final answer as a number."

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia")
THINGS = ("apples", "books", "marbles", "stickers", "pencils", "cards", "shells", "coins", "stamps", "eggs")
BOXES = ("bags", "boxes", "rows", "baskets", "packs", "shelves")

# A problem: (question text, expression over integers).
Problem = tuple[str, str]


def _arith(op: str, *numbers: int) -> Problem:
    expression = f" {op} ".join(str(n) for n in numbers)
    return (f"What is {expression}?", expression)


def key(expression: str) -> tuple:
    """What makes two problems the same: the multiset of terms added and of terms taken away, each term
    a sorted tuple of its factors (3 + 5 == 5 + 3, 2 * 4 + 1 == 1 + 4 * 2)."""
    added, taken = [], []
    for sign, term in _terms(expression):
        (added if sign > 0 else taken).append(tuple(sorted(int(f) for f in term.split("*"))))
    return (tuple(sorted(added)), tuple(sorted(taken)))


def level1(rng: random.Random) -> Problem:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return _arith("+", a, b)
    a, b = max(a, b), min(a, b)
    return _arith("-", a, b)


def level2(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return _arith("+", a, b)
    a, b = max(a, b), min(a, b)
    return _arith("-", a, b)


def level3(rng: random.Random) -> Problem:
    if rng.random() < 0.5:
        return _arith("*", rng.randint(2, 9), rng.randint(2, 9))
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    c = min(c, a + b)  # the answer stays >= 0
    expression = f"{a} + {b} - {c}"
    return (f"What is {expression}?", expression)


def level4(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        text = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        expression = f"{a} + {b}"
    elif kind == 1:
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        expression = f"{a} - {b}"
    else:
        box = rng.choice(BOXES)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text = f"There are {a} {box} with {b} {thing} in each. How many {thing} are there in all?"
        expression = f"{a} * {b}"
    return (text, expression)


def level5(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(5, 30), rng.randint(2, 15)
        c = rng.randint(1, a + b - 1)
        text = (f"{name} has {a} {thing}, buys {b} more, then gives {c} to a friend. "
                f"How many {thing} does {name} have now?")
        expression = f"{a} + {b} - {c}"
    elif kind == 1:
        box = rng.choice(BOXES)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        text = (f"{name} fills {a} {box} with {b} {thing} each and has {c} {thing} left over. "
                f"How many {thing} did {name} start with?")
        expression = f"{a} * {b} + {c}"
    else:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        c = rng.randint(1, a * b - 1)
        text = (f"{name} buys {a} packs of {b} {thing} and uses {c} of them. "
                f"How many {thing} are left?")
        expression = f"{a} * {b} - {c}"
    return (text, expression)


LEVELS: dict[int, Callable[[random.Random], Problem]] = {1: level1, 2: level2, 3: level3, 4: level4, 5: level5}


def evaluate(expression: str) -> int:
    """The exact integer value of an expression of non-negative integers joined by +, - and *
    (multiplication first), without eval()."""
    total = 0
    for sign, term in _terms(expression):
        product = 1
        for factor in term.split("*"):
            product *= int(factor)
        total += sign * product
    return total


def _terms(expression: str) -> list[tuple[int, str]]:
    tokens = expression.replace("+", " + ").replace("-", " - ").split()
    terms, sign, current = [], 1, ""
    for token in tokens:
        if token in "+-":
            terms.append((sign, current))
            sign, current = (1 if token == "+" else -1), ""
        else:
            current += token
    terms.append((sign, current))
    return terms


def draw(level: int, count: int, rng: random.Random, taken: set[tuple]) -> list[Problem]:
    """`count` problems of `level` whose keys are not in `taken` (which gains them). Stops with a message
    if the level has too few distinct problems left."""
    problems: list[Problem] = []
    misses = 0
    while len(problems) < count:
        problem = LEVELS[level](rng)
        if key(problem[1]) in taken:
            misses += 1
            if misses > 100_000:
                raise SystemExit(f"level {level}: only {len(problems)} new problems found, {count} asked for -- "
                                 "ask for fewer")
            continue
        taken.add(key(problem[1]))
        problems.append(problem)
    return problems


def record(split: str, index: int, level: int, problem: Problem) -> dict:
    text, expression = problem
    return {"id": f"maths-{split}-{index:04d}", "prompt": f"{text} {INSTRUCTION}", "answer": str(evaluate(expression)),
            "category": f"maths-level{level}", "level": level, "expression": expression,
            "key": json.dumps(key(expression), separators=(",", ":"))}


def make(per_level: int, heldout_per_level: int, seed: int) -> dict[str, list[dict]]:
    """{"train": records, "heldout": records}: the held-out problems of every level first, then the train
    ones, no key drawn twice; each split shuffled with the same seeded generator."""
    rng = random.Random(seed)
    taken: set[tuple] = set()
    splits: dict[str, list[tuple[int, Problem]]] = {"heldout": [], "train": []}
    for split, count in (("heldout", heldout_per_level), ("train", per_level)):
        for level in LEVELS:
            splits[split] += [(level, p) for p in draw(level, count, rng, taken)]
    out = {}
    for split, items in splits.items():
        rng.shuffle(items)
        out[split] = [record(split, i, level, problem) for i, (level, problem) in enumerate(items, 1)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-level", type=int, default=40, help="train problems per level")
    parser.add_argument("--heldout-per-level", type=int, default=20, help="held-out problems per level")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in make(args.per_level, args.heldout_per_level, args.seed).items():
        path = args.out_dir / f"maths_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    main()
