"""Monitors that watch an RL run for reward hacking; never rewards themselves.

`boilerplate_share` and `slope` are pure functions; `ContrastJudgeScore` is a held-back judge that is
never optimised; `hacking_warnings` reads the per-step metrics and says what looks wrong.
"""

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cai.records import Message
from cai.rewards.combined import RewardBatch, _mean

MIN_BOILERPLATE_WORDS = 3  # shorter "sentences" ("Sure!", "Yes.") are too common to mean anything
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _sentences(text: str) -> set[str]:
    out = set()
    for raw in _SENTENCE_SPLIT.split(text):
        sentence = re.sub(r"\s+", " ", raw).strip(" \t*-#>`\"'").lower().rstrip(".!?")
        if len(sentence.split()) >= MIN_BOILERPLATE_WORDS:
            out.add(sentence)
    return out


def boilerplate_share(completions: Sequence[str],
                      prompts: Sequence[Any] | None = None) -> tuple[float, str | None]:
    """The share of completions containing the most common sentence, and that sentence.

    A policy hacking its reward often converges on one stock sentence ("I'm sorry, but I can't help with
    that.") whatever it is asked. Sentences are compared lower-cased with collapsed whitespace; each
    completion counts a sentence once. (0.0, None) when no sentence has MIN_BOILERPLATE_WORDS words or
    none is repeated: a sentence in one completion only is not boilerplate (else every step would read
    at least 1/N). Given `prompts` (one per completion), a sentence counts only when answers to at least
    two different prompts share it: GRPO's answers to one prompt agree with each other by design.
    """
    if not completions:
        return 0.0, None
    counts: Counter[str] = Counter()
    asked: dict[str, set[str]] = {}
    for i, text in enumerate(completions):
        sentences = _sentences(text)
        counts.update(sentences)
        prompt = repr(prompts[i]) if prompts is not None else str(i)  # once: a chat prompt's repr is long
        for sentence in sentences:
            asked.setdefault(sentence, set()).add(prompt)
    repeated = [(count, sentence) for sentence, count in counts.most_common() if len(asked[sentence]) >= 2]
    if not repeated:
        return 0.0, None
    count, sentence = repeated[0]
    return count / len(completions), sentence


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against their index (units of the values per step); 0 for < 2 points."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    var_x = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / var_x


HeldBackScorer = Callable[[Sequence[list[Message]], Sequence[str]], list[float | None]]


class ContrastJudgeScore:
    """A held-back judge (never used as a reward): how much more likely an answer is under a system
    prompt that follows a constitution principle than under one that ignores it, in mean log-probability
    per token (`judge.contrast_scores`, the contrast judge).

    `scorer(prompts, completions) -> [float | None]`, one per completion; higher = the judge prefers it.
    The principle for each prompt is drawn from the constitution, seeded by the prompt's text, so the
    same prompt is judged under the same principle at every step.
    """

    def __init__(self, engine, constitution, *, seed: int = 0):
        self.engine, self.constitution, self.seed = engine, constitution, seed

    def __call__(self, prompts: Sequence[list[Message]], completions: Sequence[str]) -> list[float | None]:
        from cai.judge import contrast_scores

        items, rows = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if not completion.strip():
                continue
            key = hashlib.sha1(repr(prompt).encode()).hexdigest()[:12]
            principle = self.constitution.sample_judge_principles(key, 1, self.seed)[0]
            items.append((principle, prompt, completion))
            rows.append(i)
        scores: list[float | None] = [None] * len(completions)
        for i, score in zip(rows, contrast_scores(self.engine, items), strict=True):
            scores[i] = score
        return scores


@dataclass
class Thresholds:
    """When the monitors warn (see `hacking_warnings`)."""

    length_growth: float = 0.5  # mean response length grew by more than this share of its start
    kl: float = 0.5  # KL to the start policy above this (nats per token, as trl reports it)
    boilerplate: float = 0.5  # over this share of a step's responses repeat one sentence
    truncated: float = 0.5  # over this share of recent answers stopped at the token limit
    min_steps: int = 4  # fewer steps than this: too short for trends


def _thirds(values: list[float]) -> tuple[float, float]:
    third = max(1, len(values) // 3)
    return sum(values[:third]) / third, sum(values[-third:]) / third


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def hacking_warnings(history: Sequence[dict[str, Any]], thresholds: Thresholds = Thresholds()) -> list[str]:
    """Read per-step metrics (`metrics.jsonl` records) and say what looks like reward hacking.

    - response length trending up (its last third's mean against its first third's);
    - most recent answers cut off at the token limit (the rewards then judge unfinished text);
    - KL to the start policy above the threshold;
    - one sentence repeated across a large share of the responses (mean over the last third of steps);
    - the PM reward rising (last third above first third by more than half its step-to-step spread) while
      the held-back judge's score does not rise.
    """
    warnings: list[str] = []
    if len(history) < 1:
        return warnings

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in history if r.get(key) is not None]

    lengths = series("mean_length")
    if len(lengths) >= thresholds.min_steps:
        first, last = _thirds(lengths)
        if first > 0 and (last - first) / first > thresholds.length_growth:
            warnings.append(f"response length rising: {first:.0f} -> {last:.0f} tokens (slope {slope(lengths):+.1f}/step)"
                            " -- the reward may favour length; try --reward length:W or a larger --beta")
    clipped = series("clipped_ratio")
    if clipped:
        third = max(1, len(clipped) // 3)
        recent = sum(clipped[-third:]) / third
        if recent > thresholds.truncated:
            warnings.append(f"{recent:.0%} of recent answers hit the token limit -- rewards are judging cut-off "
                            "answers; raise --max-new-tokens or add --reward format:W")
    kls = series("kl")
    if kls and kls[-1] > thresholds.kl:
        warnings.append(f"KL to the start policy is {kls[-1]:.2f} (> {thresholds.kl}) -- the policy is drifting "
                        "far; raise --beta or lower --lr")
    shares = series("boilerplate_share")
    if len(shares) >= 2:
        third = max(1, len(shares) // 3)
        recent = sum(shares[-third:]) / third
        if recent > thresholds.boilerplate:
            sentence = next((r.get("boilerplate_sentence") for r in reversed(history) if r.get("boilerplate_sentence")),
                            "")
            warnings.append(f"{recent:.0%} of recent responses repeat one sentence ({sentence!r:.80}) -- "
                            "a stock answer may be gaming the PM")
    pm = series("reward_pm")
    judge = series("judge_score")
    if len(pm) >= thresholds.min_steps and len(judge) >= 2:
        pm_first, pm_last = _thirds(pm)
        judge_first, judge_last = _thirds(judge)
        if pm_last - pm_first > 0.5 * _std(pm) and judge_last <= judge_first:
            warnings.append(f"PM reward rose ({pm_first:+.2f} -> {pm_last:+.2f}) while the held-back judge's score "
                            f"did not ({judge_first:+.3f} -> {judge_last:+.3f}) -- the policy may be exploiting the PM")
    return warnings


@dataclass
class StepSignals:
    """Monitor values computed from one step's reward batch (see `step_signals`)."""

    boilerplate_share: float
    boilerplate_sentence: str | None
    part_means: dict[str, float | None] = field(default_factory=dict)
    judge_score: float | None = None


def step_signals(batch: RewardBatch, judge: HeldBackScorer | None = None) -> StepSignals:
    """The hacking signals of one reward batch: boilerplate share, each reward part's mean, and the
    held-back judge's mean score when a judge is given."""
    share, sentence = boilerplate_share(batch.completions, batch.prompts)
    judge_mean = None
    if judge is not None:
        judge_mean = _mean(judge(batch.prompts, batch.completions))
    return StepSignals(boilerplate_share=share, boilerplate_sentence=sentence,
                       part_means={name: _mean(values) for name, values in batch.parts.items()},
                       judge_score=judge_mean)
