"""Reward names and specs, trl's inputs, and the weighted sum of reward parts (`CombinedReward`).

Every reward is a callable with trl's reward-function signature,

    reward(prompts, completions, **columns) -> list[float | None]    # one value per completion

where `prompts` are conversations (lists of messages), `completions` are `[{"role": "assistant",
"content": ...}]` lists (or plain strings), and `columns` holds the dataset's other columns, one value
per completion (`answer`, `tests`), plus what trl adds (`completion_ids`, `trainer_state`, `log_metric`).
None means "does not apply to this item" (a maths reward on a prompt without an `answer`).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cai.errors import ConfigError
from cai.records import Message, as_messages

RewardFn = Callable[..., list[float | None]]

REWARD_NAMES = ("pm", "math", "code", "format", "length")

# ----------------------------------------------------------------------------- inputs as trl passes them


def completion_text(completion: str | list[Message]) -> str:
    """The assistant's text from a trl completion: a string, or a list of messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def prompt_messages(prompt: str | list[Message]) -> list[Message]:
    return as_messages(prompt)


# ----------------------------------------------------------------------------- reward specs and mixing


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """`"pm:1"` -> `("pm", 1.0)`; a bare name means weight 1. Unknown names and bad weights raise ConfigError."""
    name, _, weight_text = spec.partition(":")
    name = name.strip().lower()
    if name not in REWARD_NAMES:
        raise ConfigError(f"--reward {spec!r}: unknown reward {name!r} -- use one of {', '.join(REWARD_NAMES)} "
                          "as NAME:WEIGHT, e.g. --reward pm:1 --reward format:0.2")
    try:
        weight = float(weight_text) if weight_text.strip() else 1.0
    except ValueError:
        raise ConfigError(f"--reward {spec!r}: weight {weight_text!r} is not a number -- write NAME:WEIGHT, "
                          "e.g. math:0.5") from None
    if not math.isfinite(weight) or weight == 0:
        raise ConfigError(f"--reward {spec!r}: weight must be a finite non-zero number -- drop the reward instead "
                          "of giving it weight 0")
    return name, weight


def weighted_sum(values: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float]:
    """Combine per-part rewards: `values[k][i]` is part k's reward for completion i (None = not applicable).

    Result i is sum_k weights[k] * values[k][i] over the parts that apply to i; 0.0 if none applies
    (an item no reward speaks about carries no signal, and GRPO/RLOO give a flat group zero advantage).
    Shapes: values (K parts, N completions), weights (K,) -> (N,).
    """
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} reward parts but {len(weights)} weights")
    if not values:
        return []
    count = len(values[0])
    if any(len(v) != count for v in values):
        raise ValueError("every reward part must return one value per completion")
    totals = []
    for i in range(count):
        total = 0.0
        for part, weight in zip(values, weights, strict=True):
            value = part[i]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                total += weight * float(value)
        totals.append(total)
    return totals


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(present) / len(present) if present else None


@dataclass
class RewardBatch:
    """What one reward call saw and returned: handed to observers (monitors)."""

    prompts: list[list[Message]]
    completions: list[str]
    parts: dict[str, list[float | None]]  # reward name -> one value per completion (unweighted)
    totals: list[float]  # weighted sum
    step: int | None  # trainer global step when trl passed its state


class CombinedReward:
    """A weighted sum of named reward parts, as one trl reward function.

        reward = CombinedReward([("pm", pm_reward, 1.0), ("format", FormatReward(), 0.2)])
        reward(prompts, completions, **columns) -> [float, ...]

    Each part's unweighted mean reaches trl's metrics (`log_metric`, as `reward_<name>`), and every batch
    is passed to `observers` (callables taking a `RewardBatch`), which is how the monitors see the
    completions without a second pass.
    """

    __name__ = "cai"  # the name trl logs this function under (rewards/cai/mean)

    def __init__(self, parts: Sequence[tuple[str, RewardFn, float]],
                 observers: Sequence[Callable[[RewardBatch], None]] = ()):
        if not parts:
            raise ConfigError("no reward given -- pass at least one --reward NAME:WEIGHT")
        names = [name for name, _, _ in parts]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards {names} name one reward twice -- give each reward once")
        self.parts = list(parts)
        self.observers = list(observers)

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, _, weight in self.parts}

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        values = {name: list(fn(prompts, completions, **kwargs)) for name, fn, _ in self.parts}
        totals = weighted_sum(list(values.values()), [w for _, _, w in self.parts])
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for name, part in values.items():
                mean = _mean(part)
                if mean is not None:
                    log_metric(f"reward_{name}", mean)
        state = kwargs.get("trainer_state")
        batch = RewardBatch(prompts=[prompt_messages(p) for p in prompts],
                            completions=[completion_text(c) for c in completions], parts=values, totals=totals,
                            step=getattr(state, "global_step", None))
        for observer in self.observers:
            observer(batch)
        return totals
