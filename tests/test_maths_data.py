"""The maths problem generator (scripts/make_maths.py) and the files it bundles in data/."""

import ast
import importlib.util
import json
import operator
import random
from pathlib import Path

import pytest

from cai.records import read_prompts
from cai.rewards import math_score

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("make_maths", ROOT / "scripts" / "make_maths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_maths = load_generator()

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def python_value(expression: str) -> int:
    """The expression's value as Python's own parser and integer arithmetic give it (an independent check
    of the generator's evaluator)."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int), ast.dump(node)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


def bundled(split: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / f"maths_{split}.jsonl").read_text().splitlines()]


def test_the_bundled_files_are_what_the_generator_writes(tmp_path):
    made = make_maths.make(per_level=40, heldout_per_level=20, seed=23)
    for split in ("train", "heldout"):
        expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in made[split])
        assert (ROOT / "data" / f"maths_{split}.jsonl").read_text(encoding="utf-8") == expected, \
            f"data/maths_{split}.jsonl differs from `python scripts/make_maths.py`: regenerate it"


def test_train_and_heldout_share_no_problem():
    train, heldout = bundled("train"), bundled("heldout")
    assert len(train) == 200 and len(heldout) == 100
    assert not {r["key"] for r in train} & {r["key"] for r in heldout}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert not {r["expression"] for r in train} & {r["expression"] for r in heldout}
    for records in (train, heldout):
        assert len({r["key"] for r in records}) == len(records)  # no problem twice within a split either
        assert {r["level"] for r in records} == {1, 2, 3, 4, 5}


def test_the_same_arithmetic_is_one_problem():
    assert make_maths.key("3 + 5") == make_maths.key("5 + 3")
    assert make_maths.key("2 * 4 + 1") == make_maths.key("1 + 4 * 2")
    assert make_maths.key("8 - 3") != make_maths.key("3 - 8")
    assert make_maths.key("4 + 9 - 3") != make_maths.key("4 + 3 - 9")


def test_answers_are_exact():
    records = bundled("train") + bundled("heldout")
    for record in random.Random(0).sample(records, 60):
        value = python_value(record["expression"])
        assert record["answer"] == str(value) and value >= 0
        assert make_maths.evaluate(record["expression"]) == value
        # The numbers of a word problem are the ones in its text.
        numbers = [int(n) for n in record["expression"].replace("*", " ").replace("+", " ").replace("-", " ").split()]
        assert all(str(n) in record["prompt"] for n in numbers)
        # The RL reward reads the answer as the generator wrote it.
        assert math_score(f"So the answer is {record['answer']}.", record["answer"]) == 1.0
        assert math_score(f"So the answer is {value + 1}.", record["answer"]) == 0.0


@pytest.mark.parametrize("expression", ["2 + 3 * 4", "9 * 10 - 66", "4 + 9 - 3", "7 - 7", "12"])
def test_the_evaluator_agrees_with_python(expression):
    assert make_maths.evaluate(expression) == python_value(expression)


def test_the_files_read_as_prompts_with_answers():
    records = read_prompts(ROOT / "data" / "maths_heldout.jsonl")
    assert all(r["answer"] and r["prompt"].endswith(make_maths.INSTRUCTION) for r in records)


def test_levels_grow_harder_in_the_numbers_they_use():
    made = make_maths.make(per_level=10, heldout_per_level=5, seed=1)
    by_level = {}
    for record in made["train"]:
        by_level.setdefault(record["level"], []).append(record)
    assert max(int(r["answer"]) for r in by_level[1]) <= 18
    assert all(len(r["expression"].split()) == 5 for r in by_level[5])  # two operations
