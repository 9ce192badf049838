"""Verifiable rewards on text: the final number of a maths answer (`math_reward`), a well-formed answer
(`FormatReward`) and a length penalty (`LengthPenalty`). Pure functions of their inputs."""

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from cai.rewards.combined import completion_text

# A number as people write it: -12, 1,234.5, $3, 0.75, 3/4, 25%. Thousands need groups of exactly 3 digits,
# so "3, 4" is two numbers; a full stop ending a sentence is not a decimal point ("is 42.").
_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)?%?"
# Not after "^": the 2 of "m^2" is an exponent, not an answer.
_NUMBER_RE = re.compile(rf"(?<![\w.^])({_NUMBER})")
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# A sign may stand before the fraction (-\frac{1}{2}) as well as inside it.
_FRAC_RE = re.compile(r"([-−]\s*)?\\d?frac\s*\{\s*([-−]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_ANSWER_RE = re.compile(rf"answer(?:\s+is)?[\s:=*]*({_NUMBER})", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """`"$1,234.5"` -> 1234.5, `"-3/4"` -> -0.75, `"25%"` -> 25 (the percent sign is dropped). None if not
    one number (`"1, 2"` is two: commas count only between groups of three digits)."""
    text = text.strip().replace("{,}", ",")
    # Two numbers are not one: "1, 2" (a comma outside groups of three digits), "1 2".
    if re.search(r"\d\s+\d", text) or (re.search(r"\d\s*,\s*\d", text)
                                       and not re.search(r"\d{1,3}(?:,\d{3})+(?!\d)", text)):
        return None
    text = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    if not text:
        return None
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("-+")
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            if Fraction(denominator) == 0:
                return None
            return sign * Fraction(numerator) / Fraction(denominator)
        return sign * Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Fraction | None:
    """The answer a maths response commits to: the last `\\boxed{}`, else the last "the answer is N", else
    the last number in the text. None if there is no number."""
    text = text.replace("{,}", ",")  # LaTeX's thousands separator: 1{,}234
    boxed = _BOXED_RE.findall(text)
    if boxed:
        inner = boxed[-1]
        frac = _FRAC_RE.search(inner)
        if frac:
            return _fraction(frac)
        numbers = _NUMBER_RE.findall(inner)
        if numbers:
            return parse_number(numbers[-1])
    stated = _ANSWER_RE.findall(text)
    if stated:
        return parse_number(stated[-1])
    frac = list(_FRAC_RE.finditer(text))
    numbers = list(_NUMBER_RE.finditer(text))
    if frac and (not numbers or frac[-1].end() >= numbers[-1].end()):
        return _fraction(frac[-1])
    return parse_number(numbers[-1].group(1)) if numbers else None


def _fraction(match: re.Match) -> Fraction | None:
    """The value of a `_FRAC_RE` match, its leading sign included: a minus with nothing before it that it
    could subtract from (`= -\\frac{1}{2}`, not `3 - \\frac{1}{2}`)."""
    value = parse_number(f"{match.group(2)}/{match.group(3)}")
    before = match.string[:match.start()].rstrip()[-1:]
    negative = bool(match.group(1)) and not (before and (before.isalnum() or before in ")]}"))
    return -value if value is not None and negative else value


def numbers_equal(got: Fraction, expected: Fraction, relative: float = 1e-6) -> bool:
    """Exactly, for a whole-number answer (a tolerance would pass 1000001 for 1000000); else within
    `relative`, for a fraction the response wrote as a rounded decimal (0.333333 for 1/3)."""
    if expected.denominator == 1:
        return got == expected
    return abs(got - expected) <= relative * max(1, abs(expected))


def math_score(response: str, answer: Any) -> float:
    """1.0 if the response's final number equals `answer` (a number or a string such as "3/4"), else 0.0."""
    expected = parse_number(str(answer))
    if expected is None:
        raise ValueError(f"answer {answer!r} is not a number")
    got = final_number(response)
    return 1.0 if got is not None and numbers_equal(got, expected) else 0.0


def math_reward(prompts, completions, answer: Sequence[Any] | None = None, **kwargs) -> list[float | None]:
    """trl reward: `math_score` for records with an `answer`, None (not applicable) for the others."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None or str(a).strip() == "" else math_score(completion_text(c), a)
            for c, a in zip(completions, answers, strict=True)]


math_reward.__name__ = "math"


# ----------------------------------------------------------------------------- format and length

_CLEAN_END = tuple('.!?…"\')]}*`>') + ("```",)


def format_score(text: str, truncated: bool | None = None) -> float:
    """1.0 for a well-formed answer: non-empty, not cut off at the token limit (`truncated`, when known),
    every code fence closed, and ending where a sentence or a block ends (punctuation, a closing quote,
    bracket or fence). 0.0 otherwise."""
    stripped = text.strip()
    if not stripped or truncated:
        return 0.0
    if stripped.count("```") % 2:
        return 0.0
    return 1.0 if stripped.endswith(_CLEAN_END) else 0.0


class FormatReward:
    """trl reward: `format_score`, told about truncation by the completion's token ids: a completion whose
    last id is not one of `stop_ids` (end of turn / eos) ran into the token limit."""

    __name__ = "format"

    def __init__(self, stop_ids: Sequence[int] = ()):
        self.stop_ids = set(stop_ids)

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[float]:
        scores = []
        for i, completion in enumerate(completions):
            truncated = None
            if completion_ids is not None and self.stop_ids:
                ids = completion_ids[i]
                truncated = not ids or ids[-1] not in self.stop_ids
            scores.append(format_score(completion_text(completion), truncated))
        return scores


def length_penalty(num_tokens: int, target: int) -> float:
    """0 up to `target` tokens, then falls linearly to -1 at twice the target (and stays there)."""
    if target <= 0:
        raise ValueError(f"length target {target} must be positive")
    return -min(1.0, max(0, num_tokens - target) / target)


class LengthPenalty:
    """trl reward: `length_penalty` of each completion's token count (its ids, or about 4 characters a
    token when trl passes none)."""

    __name__ = "length"

    def __init__(self, target_tokens: int):
        self.target = target_tokens

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[float]:
        counts = ([len(ids) for ids in completion_ids] if completion_ids is not None
                  else [math.ceil(len(completion_text(c)) / 4) for c in completions])
        return [length_penalty(n, self.target) for n in counts]
