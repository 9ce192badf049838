"""Rewards for RL (stage 4), and the monitors that watch for reward hacking.

- `combined`: reward names and `--reward NAME:WEIGHT` specs, trl's inputs, `CombinedReward` (a weighted
  sum of named parts that reports each part's mean and hands each batch to the monitors).
- `pm`: `PreferenceModelReward`, the PM's score, rendered with the PM's own chat template.
- `verifiable`: `math_reward` (the final number equals the record's `answer`), `FormatReward`
  (well-formed, not truncated), `LengthPenalty` (beyond a target length).
- `sandbox`: `CodeReward` (the answer's code block passes the record's `tests` in a bubblewrap sandbox).
- `monitors`: `boilerplate_share`, `slope`, `ContrastJudgeScore` (a held-back judge that is never
  optimised), and `hacking_warnings`, which reads the per-step metrics and says what looks wrong.
"""

from cai.rewards.combined import (
    REWARD_NAMES,
    CombinedReward,
    RewardBatch,
    RewardFn,
    completion_text,
    parse_reward_spec,
    prompt_messages,
    weighted_sum,
)
from cai.rewards.monitors import (
    ContrastJudgeScore,
    StepSignals,
    Thresholds,
    boilerplate_share,
    hacking_warnings,
    slope,
    step_signals,
)
from cai.rewards.pm import PM_INFO, PM_MAX_LENGTH, PreferenceModelReward, pm_directory
from cai.rewards.sandbox import (
    SANDBOX_OUTCOMES,
    CodeReward,
    SandboxResult,
    extract_code,
    require_sandbox,
    run_tests,
    sandbox_problem,
)
from cai.rewards.verifiable import (
    FormatReward,
    LengthPenalty,
    final_number,
    format_score,
    length_penalty,
    math_reward,
    math_score,
    numbers_equal,
    parse_number,
)

__all__ = [
    "PM_INFO", "PM_MAX_LENGTH", "REWARD_NAMES", "SANDBOX_OUTCOMES", "CodeReward", "CombinedReward",
    "ContrastJudgeScore", "FormatReward", "LengthPenalty", "PreferenceModelReward", "RewardBatch", "RewardFn",
    "SandboxResult", "StepSignals", "Thresholds", "boilerplate_share", "completion_text", "extract_code",
    "final_number", "format_score", "hacking_warnings", "length_penalty", "math_reward", "math_score",
    "numbers_equal", "parse_number", "parse_reward_spec", "pm_directory", "prompt_messages", "require_sandbox",
    "run_tests", "sandbox_problem", "slope", "step_signals", "weighted_sum",
]
