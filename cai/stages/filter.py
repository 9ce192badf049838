"""`cai filter`: keep the verifiable prompts the starting policy sometimes solves, for RL.

    cai filter --prompts data/maths_train.jsonl --model embedded:smollm2-135m-instruct --out runs/x/5-filter

For each prompt with an `answer` (maths) or `tests` (code) the policy samples `samples` answers, each
checked with the RL stage's reward, and pass@k and all@k are estimated from them (`cai.passk`). A prompt
is kept when pass@k > 0 and all@k < 1: the policy solves it sometimes and fails it sometimes. One it
always solves, or never does, gives every answer in a GRPO/RLOO group the same reward, so every
advantage is zero and the step learns nothing from it; a prompt without an `answer` or `tests` cannot be
checked at all.

Writes to `OUT/`: prompts.jsonl (the kept records, unchanged, plus `pass_at_k`), dropped.jsonl (the others,
each with `dropped`: always-solved, never-solved or not-verifiable, and its figures), samples.jsonl (every
sampled answer and its score; a killed run resumes from it) and manifest.json.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import ConfigError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, PRECISION_HELP, check_precision
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_directory_out,
    check_limit,
)


@dataclass
class FilterConfig:
    prompts: str = field(default="", metadata={
        "help": "Prompt file whose records carry `answer` (maths) or `tests` (code), e.g. data/maths_train.jsonl."})
    out: str = field(default="", metadata={
        "help": "Output directory: prompts.jsonl (kept), dropped.jsonl (with the reason), samples.jsonl.",
        "hash": False})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "The policy RL will start from, which samples the answers: embedded:NAME, hub id or directory."})
    k: int = field(default=4, metadata={
        "help": "Group size (use RL's --num-generations): a prompt is kept when a group of k answers can mix "
                "right and wrong, pass@k > 0 and all@k < 1."})
    samples: int = field(default=8, metadata={
        "help": "Answers sampled per prompt (n >= k) to estimate pass@k from; more gives a steadier estimate."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (use RL's --temperature)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Answer length limit, in tokens (use RL's)."})
    limit: int | None = field(default=None, metadata={
        "help": "Read at most this many prompts (left out: all)."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch.", "hash": False})
    seed: int = field(default=0, metadata={"help": "Seed for sampling the answers."})
    force: bool = field(default=False, metadata={
        "hash": False, "help": "Discard earlier output made with a different configuration and start over."})

    def __post_init__(self):
        check_directory_out(self.out, "filter", "runs/x/5-filter")
        check_precision(self.precision)
        check_limit(self.limit)
        check_at_least_one(self, "k", "samples", "max_new_tokens", "batch_size")
        if self.samples < self.k:
            raise ConfigError(f"--samples {self.samples} is fewer than --k {self.k}: pass@k is estimated from at "
                              f"least k answers -- give --samples {self.k} or more")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature}: sampling needs a temperature > 0")


# ----------------------------------------------------------------------------- pure helpers


def verdict(scores: list[float], k: int) -> tuple[float, float, str | None]:
    """(pass@k, all@k, None to keep or the reason to drop) from one prompt's sampled scores.

    A GRPO group of k answers teaches nothing when it is all wrong (chance 1 - pass@k) or all right
    (chance all@k). Kept: pass@k > 0 and all@k < 1, so some group of k can mix right and wrong. (pass@k < 1
    read alone would also drop a prompt solved 6 times in 8, whose groups of 4 mix 2 times in 3.)"""
    from cai.passk import all_at_k, pass_at_k

    n, c = len(scores), int(sum(scores))
    some, every = pass_at_k(n, c, k), all_at_k(n, c, k)
    if some <= 0.0:
        return some, every, "never-solved"
    if every >= 1.0:
        return some, every, "always-solved"
    return some, every, None


def choose(records: list[dict[str, Any]], scores: dict[str, list[float]], k: int
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split `records` into (kept, dropped) by their sampled `scores` (id -> one 1.0/0.0 per answer);
    a record without `answer`/`tests` is dropped as not-verifiable. Both keep the input order."""
    from cai.passk import is_verifiable

    kept, dropped = [], []
    for record in records:
        if not is_verifiable(record):
            dropped.append({**record, "dropped": "not-verifiable"})
            continue
        mine = scores[record["id"]]
        some, every, reason = verdict(mine, k)
        figures = {"pass_at_k": round(some, 4), "all_at_k": round(every, 4), "solved": int(sum(mine)),
                   "samples": len(mine)}
        if reason is None:
            kept.append({**record, **figures})
        else:
            dropped.append({**record, **figures, "dropped": reason})
    return kept, dropped


# ----------------------------------------------------------------------------- run


def run(cfg: FilterConfig, ctx: StageContext) -> StageResult:
    from cai.passk import check_answers, engine_sampler, is_verifiable, sample_scores
    from cai.records import RecordWriter, read_prompts, write_jsonl

    if not cfg.prompts:
        raise ConfigError("no --prompts given -- pass a file of records with `answer` or `tests`, e.g. "
                          "--prompts data/maths_train.jsonl")
    if not cfg.out:
        raise ConfigError("no --out given -- name the directory for the kept and dropped prompts")
    out = Path(cfg.out)
    paths = {name: out / f"{name}.jsonl" for name in ("prompts", "dropped", "samples")}
    manifest = Manifest("filter", cfg, ctx.manifest_for(out), inputs={"prompts": cfg.prompts, "policy": cfg.model},
                        outputs=list(paths.values()), force=cfg.force)
    if (done := manifest.previous()) is not None:
        return done
    manifest.start()
    out.mkdir(parents=True, exist_ok=True)
    records = read_prompts(cfg.prompts, cfg.limit)
    check_answers(records, cfg.prompts)

    def make_sampler():
        from cai.engine import Engine

        ctx.reporter.log(f"filter: sampling {cfg.samples} answers to each prompt with {cfg.model}")
        engine = Engine.from_reference(cfg.model, batch_size=cfg.batch_size, device=ctx.device,
                                       precision=cfg.precision)
        return engine_sampler(engine, cfg.max_new_tokens, cfg.temperature, cfg.seed)

    task = ctx.reporter.task("filter: answers", total=cfg.samples * sum(1 for r in records if is_verifiable(r)))
    with RecordWriter(paths["samples"]) as writer:
        scores = sample_scores(records, make_sampler, cfg.samples, cfg.batch_size, writer,
                               progress=task.advance)
    task.close()

    kept, dropped = choose(records, scores, cfg.k)
    write_jsonl(paths["prompts"], kept)
    write_jsonl(paths["dropped"], dropped)
    reasons = {reason: sum(1 for r in dropped if r["dropped"] == reason)
               for reason in ("never-solved", "always-solved", "not-verifiable")}
    counts = {"prompts": len(records), "kept": len(kept), **{f"dropped/{k}": v for k, v in reasons.items()}}
    summary = (f"kept {len(kept)} of {len(records)} prompts with pass@{cfg.k} > 0 and all@{cfg.k} < 1 under {cfg.model} "
               f"({cfg.samples} samples each); dropped " + ", ".join(f"{v} {k}" for k, v in reasons.items()))
    return manifest.complete(outputs={k: str(v) for k, v in paths.items()}, counts=counts, summary=summary,
                             metrics={"kept_share": len(kept) / len(records) if records else 0.0})
