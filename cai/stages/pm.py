"""Stage 3: the hybrid preference model (PM).

A reward model is trained on AI harmlessness comparisons (`cai feedback` output, soft labels) mixed
with human helpfulness comparisons (hh-rlhf style, hard labels) at a chosen ratio, then scored and
checked for accuracy, calibration and length bias.

    cai pm train --ai runs/x/3-feedback/prefs.jsonl --human data/helpful_prefs_example.jsonl --out runs/x/4-pm
    cai pm score --model runs/x/4-pm --prompt "How do I pick a lock?" --response "I can't help with that."
    cai pm eval  --model runs/x/4-pm --pairs heldout.jsonl --out runs/x/4-pm/eval

How a pair becomes model input: the chat template is applied to the conversation with the response
as the assistant's last turn, and the reward is the score head's output at the last token. A text
longer than `max_length` tokens loses its FIRST tokens (left truncation): the response and the latest
turns stay, and the reward is still read where the response ends.

Loss: soft-label Bradley-Terry (`soft_bt_loss`), the cross-entropy between the label p_chosen and
sigmoid(r_chosen - r_rejected). At p = 1 it is trl's pairwise loss -log sigmoid(r_c - r_r); with a
soft label it is minimised at r_c - r_r = logit(p), so the PM learns how sure the judge was, not just
which side it took. `SoftRewardTrainer` is trl's RewardTrainer with that loss and a collator that
carries p_chosen; everything else (LoRA/QLoRA wrapping, padding, checkpoints) is trl's.

Layout of OUT: `model/` (standalone merged AutoModelForSequenceClassification; LoRA adapter in
`model/adapter/`), `heldout.jsonl` (the held-out pairs), `calibration.png` and `length_bias.png` (on
the held-out pairs), `dropped.jsonl` (pairs that cannot teach anything, with a reason),
`checkpoints/` (only while training; removed after the final save), `manifest.json`.
"""

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cai.errors import ConfigError, ModelError, RecordsError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, QUANTIZE_CHOICES
from cai.records import (
    as_messages,
    check_prompt,
    mix_preferences,
    read_jsonl,
    read_preferences,
    write_jsonl,
)
from cai.rewards import PM_INFO, pm_directory
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_directory_out,
    check_jsonl_out,
    check_limit,
    item_seed,
    last_checkpoint,
    train_or_resume,
)

# The CAI paper's PM mix: 135,296 human helpfulness comparisons + 182,831 AI harmlessness comparisons.
PAPER_HUMAN_COMPARISONS = 135_296
PAPER_AI_COMPARISONS = 182_831
PAPER_HUMAN_FRACTION = round(PAPER_HUMAN_COMPARISONS / (PAPER_HUMAN_COMPARISONS + PAPER_AI_COMPARISONS), 3)  # 0.425
DEFAULT_MAX_LENGTH = 512  # tokens of conversation + response given to the PM
AI_SOURCE, HUMAN_SOURCE = "ai-harmless", "human-helpful"


# ----------------------------------------------------------------------------- configs


@dataclass
class PMTrainConfig:
    """`cai pm train`: a preference model on AI harmlessness + human helpfulness comparisons."""

    ai: str | None = field(default=None, metadata={
        "help": "AI harmlessness preferences: `cai feedback` output (soft labels p_chosen), or any preference file."})
    out: str | None = field(default=None, metadata={
        "help": "Output directory: model/, manifest.json, heldout.jsonl, calibration.png.", "hash": False})
    human: str | None = field(default=None, metadata={
        "help": "Human helpfulness comparisons (hard labels): hh-rlhf transcripts, trl's conversational "
                "format or cai preference records; .jsonl or .jsonl.gz. Left out: train on AI labels alone."})
    human_fraction: float = field(default=PAPER_HUMAN_FRACTION, metadata={
        "help": "Share of human comparisons in the training mix, 0-1 (default: the CAI paper's 135,296 human "
                "to 182,831 AI). The smaller side is repeated if too few; the summary gives exact counts."})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Base model: embedded:NAME, a hub id or a local directory; a one-output score head is added."})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "4bit: load the base in NF4 and train LoRA adapters (QLoRA). Left out (or none): full precision."})
    lora_r: int = field(default=16, metadata={
        "help": "LoRA rank (alpha = 2r) on every linear layer; the score head is trained whole. 0: full fine-tuning."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training mix (ignored if max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps to train. Left out: as many as --epochs needs."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate (AdamW, linear decay). Left out: 1e-4 with LoRA, 1e-5 for full fine-tuning."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Comparisons per optimizer step on each device (each is two sequences)."})
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={
        "help": "Tokens per conversation + response; longer texts lose their first tokens (the response stays)."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of each side (AI, human) held out to measure accuracy, 0-0.5; 0: no held-out check."})
    seed: int = field(default=0, metadata={"help": "Seed for the held-out split, the mix, the head's init and shuffling."})
    save_steps: int = field(default=50, metadata={
        "help": "Optimizer steps between checkpoints (OUT/checkpoints), from which a re-run resumes.", "hash": False})
    eval_batch_size: int = field(default=16, metadata={
        "help": "Sequences per forward pass when scoring the held-out pairs.", "hash": False})
    force: bool = field(default=False, metadata={
        "help": "Discard earlier output in OUT (even a finished or differently configured run) and start over.",
        "hash": False})

    def __post_init__(self):
        check_directory_out(self.out, "pm train", "pm")
        if not self.ai:
            raise ConfigError("pm train needs --ai: the AI preference file (`cai feedback` output)")
        if not self.out:
            raise ConfigError("pm train needs --out: the directory to write the preference model to")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ConfigError(f"--quantize {self.quantize!r} is not supported -- use 4bit, or leave it out")
        if self.quantize == "none":
            self.quantize = None
        if not 0.0 <= self.human_fraction <= 1.0:
            raise ConfigError(f"--human-fraction {self.human_fraction} must be between 0 and 1")
        if self.human_fraction == 1.0 and not self.human:
            raise ConfigError("--human-fraction 1.0 asks for human comparisons only, but no --human file was given "
                              "-- pass --human F or lower --human-fraction")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"--eval-fraction {self.eval_fraction} must be between 0 and 0.5")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r {self.lora_r} must be >= 0 (0 means full fine-tuning)")
        if self.quantize and self.lora_r == 0:
            raise ConfigError("--quantize 4bit with --lora-r 0: 4-bit weights cannot be fine-tuned directly "
                              "-- use --lora-r 16 (QLoRA) or drop --quantize")
        if self.max_length < 16:
            raise ConfigError(f"--max-length {self.max_length} is too short for a conversation -- use 128 or more")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs} must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps} must be >= 1 -- or leave it out to run --epochs")
        # --save-steps 0: the trainer would never checkpoint, and a kill would lose all training.
        check_at_least_one(self, "per_device_train_batch_size", "save_steps", "eval_batch_size")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} must be positive")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora_r else 1e-5)


def _check_scoring(cfg: "PMScoreConfig | PMEvalConfig") -> None:
    """Options of a scoring pass: 0 or less would crash (batch size) or quietly score something else
    (max_length 0 fell back to the trained length, -5 cut the first 5 tokens of every text)."""
    check_at_least_one(cfg, "batch_size")
    if cfg.max_length is not None and cfg.max_length < 16:
        raise ConfigError(f"--max-length {cfg.max_length} is too short for a conversation -- use 128 or more, "
                          "or leave it out for what the PM was trained with")


@dataclass
class PMScoreConfig:
    """`cai pm score`: rewards for responses, one given on the command line or a JSONL of them."""

    model: str | None = field(default=None, metadata={
        "help": "A trained PM: the `cai pm train` output directory (or its model/ subdirectory)."})
    prompt: str | None = field(default=None, metadata={"help": "The user's request (with --response)."})
    response: str | None = field(default=None, metadata={"help": "The assistant's answer to score."})
    input: str | None = field(default=None, metadata={
        "help": "JSONL of records with `prompt` (text or chat messages) and `response`, instead of --prompt."})
    out: str | None = field(default=None, metadata={
        "help": "Write the records with `reward` added here. Left out: to stdout.", "hash": False})
    max_length: int | None = field(default=None, metadata={
        "help": "Tokens per conversation + response. Left out: what the PM was trained with."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass.", "hash": False})

    def __post_init__(self):
        if not self.model:
            raise ConfigError("pm score needs --model: a `cai pm train` output directory")
        if self.input is None and (self.prompt is None or self.response is None):
            raise ConfigError("pm score needs --prompt and --response, or --input F.jsonl")
        if self.input is not None and (self.prompt is not None or self.response is not None):
            raise ConfigError("pm score: give either --input or --prompt/--response, not both")
        if self.out:  # checked now: a directory here failed only after every record was scored
            check_jsonl_out(self.out, "pm score")
        _check_scoring(self)


@dataclass
class PMEvalConfig:
    """`cai pm eval`: accuracy, calibration and length bias of a PM on a preference file."""

    model: str | None = field(default=None, metadata={
        "help": "A trained PM: the `cai pm train` output directory (or its model/ subdirectory)."})
    pairs: str | None = field(default=None, metadata={
        "help": "Preference file: hh-rlhf transcripts, trl's format or cai records; .jsonl or .jsonl.gz."})
    out: str | None = field(default=None, metadata={
        "help": "Directory for metrics.json, scores.jsonl, calibration.png, length_bias.png. Left out: the table only.",
        "hash": False})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N pairs (left out: all)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Tokens per conversation + response. Left out: what the PM was trained with."})
    bins: int = field(default=10, metadata={"help": "Equal-width probability bins of the reliability diagram."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass.", "hash": False})
    force: bool = field(default=False, metadata={"help": "Recompute even if OUT holds this evaluation.",
                                                  "hash": False})

    def __post_init__(self):
        check_directory_out(self.out, "pm eval", "pm-eval")
        if not self.model or not self.pairs:
            raise ConfigError("pm eval needs --model (a `cai pm train` output) and --pairs (a preference file)")
        check_limit(self.limit)
        if self.bins < 2:
            raise ConfigError(f"--bins {self.bins} must be >= 2")
        _check_scoring(self)


# ----------------------------------------------------------------------------- losses and metrics (pure)


def soft_bt_loss(r_chosen, r_rejected, p_chosen):
    """Soft-label Bradley-Terry loss, averaged over the batch.

    r_chosen, r_rejected: (B,) rewards; p_chosen: (B,) probability that `chosen` is preferred.

        loss = -[p log sigmoid(r_c - r_r) + (1 - p) log sigmoid(r_r - r_c)]

    computed as binary cross-entropy with logits (numerically stable). At p = 1 it is the ordinary
    pairwise loss -log sigmoid(r_c - r_r); its minimum over the margin is at r_c - r_r = logit(p).
    """
    import torch.nn.functional as F

    margin = r_chosen - r_rejected  # (B,)
    return F.binary_cross_entropy_with_logits(margin, p_chosen.to(margin.dtype), reduction="mean")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def pairwise_accuracy(margins: Sequence[float], p_chosen: Sequence[float]) -> tuple[float | None, int]:
    """Share of pairs where the PM sides with the label: margin (r_c - r_r) > 0 when p_chosen > 0.5,
    < 0 when p_chosen < 0.5; a zero margin counts half. Pairs labelled exactly 0.5 have no side and are
    left out. Returns (accuracy or None when no pair counts, pairs counted)."""
    m, p = np.asarray(margins, dtype=np.float64), np.asarray(p_chosen, dtype=np.float64)
    sided = p != 0.5
    if not sided.any():
        return None, 0
    direction = np.where(p[sided] > 0.5, 1.0, -1.0)
    agreement = np.sign(m[sided] * direction)  # 1 agree, 0 tie, -1 disagree
    return float(np.mean((agreement + 1.0) / 2.0)), int(sided.sum())


def reliability_table(margins: Sequence[float], p_chosen: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Predicted P(first preferred) = sigmoid(margin) against the label, in equal-width bins.

    Each pair is counted in both orders, (sigmoid(m), p) and (sigmoid(-m), 1 - p): calibration asks
    "of the pairs where the PM says 70%, does the first side win 70% of the time?", and a file that
    always lists the chosen answer first would otherwise only ever show the first side winning. With
    hard labels the label is the outcome; with soft labels (AI feedback) it is the judge's probability.
    Returns one row per non-empty bin: lower, upper, count, mean predicted, mean label.
    """
    m, p = np.asarray(margins, dtype=np.float64), np.asarray(p_chosen, dtype=np.float64)
    predicted = np.concatenate([sigmoid(m), sigmoid(-m)])  # (2N,)
    label = np.concatenate([p, 1.0 - p])  # (2N,)
    index = np.minimum((predicted * bins).astype(int), bins - 1)  # (2N,) bin of each prediction
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"lower": b / bins, "upper": (b + 1) / bins, "count": int(members.sum()),
                         "predicted": float(predicted[members].mean()), "observed": float(label[members].mean())})
    return rows


def expected_calibration_error(margins: Sequence[float], p_chosen: Sequence[float], bins: int = 10) -> float | None:
    """ECE: the count-weighted mean gap |mean predicted - mean label| over the bins of
    `reliability_table` (0 is perfectly calibrated). None for no pairs."""
    rows = reliability_table(margins, p_chosen, bins)
    total = sum(r["count"] for r in rows)
    if not total:
        return None
    return float(sum(r["count"] * abs(r["predicted"] - r["observed"]) for r in rows) / total)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 2 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def length_bias(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], length_chosen: Sequence[int],
                length_rejected: Sequence[int], p_chosen: Sequence[float]) -> dict[str, Any]:
    """How much the PM's rewards follow response length.

    - `reward_length_correlation`: Pearson r between reward and length over every response (2N points);
    - `accuracy_chosen_shorter` / `accuracy_chosen_longer`: accuracy on the pairs where the preferred
      answer is the shorter / longer one (a PM that just likes long answers fails the first);
    - `prefer_longer_accuracy`: the accuracy of always picking the longer answer, the baseline to beat.
    """
    rc, rr = np.asarray(rewards_chosen, dtype=np.float64), np.asarray(rewards_rejected, dtype=np.float64)
    lc, lr = np.asarray(length_chosen, dtype=np.float64), np.asarray(length_rejected, dtype=np.float64)
    p = np.asarray(p_chosen, dtype=np.float64)
    # Orient every pair so "preferred" is the side the label favours; label-less (0.5) pairs drop out.
    sided = p != 0.5
    flip = p < 0.5
    preferred_len, other_len = np.where(flip, lr, lc), np.where(flip, lc, lr)
    margins = np.where(flip, rr - rc, rc - rr)
    shorter = sided & (preferred_len < other_len)
    longer = sided & (preferred_len > other_len)

    def accuracy(mask):
        return float(np.mean((np.sign(margins[mask]) + 1.0) / 2.0)) if mask.any() else None

    unequal = int(shorter.sum() + longer.sum())
    return {
        "reward_length_correlation": pearson(np.concatenate([rc, rr]), np.concatenate([lc, lr])),
        "accuracy_chosen_shorter": accuracy(shorter), "pairs_chosen_shorter": int(shorter.sum()),
        "accuracy_chosen_longer": accuracy(longer), "pairs_chosen_longer": int(longer.sum()),
        "prefer_longer_accuracy": float(longer.sum() / unequal) if unequal else None,
    }


def preference_metrics(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float],
                       p_chosen: Sequence[float], sources: Sequence[str], length_chosen: Sequence[int],
                       length_rejected: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Everything `cai pm eval` reports, from per-pair rewards, labels, sources and lengths."""
    rc, rr = np.asarray(rewards_chosen, dtype=np.float64), np.asarray(rewards_rejected, dtype=np.float64)
    p = np.asarray(p_chosen, dtype=np.float64)
    margins = rc - rr
    accuracy, counted = pairwise_accuracy(margins, p)
    soft = (p > 0.0) & (p < 1.0)
    metrics: dict[str, Any] = {
        "pairs": len(p), "pairs_counted_for_accuracy": counted, "accuracy": accuracy,
        "mean_margin": float(margins.mean()) if len(p) else None,
        "ece": expected_calibration_error(margins, p, bins),
        "soft_label_pairs": int(soft.sum()),
        "ece_soft_labels": expected_calibration_error(margins[soft], p[soft], bins) if soft.any() else None,
        "by_source": {},
    }
    for source in sorted(set(sources)):
        mask = np.asarray([s == source for s in sources])
        source_accuracy, source_counted = pairwise_accuracy(margins[mask], p[mask])
        metrics["by_source"][source] = {"pairs": int(mask.sum()), "accuracy": source_accuracy,
                                        "mean_margin": float(margins[mask].mean())}
    metrics["length"] = length_bias(rc, rr, length_chosen, length_rejected, p)
    return metrics


def scores_accuracy(scores: list[dict[str, Any]]) -> float | None:
    """Accuracy on these scored pairs (None when there are none)."""
    return pairwise_accuracy([s["margin"] for s in scores], [s["p_chosen"] for s in scores])[0] if scores else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as an aligned text table (what `cai pm eval` prints)."""

    def number(value, percent=False):
        if value is None:
            return "-"
        return f"{value:.1%}" if percent else f"{value:.3f}"

    length = metrics["length"]
    rows = [
        ("pairs", f"{metrics['pairs']} ({metrics['soft_label_pairs']} with soft labels)"),
        ("accuracy", number(metrics["accuracy"], True)),
    ]
    for source, values in metrics["by_source"].items():
        rows.append((f"  {source}", f"{number(values['accuracy'], True)} of {values['pairs']}"))
    rows += [
        ("mean margin (r_chosen - r_rejected)", number(metrics["mean_margin"])),
        ("ECE (all pairs, both orders)", number(metrics["ece"])),
        ("ECE (soft-labelled pairs)", number(metrics["ece_soft_labels"])),
        ("corr(reward, length in tokens)", number(length["reward_length_correlation"])),
        ("accuracy, chosen is shorter", f"{number(length['accuracy_chosen_shorter'], True)} "
                                        f"of {length['pairs_chosen_shorter']}"),
        ("accuracy, chosen is longer", f"{number(length['accuracy_chosen_longer'], True)} "
                                       f"of {length['pairs_chosen_longer']}"),
        ("baseline: always prefer longer", number(length["prefer_longer_accuracy"], True)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


# ----------------------------------------------------------------------------- data


def encode_responses(tokenizer, prompts: Sequence[Any], responses: Sequence[str],
                     max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each conversation with its response as the assistant's last turn (chat template
    applied), and how many were truncated. A text over `max_length` tokens keeps its LAST `max_length`
    tokens: the prompt loses its beginning, the response (where the reward is read) stays."""
    texts = [tokenizer.apply_chat_template(as_messages(prompt) + [{"role": "assistant", "content": response}],
                                           tokenize=False) for prompt, response in zip(prompts, responses, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [ids[-max_length:] for ids in encoded], truncated


def split_heldout(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): the held-out part is round(len * fraction) records chosen by a hash of each id,
    so the split is the same in every run and does not depend on file order."""
    count = round(len(records) * fraction)
    ranked = sorted(range(len(records)), key=lambda i: item_seed(seed, str(records[i]["id"]), "heldout"))
    held = set(ranked[:count])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def partition_trainable(records: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(usable, dropped with a `reason`): a pair whose two answers are the same text teaches nothing."""
    usable, dropped = [], []
    for record in records:
        if record["chosen"].strip() == record["rejected"].strip():
            dropped.append({**record, "reason": "identical-responses"})
        else:
            usable.append(record)
    return usable, dropped


def without_ties(pairs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(kept, dropped with the reason `no-preference`): a pair labelled p_chosen = 0.5 (a judge whose two
    orders cancelled out) has no winner, and a hard-label loss would train toward whichever answer the
    record happens to call `chosen`. Soft labels train on it toward no preference, so they keep it."""
    kept, dropped = [], []
    for record in pairs:
        if float(record["p_chosen"]) == 0.5:  # as pairwise_accuracy leaves them out
            dropped.append({**record, "reason": "no-preference"})
        else:
            kept.append(record)
    return kept, dropped


# ----------------------------------------------------------------------------- scoring


class RewardScorer:
    """Batched rewards from a sequence-classification PM: texts sorted by length (little padding),
    right-padded, no gradients; results in input order.

        scorer = RewardScorer.from_directory("runs/x/4-pm")
        scorer.rewards(["How do I pick a lock?"], ["I can't help with that."])
    """

    def __init__(self, model, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.model.eval()

    @classmethod
    def from_directory(cls, reference: str | Path, *, device: str | None = None, max_length: int | None = None,
                       batch_size: int = 16) -> "RewardScorer":
        from cai.models import load_sequence_classifier

        directory = pm_directory(reference)
        info_path = directory / PM_INFO
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        model, tokenizer = load_sequence_classifier(str(directory), device=device)
        return cls(model, tokenizer, max_length=max_length or info.get("max_length", DEFAULT_MAX_LENGTH),
                   batch_size=batch_size)

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], progress=None) -> list[float]:
        """One reward per (prompt, response). `progress(items, tokens)` is called after each batch."""
        import torch

        encoded, _ = encode_responses(self.tokenizer, prompts, responses, self.max_length)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        pad_id = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        rewards = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = len(encoded[batch[0]])
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                    attention_mask[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    use_cache=False).logits  # (b, 1)
                for row, i in enumerate(batch):
                    rewards[i] = float(logits[row, 0])
                if progress is not None:
                    progress(len(batch), int(attention_mask.sum()))
        return rewards

    def response_lengths(self, responses: Sequence[str]) -> list[int]:
        """Length of each response alone, in tokens of this PM's tokenizer."""
        if not responses:
            return []
        return [len(ids) for ids in self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]]

    def score_pairs(self, records: Sequence[dict[str, Any]], progress=None) -> tuple[list[float], list[float]]:
        """(rewards of the chosen answers, rewards of the rejected answers), one batched pass over both."""
        prompts = [r["prompt"] for r in records]
        rewards = self.rewards(prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records],
                               progress)
        return rewards[:len(records)], rewards[len(records):]


def evaluate_pairs(scorer: RewardScorer, records: list[dict[str, Any]], bins: int = 10,
                   progress=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-pair scores) of a PM on preference records."""
    chosen, rejected = scorer.score_pairs(records, progress)
    length_chosen = scorer.response_lengths([r["chosen"] for r in records])
    length_rejected = scorer.response_lengths([r["rejected"] for r in records])
    metrics = preference_metrics(chosen, rejected, [r["p_chosen"] for r in records],
                                 [str(r.get("source", "")) for r in records], length_chosen, length_rejected, bins)
    scores = [{"id": r["id"], "source": r.get("source"), "p_chosen": r["p_chosen"], "reward_chosen": c,
               "reward_rejected": j, "margin": c - j, "tokens_chosen": lc, "tokens_rejected": lj}
              for r, c, j, lc, lj in zip(records, chosen, rejected, length_chosen, length_rejected, strict=True)]
    return metrics, scores


# ----------------------------------------------------------------------------- plots


def plot_reliability(scores: list[dict[str, Any]], path: Path, bins: int = 10, title: str = "") -> Path:
    """Reliability diagram: mean label against mean predicted P(first preferred) per bin, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = [s["margin"] for s in scores]
    labels = [s["p_chosen"] for s in scores]
    rows = reliability_table(margins, labels, bins)
    ece = expected_calibration_error(margins, labels, bins)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], marker="o", label="PM")
    top.set_ylabel("label: share / probability the first side is preferred")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"{title}  ECE {ece:.3f}" if ece is not None else title)
    centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
    bottom.bar(centres, [r["count"] for r in rows], width=1 / bins * 0.9, color="tab:blue", alpha=0.6)
    bottom.set_xlabel("PM: sigmoid(r_first - r_second)  (each pair in both orders)")
    bottom.set_ylabel("count")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_length_bias(scores: list[dict[str, Any]], metrics: dict[str, Any], path: Path, title: str = "") -> Path:
    """Left: reward against response length (tokens). Right: accuracy when the chosen answer is the
    shorter vs the longer one, against the always-prefer-longer baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = metrics["length"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter([s["tokens_chosen"] for s in scores], [s["reward_chosen"] for s in scores], s=10, alpha=0.6,
                 label="chosen", color="tab:green")
    left.scatter([s["tokens_rejected"] for s in scores], [s["reward_rejected"] for s in scores], s=10, alpha=0.6,
                 label="rejected", color="tab:red")
    correlation = length["reward_length_correlation"]
    left.set_title("reward vs length" + (f" (r = {correlation:.2f})" if correlation is not None else ""))
    left.set_xlabel("response length (tokens)")
    left.set_ylabel("reward")
    left.legend()
    names = ["chosen shorter", "chosen longer"]
    values = [length["accuracy_chosen_shorter"], length["accuracy_chosen_longer"]]
    counts = [length["pairs_chosen_shorter"], length["pairs_chosen_longer"]]
    bars = right.bar(names, [v if v is not None else 0.0 for v in values], color=["tab:purple", "tab:orange"])
    for bar, value, count in zip(bars, values, counts, strict=True):
        text = f"{value:.0%}\nn={count}" if value is not None else f"-\nn={count}"
        right.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, text, ha="center", va="bottom")
    if length["prefer_longer_accuracy"] is not None:
        right.axhline(length["prefer_longer_accuracy"], linestyle="--", color="grey",
                      label=f"always prefer longer: {length['prefer_longer_accuracy']:.0%}")
        right.legend(loc="upper center", fontsize="small")
    right.axhline(0.5, linestyle=":", color="black", linewidth=0.8)
    right.set_ylim(0, 1.45)
    right.set_ylabel("PM accuracy")
    right.set_title("accuracy by which answer is longer")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- trainer


@functools.cache
def trainer_classes():
    """(SoftPreferenceCollator, SoftRewardTrainer): trl's collator and RewardTrainer extended with soft
    labels. Built on first use so that importing this module does not import torch and trl."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    @dataclass
    class SoftPreferenceCollator(DataCollatorForPreference):
        """trl's preference batch (chosen rows, then rejected rows, right-padded) plus `p_chosen` (B,)."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call([{"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
                                        for e in examples])
            batch["p_chosen"] = torch.tensor([float(e.get("p_chosen", 1.0)) for e in examples], dtype=torch.float)
            return batch

    class SoftRewardTrainer(RewardTrainer):
        """RewardTrainer whose loss is `soft_bt_loss` on each pair's p_chosen (1.0 when absent)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not (self.args.bf16 or self.args.fp16):
                # trl casts QLoRA adapters (and the saved score head) to bf16; with fp32 compute (CPU) that
                # would mix dtypes in the head's matmul. Keep trainable weights in the compute dtype.
                for parameter in self.model.parameters():
                    if parameter.requires_grad and parameter.dtype == torch.bfloat16:
                        parameter.data = parameter.data.float()

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            p_chosen = inputs.pop("p_chosen", None)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)  # (B,), (B,)
            if p_chosen is None:
                p_chosen = torch.ones_like(rewards_chosen)
            loss = soft_bt_loss(rewards_chosen, rewards_rejected, p_chosen.to(rewards_chosen.device))
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            with torch.no_grad():
                margin = rewards_chosen - rewards_rejected
                self._metrics[mode]["accuracy"].append((margin > 0).float().mean().item())
                self._metrics[mode]["margin"].append(margin.mean().item())
                self._metrics[mode]["mean_reward"].append(outputs.logits.mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftPreferenceCollator, SoftRewardTrainer


def _progress_callback(reporter, trainer_ref: dict):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Training steps and tokens to the reporter; loss lines at each logging step."""

        task = None
        tokens_seen = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = reporter.task("training PM", total=state.max_steps, unit="steps")
            if state.global_step:
                self.task.advance(state.global_step)
            self.tokens_seen = trainer_ref["trainer"]._total_train_tokens

        def on_step_end(self, args, state, control, **kwargs):
            total = trainer_ref["trainer"]._total_train_tokens
            self.task.advance(1, total - self.tokens_seen)
            self.tokens_seen = total

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                reporter.log(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                             f"accuracy {logs.get('accuracy', float('nan')):.2f}, margin {logs.get('margin', 0):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.task is not None:
                self.task.close()

    return Progress()


def _training_rows(tokenizer, records: list[dict[str, Any]], max_length: int) -> tuple[list[dict], int]:
    """Records -> rows of chosen_ids, rejected_ids, p_chosen (what the collator takes), and truncations."""
    prompts = [r["prompt"] for r in records]
    chosen, truncated_chosen = encode_responses(tokenizer, prompts, [r["chosen"] for r in records], max_length)
    rejected, truncated_rejected = encode_responses(tokenizer, prompts, [r["rejected"] for r in records], max_length)
    rows = [{"chosen_ids": c, "rejected_ids": j, "p_chosen": float(r["p_chosen"])}
            for r, c, j in zip(records, chosen, rejected, strict=True)]
    return rows, truncated_chosen + truncated_rejected


def _head_name(model) -> str:
    """The attribute holding a sequence classifier's output layer (Llama & co: `score`)."""
    for name in ("score", "classifier", "v_head"):
        if hasattr(model, name):
            return name
    raise ModelError(f"{type(model).__name__} has no score/classifier head -- use a decoder model that "
                     "AutoModelForSequenceClassification supports")


def _train(cfg: PMTrainConfig, ctx: StageContext, rows: list[dict], out: Path, resuming: bool) -> dict[str, Any]:
    """Fit the PM on tokenized rows with SoftRewardTrainer; save it standalone to OUT/model."""
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import RewardConfig
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from cai.models import (
        default_device,
        load_sequence_classifier,
        lora_config,
        precision_for,
        save_standalone,
    )

    device = ctx.device or default_device()
    precision = precision_for(device)
    set_seed(cfg.seed)  # the score head is initialised at random when the base is loaded
    with suppress_seqcls_warning():  # "score.weight MISSING" is expected: the head is new
        model, tokenizer = load_sequence_classifier(cfg.model, quantize=cfg.quantize, device=device)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    peft_config = None
    if cfg.lora_r:
        peft_config = lora_config(cfg.lora_r, task_type="SEQ_CLS", modules_to_save=[_head_name(model)])

    checkpoints = out / "checkpoints"
    args = RewardConfig(
        output_dir=str(checkpoints), per_device_train_batch_size=cfg.per_device_train_batch_size, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate, seed=cfg.seed, data_seed=cfg.seed,
        max_length=None,  # rows are already truncated (left) to cfg.max_length; trl would drop long ones instead
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1, logging_steps=10,
        report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_pin_memory=device != "cpu",
        **precision.trainer_kwargs(),
    )
    collator_class, trainer_class = trainer_classes()
    trainer_ref: dict[str, Any] = {}
    trainer = trainer_class(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        data_collator=collator_class(pad_token_id=tokenizer.pad_token_id), peft_config=peft_config,
        callbacks=[_progress_callback(ctx.reporter, trainer_ref)])
    trainer_ref["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the reporter shows them
    last = last_checkpoint(checkpoints) if resuming else None
    if last:
        ctx.reporter.log(f"resuming from {last}")
    result = train_or_resume(trainer, last, ctx.reporter.log)
    with suppress_seqcls_warning():  # a 4-bit PM is merged into a freshly loaded full-precision base
        model_dir = save_standalone(trainer.model, tokenizer, out / "model", base_reference=cfg.model,
                                    auto_class="sequence-classification")
    info = {"max_length": cfg.max_length, "base_model": cfg.model, "lora_r": cfg.lora_r, "quantize": cfg.quantize,
            "steps": trainer.state.global_step, "train_loss": result.training_loss if result else None,
            "train_tokens": trainer._total_train_tokens, "resumed_from": Path(last).name if last else None}
    (model_dir / PM_INFO).write_text(json.dumps(info, indent=2))  # last: marks the directory complete
    return info  # the checkpoints go with the manifest's complete()


# ----------------------------------------------------------------------------- stages


def run_train(cfg: PMTrainConfig, ctx: StageContext) -> StageResult:
    """Train a PM on the AI/human mix; report held-out accuracy on each side, calibration, length bias."""
    out = Path(cfg.out)
    model_dir = out / "model"
    manifest = Manifest("pm", cfg, ctx.manifest_for(out), inputs={"ai": cfg.ai, "human": cfg.human, "model": cfg.model},
                        outputs=[model_dir, out / "checkpoints"], force=cfg.force, scratch=[out / "checkpoints"])
    if (done := manifest.previous()) is not None:
        return done
    resuming = manifest.start()

    ai_all = read_preferences(cfg.ai, default_source=AI_SOURCE)
    human_all = read_preferences(cfg.human, default_source=HUMAN_SOURCE) if cfg.human else []
    ai_usable, ai_dropped = partition_trainable(ai_all)
    human_usable, human_dropped = partition_trainable(human_all)
    write_jsonl(out / "dropped.jsonl", ai_dropped + human_dropped)
    ai_train, ai_heldout = split_heldout(ai_usable, cfg.eval_fraction, cfg.seed)
    human_train, human_heldout = split_heldout(human_usable, cfg.eval_fraction, cfg.seed)
    if not ai_train and not human_train:
        raise RecordsError(f"{cfg.ai}: no trainable pairs left after holding out {cfg.eval_fraction:.0%} "
                           f"and dropping {len(ai_dropped) + len(human_dropped)} -- give more pairs or lower --eval-fraction")
    mix = mix_preferences(ai_train, human_train, cfg.human_fraction, cfg.seed)
    ctx.reporter.log(f"training mix: {mix.summary()}; held out {len(ai_heldout)} AI + {len(human_heldout)} human")
    heldout = ai_heldout + human_heldout
    write_jsonl(out / "heldout.jsonl", heldout)

    from cai.models import load_tokenizer

    info_path = model_dir / PM_INFO
    if resuming and info_path.exists():  # the model was saved before an interruption: no training left
        ctx.reporter.log(f"{model_dir} is already trained; evaluating it")
        info = json.loads(info_path.read_text())
        truncated = info.get("truncated_sequences", 0)
    else:
        rows, truncated = _training_rows(load_tokenizer(cfg.model), mix.records, cfg.max_length)
        info = _train(cfg, ctx, rows, out, resuming)
        info["truncated_sequences"] = truncated
        info_path.write_text(json.dumps(info, indent=2))

    metrics: dict[str, Any] = {"train_loss": info.get("train_loss"), "steps": info.get("steps"),
                               "train_tokens": info.get("train_tokens")}
    outputs = {"model": str(model_dir), "heldout": str(out / "heldout.jsonl")}
    if heldout:
        scorer = RewardScorer.from_directory(model_dir, device=ctx.device, batch_size=cfg.eval_batch_size)
        task = ctx.reporter.task("scoring held-out pairs", total=2 * len(heldout))
        heldout_metrics, scores = evaluate_pairs(scorer, heldout, progress=task.advance)
        task.close()
        metrics["heldout"] = heldout_metrics
        # By file, not by `source` (an AI file may carry any source name), and by position, not by id:
        # the two files may number their records alike ("0", "1", ...), and scores keep the input order.
        metrics["heldout_accuracy_ai"] = scores_accuracy(scores[:len(ai_heldout)])
        metrics["heldout_accuracy_human"] = scores_accuracy(scores[len(ai_heldout):])
        outputs["calibration"] = str(plot_reliability(scores, out / "calibration.png", title="held-out pairs"))
        outputs["length_bias"] = str(plot_length_bias(scores, heldout_metrics, out / "length_bias.png",
                                                      title="held-out pairs"))

    counts = {"ai_available": len(ai_all), "human_available": len(human_all), "ai_used": mix.ai_used,
              "human_used": mix.human_used, "ai_heldout": len(ai_heldout), "human_heldout": len(human_heldout),
              "dropped": len(ai_dropped) + len(human_dropped), "truncated_sequences": truncated}
    summary = f"trained on {mix.summary()}"
    if truncated:
        summary += f"; {truncated} sequences truncated to {cfg.max_length} tokens"
    if heldout:
        # "of N": the pairs the accuracy is over; those labelled 0.5 have no side to get right.
        sides = [f"{name} {_percent(metrics[f'heldout_accuracy_{side}'])} of {len(without_ties(pairs)[0])}"
                 for side, name, pairs in (("ai", "AI", ai_heldout), ("human", "human", human_heldout)) if pairs]
        summary += "; held-out accuracy: " + ", ".join(sides)
    else:
        summary += "; no held-out pairs (--eval-fraction 0 or too few pairs)"
    return manifest.complete(outputs=outputs, counts=counts, summary=summary, metrics=metrics)


def run_score(cfg: PMScoreConfig, ctx: StageContext) -> list[dict[str, Any]]:
    """Rewards for --prompt/--response or each record of --input (records returned with `reward` added;
    written to --out when given)."""
    if cfg.input is None:
        records = [{"prompt": cfg.prompt, "response": cfg.response}]
    else:
        records = []
        for number, row in read_jsonl(cfg.input):
            check_prompt(row.get("prompt"), f"{cfg.input}:{number}")  # records are written back as given
            if not isinstance(row.get("response"), str):
                raise RecordsError(f"{cfg.input}:{number}: a record to score needs `prompt` (text or chat messages) "
                                   "and `response` (text)")
            records.append(row)
        if not records:
            raise RecordsError(f"{cfg.input}: no records to score -- the file is empty")
    scorer = RewardScorer.from_directory(cfg.model, device=ctx.device, max_length=cfg.max_length,
                                         batch_size=cfg.batch_size)
    task = ctx.reporter.task("scoring", total=len(records))
    rewards = scorer.rewards([r["prompt"] for r in records], [r["response"] for r in records], task.advance)
    task.close()
    scored = [{**record, "reward": reward} for record, reward in zip(records, rewards, strict=True)]
    if cfg.out:
        write_jsonl(cfg.out, scored)
    return scored


def run_eval(cfg: PMEvalConfig, ctx: StageContext) -> StageResult:
    """Accuracy, calibration (ECE, reliability diagram) and length bias of a PM on a preference file."""
    manifest = None
    if cfg.out:
        out = Path(cfg.out)
        manifest = Manifest("pm-eval", cfg, ctx.manifest_for(out),
                            inputs={"model": str(pm_directory(cfg.model)), "pairs": cfg.pairs},
                            outputs=[out / "metrics.json"], force=cfg.force)
        if (done := manifest.previous()) is not None:
            return done
        manifest.start()
    # Pairs without a `source` are grouped under the file name in the per-source accuracy.
    dropped: list[dict] = []  # published rows that break their format, kept with the reason
    records = read_preferences(cfg.pairs, default_source=Path(cfg.pairs).name, limit=cfg.limit, dropped=dropped)
    scorer = RewardScorer.from_directory(cfg.model, device=ctx.device, max_length=cfg.max_length,
                                         batch_size=cfg.batch_size)
    task = ctx.reporter.task("scoring pairs", total=2 * len(records))
    metrics, scores = evaluate_pairs(scorer, records, cfg.bins, progress=task.advance)
    task.close()
    summary = (f"{len(records)} pairs: accuracy {_percent(metrics['accuracy'])}, ECE "
               f"{'-' if metrics['ece'] is None else format(metrics['ece'], '.3f')}, corr(reward, length) "
               f"{'-' if metrics['length']['reward_length_correlation'] is None else format(metrics['length']['reward_length_correlation'], '.2f')}")
    counts = {"pairs": len(records), "soft_label_pairs": metrics["soft_label_pairs"], "dropped": len(dropped)}
    if dropped:
        summary += f"; {len(dropped)} malformed rows skipped"
    if manifest is None:
        return StageResult(stage="pm-eval", outputs={}, counts=counts, summary=summary, metrics=metrics)
    out = Path(cfg.out)
    write_jsonl(out / "scores.jsonl", scores)
    if dropped:
        write_jsonl(out / "dropped.jsonl", dropped)
    title = Path(cfg.pairs).name
    outputs = {"metrics": str(out / "metrics.json"), "scores": str(out / "scores.jsonl"),
               "calibration": str(plot_reliability(scores, out / "calibration.png", cfg.bins, title)),
               "length_bias": str(plot_length_bias(scores, metrics, out / "length_bias.png", title)),
               **({"dropped": str(out / "dropped.jsonl")} if dropped else {})}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return manifest.complete(outputs=outputs, counts=counts, summary=summary, metrics=metrics)

