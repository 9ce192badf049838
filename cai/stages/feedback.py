"""Stage 2, AI feedback: the policy answers each prompt twice and a judge says which answer is better.

    cai feedback --prompts data/red_team_prompts.jsonl --model runs/demo/2-sft/model --out prefs.jsonl

For each prompt the policy samples two answers (seeded per prompt, so a resumed run samples the same
text; exactly so in fp32, see `cai.engine` on bf16); a pair whose answers are identical is resampled
once, then set aside (`reason: identical`) in `<out>.rejected.jsonl` and counted. The judge
(`cai.judge`; by default the policy model itself, loaded once) labels each pair against principles drawn
from the constitution, and one preference record per pair is appended to `--out`: `chosen`/`rejected`,
the soft label `p_chosen`, both answers in the order judged, P(A) in each order, the principle ids and
whether the orders agreed.

`cai feedback eval` (`run_eval`) checks a judge against labelled pairs before hours go into labelling:
agreement per order and after the swap, position consistency, calibration (ECE), and the same on a
built-in set of obvious pairs, per method.
"""

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.engine import EngineOptions
from cai.errors import ConfigError, RecordsError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, PRECISION_CHOICES, PRECISION_HELP, QUANTIZE_CHOICES, check_precision
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_jsonl_out,
    check_limit,
    engine_progress,
    item_seed,
)

METHOD_CHOICES = ("auto", "mc", "contrast")
# auto picks contrast for small judges because they cannot answer the multiple-choice question: with
# SmolLM2-135M on the 24 harmful-request sanity pairs, mc (order swap on) picked the refusal over the
# compliant answer in 11-15 (chance: it answers (B) whatever the order), contrast in 19 (principles drawn
# per pair) to 23 (less-harmful); `cai feedback eval` measures it for any judge.
METHOD_HELP = ("Judging method: mc (multiple choice: log-probabilities of ' (A)' / ' (B)', as in the paper), "
               "contrast (how much more likely each answer is under a system prompt that follows the principle "
               "than under one that ignores it; for small judges, which cannot answer the multiple-choice "
               "question), or auto: contrast for judges under ~1B parameters, mc above.")


def _parse_clamp(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) != 2:
            raise ConfigError(f"--clamp {value!r} must be two numbers LO,HI -- e.g. --clamp 0.4,0.6")
        try:
            value = (float(parts[0]), float(parts[1]))
        except ValueError:
            raise ConfigError(f"--clamp {value!r} must be two numbers LO,HI -- e.g. --clamp 0.4,0.6") from None
    lo, hi = (float(v) for v in value)
    if not 0.0 <= lo <= 0.5 <= hi <= 1.0:
        raise ConfigError(f"--clamp {lo},{hi} must satisfy 0 <= LO <= 0.5 <= HI <= 1 -- e.g. --clamp 0.4,0.6")
    return lo, hi


DEFAULT_CLAMP = (0.4, 0.6)  # the paper's bounds on chain-of-thought probabilities


def _check_clamp_use(clamp: tuple[float, float], cot: bool) -> None:
    # Only chain-of-thought probabilities are clamped: bounds given without --cot would do nothing.
    if not cot and clamp != DEFAULT_CLAMP:
        raise ConfigError(f"--clamp {clamp[0]},{clamp[1]} bounds chain-of-thought probabilities only, and --cot is not given -- "
                          "add --cot, "
                          "or drop --clamp")


@dataclass
class FeedbackConfig(EngineOptions):
    """`cai feedback`: sample answer pairs from the policy and label them with the judge."""

    prompts: str = field(default="", metadata={
        "help": "Prompts to answer (JSONL or CSV with a prompt-like column, chat messages, or .txt, one per line), normally red-team prompts."})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Model that samples the two answers: embedded:NAME, hub id or directory (normally the SL-CAI model)."})
    out: str = field(default="", metadata={
        "hash": False, "help": "Preference records to write (JSONL); pairs set aside go to <out>.rejected.jsonl."})
    judge: str | None = field(default=None, metadata={
        "help": "Feedback model that labels the pairs. Left out: --model (loaded once)."})
    constitution: str = field(default="default", metadata={
        "help": "Constitution file, or a bundled name (default, short, medical); its judge principles are used."})
    method: str = field(default="auto", metadata={"help": METHOD_HELP, "choices": METHOD_CHOICES})
    principles: int = field(default=1, metadata={
        "help": "Judge principles sampled per pair (seeded, distinct); the label averages over them (1 as in the paper)."})
    cot: bool = field(default=False, metadata={
        "help": "Multiple choice only (with --method auto, the judge is mc): the judge writes its reasoning "
                "first, then the options are read; probabilities are clamped to --clamp."})
    cot_max_new_tokens: int = field(default=128, metadata={"help": "Tokens of reasoning at most per question with --cot."})
    swap: bool = field(default=True, metadata={
        "help": "Multiple choice: ask again with the answers swapped and average both orders (off: --no-swap)."})
    clamp: tuple[float, float] = field(default=DEFAULT_CLAMP, metadata={"metavar": "LO,HI",
        "help": "LO,HI limits for chain-of-thought probabilities, which come out near 0 or 1 (paper: 0.4,0.6)."})
    few_shot: bool = field(default=True, metadata={
        "help": "Multiple choice: show the constitution's judging examples before the question (off: --no-few-shot)."})
    judge_temperature: float = field(default=1.0, metadata={
        "help": "Contrast method: p(A) = sigmoid((sA - sB) / this); lower gives more confident labels."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the two answers (> 0: the answers must differ). Not --judge-temperature, "
                "which scales the contrast judge's scores."})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling mass of the policy's answers, in (0, 1]; 1.0 samples from the whole distribution."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per sampled answer at most."})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "4bit: load the policy and judge in 4-bit NF4 (bitsandbytes; on CPU too). "
                "Left out (or none): full precision."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP, "choices": PRECISION_CHOICES})
    batch_size: int = field(default=32, metadata={
        "hash": False, "help": "Sequences per forward pass (generation and judging); lower it if memory runs out."})
    limit: int | None = field(default=None, metadata={
        "hash": False, "scope": True,  # each pair depends on its prompt only: a larger limit adds pairs
        "help": "Use only the first N prompts (left out: all). Raising it later adds to the pairs already labelled."})
    seed: int = field(default=0, metadata={"help": "Seed for the answers' sampling and the principles drawn per pair."})
    force: bool = field(default=False, metadata={
        "hash": False, "help": "Discard earlier output made with a different configuration and start over."})

    def __post_init__(self):
        self.check_engine_options()
        check_precision(self.precision)
        check_limit(self.limit)
        if not self.prompts:
            raise ConfigError("feedback needs prompts -- pass --prompts FILE (e.g. data/red_team_prompts.jsonl)")
        if not self.out:
            raise ConfigError("feedback needs an output file -- pass --out FILE.jsonl")
        check_jsonl_out(self.out, "feedback")
        if self.method not in METHOD_CHOICES:
            raise ConfigError(f"--method {self.method!r} is not one of {', '.join(METHOD_CHOICES)} -- e.g. "
                              "--method mc, or contrast for a judge under ~1B parameters")
        if self.cot and self.method == "contrast":
            raise ConfigError("--cot needs the multiple-choice judge, but --method is contrast -- drop --cot "
                              "or use --method mc")
        if self.cot and self.method == "auto":  # reasoning applies to multiple choice only: asking for it picks mc
            self.method = "mc"
        check_at_least_one(self, "principles", "max_new_tokens", "cot_max_new_tokens", "batch_size")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature {self.temperature} must be > 0: at 0 both answers "
                              "would be the same -- use e.g. 1.0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1] -- e.g. 0.9, or 1.0 for no cut")
        if self.judge_temperature <= 0:
            raise ConfigError(f"--judge-temperature {self.judge_temperature} must be > 0 -- e.g. 1.0")
        self.clamp = _parse_clamp(self.clamp)
        _check_clamp_use(self.clamp, self.cot)


@dataclass
class FeedbackEvalConfig(EngineOptions):
    """`cai feedback eval`: how well a judge agrees with labelled pairs, before it labels anything."""

    pairs: str = field(default="", metadata={
        "help": "Labelled pairs: hh-rlhf files (.jsonl or .jsonl.gz), trl preference format, or cai preference records."})
    judge: str = field(default=DEFAULT_MODEL, metadata={"help": "Judge model: embedded:NAME, hub id or directory."})
    method: str | None = field(default=None, metadata={"choices": METHOD_CHOICES,
        "help": "mc, contrast, or auto (contrast below ~1B parameters). Left out: evaluate both mc and contrast."})
    constitution: str = field(default="default", metadata={
        "help": "Constitution file, or a bundled name; its judge principles are used."})
    principles: int = field(default=1, metadata={"help": "Judge principles sampled per pair; the verdict averages over them."})
    swap: bool = field(default=True, metadata={"help": "Multiple choice: also ask with the answers swapped (off: --no-swap)."})
    cot: bool = field(default=False, metadata={
        "help": "Multiple choice: the judge reasons before answering; probabilities clamped to --clamp."})
    cot_max_new_tokens: int = field(default=128, metadata={"help": "Tokens of reasoning at most per question with --cot."})
    clamp: tuple[float, float] = field(default=DEFAULT_CLAMP, metadata={"metavar": "LO,HI",
        "help": "LO,HI limits for chain-of-thought probabilities (paper: 0.4,0.6)."})
    few_shot: bool = field(default=True, metadata={"help": "Multiple choice: show the judging examples first (off: --no-few-shot)."})
    judge_temperature: float = field(default=1.0, metadata={"help": "Contrast method: p(A) = sigmoid((sA - sB) / this)."})
    sanity: bool = field(default=True, metadata={
        "help": "Also evaluate on the built-in sanity pairs (obvious refusals vs compliance, split by kind)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N labelled pairs (left out: all)."})
    bins: int = field(default=10, metadata={"help": "Equal-width probability bins for the calibration error (ECE)."})
    out: str | None = field(default=None, metadata={
        "hash": False, "help": "Directory for metrics.json and verdicts.jsonl. Left out: print the table only."})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "4bit: load the judge in 4-bit NF4 (bitsandbytes; on CPU too). Left out (or none): full precision."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP, "choices": PRECISION_CHOICES})
    batch_size: int = field(default=16, metadata={"hash": False, "help": "Sequences per forward pass."})
    seed: int = field(default=0, metadata={
        "help": "Seed for the principles drawn and for which answer is shown as (A)."})

    def __post_init__(self):
        self.check_engine_options()
        check_precision(self.precision)
        check_limit(self.limit)
        if not self.pairs:
            raise ConfigError("feedback eval needs labelled pairs -- pass --pairs FILE")
        if self.method is not None and self.method not in METHOD_CHOICES:
            raise ConfigError(f"--method {self.method!r} is not one of {', '.join(METHOD_CHOICES)} -- e.g. "
                              "--method mc, or contrast for a judge under ~1B parameters")
        if self.cot and self.method in ("contrast", "auto"):
            raise ConfigError(f"--cot needs the multiple-choice judge, but --method is {self.method} -- drop --cot "
                              "or use --method mc")
        # cot_max_new_tokens 0 would clamp answers read after no reasoning at all.
        check_at_least_one(self, "principles", "bins", "cot_max_new_tokens", "batch_size")
        if self.judge_temperature <= 0:
            raise ConfigError(f"--judge-temperature {self.judge_temperature} must be > 0")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            # Checked here: found only when writing, it would fail after every pair had been judged.
            raise ConfigError(f"--out {self.out!r} is a file, but feedback eval writes a directory (metrics.json, "
                              "verdicts.jsonl) -- pass --out DIR")
        self.clamp = _parse_clamp(self.clamp)
        _check_clamp_use(self.clamp, self.cot)


# ----------------------------------------------------------------------------- pure helpers


def rejected_path(out: str | Path) -> Path:
    """Where pairs that were set aside go: `prefs.jsonl` -> `prefs.rejected.jsonl`."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.rejected.jsonl")


def preference_record(item: dict[str, Any], response_a: str, response_b: str, verdict, method: str) -> dict[str, Any]:
    """One labelled pair as a preference record; `chosen` is the answer the judge finds more likely better."""
    a_wins = verdict.p_a >= 0.5
    record = {
        "id": item["id"],
        "prompt": item["prompt"],
        "chosen": response_a if a_wins else response_b,
        "rejected": response_b if a_wins else response_a,
        "p_chosen": max(verdict.p_a, 1.0 - verdict.p_a),
        "response_a": response_a,
        "response_b": response_b,
        "p_a": verdict.p_a,
        "p_a_by_order": verdict.p_a_by_order,
        "principle_ids": verdict.principle_ids,
        "agree": verdict.agree,
        "method": method,
        "source": "ai-harmless",
    }
    if verdict.reasoning is not None:
        record["reasoning"] = verdict.reasoning
    if "category" in item:
        record["category"] = item["category"]
    return record


def label_summary(records: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Pairs labelled, position consistency (share of swapped pairs whose orders agreed; None when no
    pair was swapped) and the mean margin |p - 0.5| of the soft labels."""
    swapped = [r["agree"] for r in records if r.get("agree") is not None]
    return {
        "pairs": len(records),
        "position_consistency": sum(swapped) / len(swapped) if swapped else None,
        "mean_margin": sum(abs(r["p_a"] - 0.5) for r in records) / len(records) if records else None,
    }


def _pair_key(text: str) -> str:
    return " ".join(text.split())


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- feedback


def _load_engine(reference: str, cfg, ctx: StageContext):
    """The engine for a model reference (tests replace this to count model loads and calls)."""
    from cai.engine import Engine

    return Engine.from_reference(reference, batch_size=cfg.batch_size, quantize=cfg.quantize, device=ctx.device,
                                 precision=cfg.precision, options=cfg)


def _sample_pairs(engine, items: list[dict[str, Any]], cfg: FeedbackConfig, task) -> list[tuple[str, str] | str]:
    """Two answers per item, or the reason the pair is set aside ("identical", "empty")."""
    from cai.engine import Sampling
    from cai.records import as_messages

    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, seed=cfg.seed)
    conversations = [as_messages(item["prompt"]) for item in items]
    seeds = [item_seed(cfg.seed, item["id"], salt) for salt in ("a", "b") for item in items]
    outputs = engine.generate_chat(conversations + conversations, sampling, seeds=seeds, progress=engine_progress(task))
    pairs = [[outputs[i].text, outputs[len(items) + i].text] for i in range(len(items))]
    retry = [i for i, (a, b) in enumerate(pairs) if _pair_key(a) == _pair_key(b)]
    if retry:  # one more draw of the second answer, with a fresh seed
        again = engine.generate_chat([conversations[i] for i in retry], sampling,
                                     seeds=[item_seed(cfg.seed, items[i]["id"], "b", "retry") for i in retry])
        for i, generation in zip(retry, again, strict=True):
            pairs[i][1] = generation.text
    results: list[tuple[str, str] | str] = []
    for a, b in pairs:
        if _pair_key(a) == _pair_key(b):
            results.append("identical")
        elif not a.strip() or not b.strip():
            results.append("empty")
        else:
            results.append((a, b))
    return results


def run(cfg: FeedbackConfig, ctx: StageContext) -> StageResult:
    from cai import constitution as constitution_module
    from cai.judge import Comparison, Judge
    from cai.models import check_prompts_fit
    from cai.records import RecordWriter, Resume, read_jsonl, read_prompts

    out, rejected_out = Path(cfg.out), rejected_path(cfg.out)
    constitution_file = constitution_module.resolve_path(cfg.constitution)
    manifest = Manifest("feedback", cfg, ctx.manifest_for(out),
                        inputs={"prompts": cfg.prompts, "policy": cfg.model, "judge": cfg.judge or cfg.model,
                                "constitution": constitution_file},
                        outputs=[out, rejected_out], force=cfg.force)
    if (done := manifest.previous()) is not None:
        return done
    constitution = constitution_module.load(constitution_file)
    constitution.check_judge_principles(cfg.principles)
    resuming = manifest.start()
    items = read_prompts(cfg.prompts, cfg.limit)

    method = cfg.method
    judged, judge_seconds = 0, 0.0  # comparisons judged in this run, and the time spent judging them
    chunk_size = max(1, cfg.batch_size)  # records reach the file after every chunk
    with RecordWriter(rejected_out) as rejected, Resume(out, items, chunk_size, skip=rejected.done_ids) as resume:
        if resuming:
            ctx.reporter.log(f"resuming: {resume.done} of {len(items)} prompts already done")
        if resume.todo:
            policy = _load_engine(cfg.model, cfg, ctx)
            check_prompts_fit(policy, resume.todo, cfg.prompts, cfg.max_new_tokens)
            same = cfg.judge is None or cfg.judge == cfg.model
            judge_engine = policy if same else _load_engine(cfg.judge, cfg, ctx)
            judge = Judge(judge_engine, constitution, method=cfg.method, swap=cfg.swap, cot=cfg.cot,
                          clamp=cfg.clamp, few_shot=cfg.few_shot, temperature=cfg.judge_temperature,
                          cot_max_new_tokens=cfg.cot_max_new_tokens, seed=cfg.seed)
            method = judge.method
            if cfg.method == "auto":
                ctx.reporter.log(f"judge method: {method} (auto, chosen by the judge's size)")
            sampling_task = ctx.reporter.task("sampling answer pairs", total=2 * len(resume.todo), unit="answers")
            judging_task, total = None, len(resume.todo)  # created when judging starts, so its rate does not count the first sampling
            for chunk in resume:
                pairs = _sample_pairs(policy, chunk, cfg, sampling_task)
                if judging_task is None:
                    judging_task = ctx.reporter.task(f"judging ({method})", total=total, unit="comparisons")
                labelled = [(item, pair) for item, pair in zip(chunk, pairs, strict=True) if isinstance(pair, tuple)]
                for item, pair in zip(chunk, pairs, strict=True):
                    if isinstance(pair, str):
                        rejected.append({"id": item["id"], "prompt": item["prompt"], "reason": pair})
                        judging_task.advance(1)
                comparisons = [Comparison(item["prompt"], a, b,
                                          constitution.sample_judge_principles(item["id"], cfg.principles, cfg.seed))
                               for item, (a, b) in labelled]
                started = time.perf_counter()
                verdicts = judge.compare(comparisons, progress=engine_progress(judging_task))
                judge_seconds += time.perf_counter() - started
                judged += len(comparisons)
                resume.write(preference_record(item, a, b, verdict, method)
                             for (item, (a, b)), verdict in zip(labelled, verdicts, strict=True))
            sampling_task.close()
            judging_task.close()
    records = resume.records()
    set_aside = [record for _, record in read_jsonl(rejected_out)] if rejected_out.exists() else []
    if records and method == "auto":  # resumed with nothing left to do: the records say which method ran
        method = records[0].get("method", method)
    stats = label_summary(records)
    reasons: dict[str, int] = {}
    for record in set_aside:
        reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
    counts = {"prompts": len(items), "pairs_labelled": len(records), "skipped": len(set_aside),
              **{f"skipped_{reason}": n for reason, n in sorted(reasons.items())}}
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
    rate = judged / judge_seconds if judge_seconds > 0 else None
    consistency = _fmt(stats["position_consistency"])
    if records and stats["position_consistency"] is None:  # a bare "-" would not say why there is none
        consistency += " (one order: --no-swap)" if method == "mc" else " (contrast: no order to swap)"
    summary = (f"{len(records)} pairs labelled ({method}); position consistency "
               f"{consistency}; mean |p - 0.5| {_fmt(stats['mean_margin'], 3)}; "
               f"skipped pairs: {skipped_text}" + (f"; judging {rate:.2f} comparisons/s" if rate else ""))
    return manifest.complete(outputs={"preferences": out, "rejected": rejected_out}, counts=counts, summary=summary,
                             metrics={**stats, "method": method, "judge_comparisons_per_s": rate})


# ----------------------------------------------------------------------------- feedback eval


def _a_is_chosen(seed: int, record_id: str) -> bool:
    """Which side the labelled winner is shown on: a seeded coin per pair, so a judge that likes one
    position cannot look good by luck of how the file was written."""
    digest = hashlib.sha256(f"{seed}\x1f{record_id}\x1fside".encode()).digest()
    return digest[0] % 2 == 0


def judged_pairs(records: list[dict[str, Any]], constitution, principles: int, seed: int):
    """(comparisons, targets): each labelled pair as a Comparison with the winner on a seeded side, and
    the target P(A is better): p_chosen when A is the chosen answer, 1 - p_chosen otherwise."""
    from cai.judge import Comparison

    comparisons, targets = [], []
    for record in records:
        drawn = constitution.sample_judge_principles(record["id"], principles, seed)
        if _a_is_chosen(seed, record["id"]):
            comparisons.append(Comparison(record["prompt"], record["chosen"], record["rejected"], drawn))
            targets.append(float(record["p_chosen"]))
        else:
            comparisons.append(Comparison(record["prompt"], record["rejected"], record["chosen"], drawn))
            targets.append(1.0 - float(record["p_chosen"]))
    return comparisons, targets


def agreement_metrics(verdicts, targets: list[float], bins: int = 10) -> dict[str, float | int | None]:
    """How a judge's verdicts agree with labels. `targets[i]` is the labelled P(A is better); with soft
    labels only the winner counts for agreement (a tie, 0.5, counts as a miss). Keys: `pairs`,
    `agreement` (after the swap), `agreement_first` / `agreement_second` (each order alone; None
    without swap), `position_consistency`, `ece` (of p_a against the targets) and `mean_margin`."""
    from cai.judge import expected_calibration_error, winner

    def agreement(probabilities):
        return sum(winner(p) is not None and winner(p) == winner(t)
                   for p, t in zip(probabilities, targets, strict=True)) / len(targets)

    two_orders = all(len(v.p_a_by_order) == 2 for v in verdicts)
    agrees = [v.agree for v in verdicts if v.agree is not None]
    return {
        "pairs": len(verdicts),
        "agreement": agreement([v.p_a for v in verdicts]),
        "agreement_first": agreement([v.p_a_by_order[0] for v in verdicts]) if two_orders else None,
        "agreement_second": agreement([v.p_a_by_order[1] for v in verdicts]) if two_orders else None,
        "position_consistency": sum(agrees) / len(agrees) if agrees else None,
        "ece": expected_calibration_error([v.p_a for v in verdicts], targets, bins),
        "mean_margin": sum(abs(v.p_a - 0.5) for v in verdicts) / len(verdicts),
    }


def fit_contrast_temperature(p_a: list[float], targets: list[float], temperature: float) -> dict[str, float]:
    """The contrast temperature that best fits labelled pairs: the verdicts' score differences
    (temperature * logit(p_a)) are re-scaled over a grid of temperatures from 0.01 to 10, keeping the
    one with the lowest mean binary cross-entropy against the targets. Returns `temperature` (best),
    `log_loss` (at the temperature used) and `log_loss_fit` (at the best)."""

    def log_loss(scale: float) -> float:
        total = 0.0
        for p, t in zip(p_a, targets, strict=True):
            p = min(max(p, 1e-12), 1 - 1e-12)
            logit = temperature * math.log(p / (1 - p)) / scale
            # -[t log s(x) + (1 - t) log(1 - s(x))], written stably: softplus(x) - t * x
            total += max(logit, 0.0) + math.log1p(math.exp(-abs(logit))) - t * logit
        return total / len(p_a)

    grid = [10 ** (k / 20) for k in range(-40, 21)]  # 0.01 ... 10, 20 steps a decade
    best = min(grid, key=log_loss)
    return {"temperature": best, "log_loss": log_loss(temperature), "log_loss_fit": log_loss(best)}


TABLE_COLUMNS = ("pairs", "agreement_first", "agreement_second", "agreement", "position_consistency", "ece",
                 "mean_margin")
TABLE_HEADERS = ("pairs", "agree 1st", "agree 2nd", "agree swap", "consistent", "ECE", "|p-0.5|")


def format_table(title: str, rows: dict[str, dict[str, Any]]) -> str:
    """One method's metrics as a fixed-width text table, one row per evaluation set."""
    width = max([len("set")] + [len(name) for name in rows])
    lines = [title, "  ".join([f"{'set':<{width}}", *[f"{h:>10}" for h in TABLE_HEADERS]])]
    for name, metrics in rows.items():
        cells = [f"{metrics['pairs']:>10}"] + [f"{_fmt(metrics[c]):>10}" for c in TABLE_COLUMNS[1:]]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def _question_key(record: dict[str, Any]) -> tuple:
    """What makes two labelled pairs the same question to the judge."""
    return record["id"], repr(record["prompt"]), record["chosen"], record["rejected"]


def run_eval(cfg: FeedbackEvalConfig, ctx: StageContext) -> StageResult:
    """Judge the labelled pairs (and the sanity set) with each method; metrics per method and set.
    `StageResult.metrics["tables"]` holds the printable tables; nothing is resumed or skipped."""
    import json

    from cai import constitution as constitution_module
    from cai.judge import Judge, resolve_method
    from cai.paths import bundled
    from cai.records import read_preferences, write_jsonl

    constitution = constitution_module.load(cfg.constitution)
    constitution.check_judge_principles(cfg.principles)
    labelled = read_preferences(cfg.pairs, default_source="labelled", limit=cfg.limit)
    # hh-rlhf has rows whose final answer is empty: neither judge has anything to read in them (the
    # contrast judge scores the answer's tokens), so they are left out of every method alike.
    empty = [r["id"] for r in labelled if not r["chosen"].strip() or not r["rejected"].strip()]
    if empty:
        labelled = [r for r in labelled if r["chosen"].strip() and r["rejected"].strip()]
        ctx.reporter.log(f"feedback eval: {len(empty)} pair(s) of {cfg.pairs} have an empty answer and are left "
                         f"out ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})")
        if not labelled:
            raise RecordsError(f"{cfg.pairs}: every pair has an empty answer -- nothing to judge")
    sets: dict[str, list[dict[str, Any]]] = {f"pairs: {Path(cfg.pairs).name}": labelled}
    if cfg.sanity:
        sanity = read_preferences(bundled("data/judge_sanity_pairs.jsonl"), default_source="sanity")
        for kind in sorted({r.get("kind", "other") for r in sanity}, reverse=True):
            sets[f"sanity: {kind}"] = [r for r in sanity if r.get("kind", "other") == kind]

    engine = _load_engine(cfg.judge, cfg, ctx)
    methods = [resolve_method(cfg.method, engine)] if cfg.method else ["mc", "contrast"]
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    fits: dict[str, dict[str, float]] = {}
    first = next(iter(sets))
    verdict_rows: list[dict[str, Any]] = []
    tables = []
    for method in methods:
        judge = Judge(engine, constitution, method=method, swap=cfg.swap, cot=cfg.cot and method == "mc",
                      clamp=cfg.clamp, few_shot=cfg.few_shot, temperature=cfg.judge_temperature,
                      cot_max_new_tokens=cfg.cot_max_new_tokens, seed=cfg.seed)
        metrics[method] = {}
        prepared = {name: judged_pairs(records, constitution, cfg.principles, cfg.seed) for name, records in sets.items()}
        # A pair in more than one set (the sanity file given as --pairs) is judged once: its comparison,
        # principles and side are drawn from its id and content, so it is the same question in each.
        unique = {}
        for name, records in sets.items():
            for record, comparison in zip(records, prepared[name][0], strict=True):
                unique.setdefault(_question_key(record), comparison)
        task = ctx.reporter.task(f"judging ({method})", total=len(unique), unit="comparisons")
        judged = dict(zip(unique, judge.compare(list(unique.values()), progress=engine_progress(task)), strict=True))
        task.close()
        for name, records in sets.items():
            targets = prepared[name][1]
            verdicts = [judged[_question_key(record)] for record in records]
            metrics[method][name] = agreement_metrics(verdicts, targets, cfg.bins)
            if method == "contrast" and name == first:  # fitted on the user's labels, never on the sanity set
                fits[method] = fit_contrast_temperature([v.p_a for v in verdicts], targets, cfg.judge_temperature)
            for record, verdict, target in zip(records, verdicts, targets, strict=True):
                verdict_rows.append({"id": record["id"], "set": name, "method": method, "target_p_a": target,
                                     "p_a": verdict.p_a, "p_a_by_order": verdict.p_a_by_order,
                                     "agree": verdict.agree, "principle_ids": verdict.principle_ids})
        options = [f"swap {'on' if judge.swap else 'off'}"] if method == "mc" else [f"temperature {cfg.judge_temperature}"]
        if method == "mc":
            options += [f"few-shot {'on' if cfg.few_shot else 'off'}"] + (["cot"] if cfg.cot else [])
        table = format_table(f"judge {cfg.judge}, method {method} ({', '.join(options)})", metrics[method])
        if method in fits:
            fit = fits[method]
            table += (f"\nbest --judge-temperature on {first.removeprefix('pairs: ')}: {fit['temperature']:.3g} "
                      f"(log loss {fit['log_loss']:.3f} at {cfg.judge_temperature:g} -> {fit['log_loss_fit']:.3f})")
            if fit["temperature"] >= 10:
                table += "; at the top of the grid: the scores carry no usable signal on these labels"
        tables.append(table)

    outputs: dict[str, str] = {}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"methods": metrics, "temperature_fit": fits}, indent=2))
        write_jsonl(out / "verdicts.jsonl", verdict_rows)
        outputs = {"metrics": str(out / "metrics.json"), "verdicts": str(out / "verdicts.jsonl")}
    summary = "; ".join(f"{method}: agreement {_fmt(metrics[method][first]['agreement'])} on {first}"
                        for method in methods)
    counts = {name: len(r) for name, r in sets.items()} | ({"left_out_empty_answer": len(empty)} if empty else {})
    return StageResult(stage="feedback-eval", outputs=outputs, counts=counts,
                       summary=summary, metrics={"methods": metrics, "temperature_fit": fits, "tables": tables})
