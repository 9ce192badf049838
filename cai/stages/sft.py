"""Stage 1b (SL-CAI model): supervised fine-tuning on the final revisions, mixed with helpful answers.

Each critique record becomes one chat example: the request as the user turn, its final revision as
the assistant turn, with the loss on the assistant turn only. The example is a trl prompt-completion
conversational record trained with `completion_only_loss`: the labels cover exactly the answer's tokens
plus the end-of-turn token that closes it (and, with ChatML templates, the newline after it), so the
model learns to stop. The prompt, the chat template's system line included, is never a target.

`--helpful F` keeps the model helpful, as the paper did: prompts from F are answered by the *starting*
model (greedy, batched through the engine) and mixed in so that they make up `--helpful-fraction` of
the training examples. Only as many prompts as the fraction needs are answered (a seeded sample), and
the answers are cached in `OUT/helpful_answers.jsonl`, so a re-run does not generate them again.

    cai sft --data runs/x/critique.jsonl --out runs/x/sft --helpful data/helpful_prompts.jsonl

LoRA (r=16 on every linear layer) by default; `--lora-r 0` trains every weight; `--quantize 4bit`
loads the base in NF4 and trains LoRA on it (QLoRA). `OUT` is a standalone model directory:
`AutoModelForCausalLM.from_pretrained(OUT)` loads it with no adapter step (the adapter is kept in
`OUT/adapter/`). Trainer checkpoints go to `OUT/checkpoints/` while training (the last one is kept)
and a re-run after an interruption resumes from it; they are removed once the model is saved.
"""

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.engine import EngineOptions
from cai.errors import ConfigError, RecordsError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, QUANTIZE_CHOICES
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_directory_out,
    last_checkpoint,
    train_or_resume,
)

HELPFUL_CACHE = "helpful_answers.jsonl"  # in OUT: the starting model's answers to the helpful prompts
CHECKPOINTS = "checkpoints"  # in OUT: trainer checkpoints, removed after the final save
REJECTED = "rejected.jsonl"  # in OUT: examples left out of training, each with a `reason`


@dataclass
class SFTConfig(EngineOptions):
    """`cai sft`: fine-tune on (request, final revision) chat pairs plus helpful answers.

    NOTE: `helpful_fraction` defaults to 0.5: as many helpful examples as harmlessness ones. Fewer lets
    a small model learn that declining is always the answer (over-refusal); more dilutes the revisions.
    """

    # Inputs and outputs
    data: str = field(default="critique.jsonl", metadata={
        "help": "Critique records from `cai critique` (JSONL with `id`, `prompt` and `final`)."})
    out: str = field(default="sft-model", metadata={
        "hash": False, "help": "Output directory: a standalone model (adapter in OUT/adapter), manifest.json."})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Starting model: embedded:NAME, a hub id, or a local directory. It also answers --helpful."})
    helpful: str | None = field(default=None, metadata={
        "help": "Prompt set answered by the starting model and mixed in. Left out: train on the revisions alone."})
    helpful_fraction: float = field(default=0.5, metadata={
        "help": "Share of the training examples that come from --helpful, in [0, 1); unused without --helpful."})
    helpful_max_new_tokens: int = field(default=256, metadata={
        "help": "Tokens generated at most per helpful answer (greedy)."})
    # How to train
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "Load the base in 4-bit and train LoRA on it (QLoRA): 4bit. Left out (or none): full precision."})
    lora_r: int = field(default=16, metadata={
        "help": "LoRA rank on every linear layer (alpha = 2r); 0 = full fine-tuning of every weight."})
    epochs: float = field(default=1.0, metadata={
        "help": "Passes over the training examples (fractions allowed); --max-steps overrides it."})
    max_steps: int | None = field(default=None, metadata={
        "help": "Stop after this many optimizer steps. Left out: run --epochs."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate (linear decay). Left out: 2e-4 with LoRA, 2e-5 for full fine-tuning."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Examples per optimizer step on each device."})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per example at most (prompt + answer); longer answers are cut, longer prompts dropped."})
    seed: int = field(default=0, metadata={
        "help": "Seed for the helpful sample, data order and LoRA initialisation."})
    # How to run it (does not change the model)
    save_steps: int = field(default=50, metadata={
        "hash": False, "help": "Write a resumable checkpoint every N steps (only the last is kept)."})
    generation_batch_size: int = field(default=32, metadata={
        "hash": False, "help": "Prompts answered together when generating the helpful answers."})
    force: bool = field(default=False, metadata={
        "hash": False, "help": "Discard earlier output made with a different configuration and start over."})

    def __post_init__(self):
        self.check_engine_options()
        check_directory_out(self.out, "sft", "sl-model")
        if self.quantize == "none":
            self.quantize = None
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"--quantize {self.quantize!r}: use 4bit, or leave --quantize out")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r {self.lora_r}: must be >= 0 (0 = full fine-tuning)")
        if self.quantize and self.lora_r == 0:
            raise ConfigError(f"--quantize {self.quantize} with --lora-r 0: 4-bit weights cannot be trained directly "
                              "-- give --lora-r 16 (QLoRA), or drop --quantize for full fine-tuning")
        if not 0.0 <= self.helpful_fraction < 1.0:
            raise ConfigError(f"--helpful-fraction {self.helpful_fraction}: must be in [0, 1) -- the revisions "
                              "are the point of this stage; use 0 to leave helpful answers out")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps} must be >= 1 -- or leave it out to run --epochs")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be > 0")
        check_at_least_one(self, "per_device_train_batch_size", "save_steps", "generation_batch_size")
        if self.max_length < 16:
            raise ConfigError(f"--max-length {self.max_length}: too short for a chat example -- use 128 or more")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_r > 0 else 2e-5)


# ----------------------------------------------------------------------------- data


def example(prompt: str | list, answer: str) -> dict[str, Any]:
    """One trl prompt-completion conversational example: loss on the completion (assistant turn) only."""
    from cai.records import as_messages

    return {"prompt": as_messages(prompt), "completion": [{"role": "assistant", "content": answer}]}


def critique_examples(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(examples, rejected): one example per critique record with a non-empty `final` that some round
    revised. A record whose every round kept the previous answer (empty or degenerate revisions) has
    the model's first answer as its `final`, often the compliance the critique was about: training on it
    would teach the opposite of a revision."""
    examples, rejected = [], []
    for record in records:
        if not str(record.get("final", "")).strip():
            rejected.append({"id": record["id"], "source": "critique", "reason": "empty-final"})
            continue
        rounds = record.get("rounds") or []
        if rounds and all(r.get("kept_previous") for r in rounds):
            rejected.append({"id": record["id"], "source": "critique", "reason": "no-revision"})
            continue
        examples.append({"id": record["id"], "source": "critique", **example(record["prompt"], record["final"])})
    return examples, rejected


def helpful_needed(harmless: int, fraction: float) -> int:
    """How many helpful examples make them `fraction` of the mix, given `harmless` revision examples."""
    return round(harmless * fraction / (1.0 - fraction)) if fraction > 0 else 0


def choose_helpful(prompts: list[dict[str, Any]], needed: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of `needed` prompts (all of them when there are fewer), in file order."""
    if needed >= len(prompts):
        return list(prompts)
    keep = set(random.Random(seed).sample(range(len(prompts)), needed))
    return [p for i, p in enumerate(prompts) if i in keep]


def _read_critique_records(path: str) -> list[dict[str, Any]]:
    from cai.records import check_prompt, check_unique_id, read_rows

    path, rows = read_rows(path)  # a JSONL file (`data/...` bundled too) or what `datasets` reads
    records, first_line = [], {}
    for number, row in rows:
        if "prompt" not in row or "final" not in row or "id" not in row:
            raise RecordsError(f"{path}:{number}: a critique record needs `id`, `prompt` and `final` "
                               "-- give the output of `cai critique`")
        check_unique_id(first_line, row["id"], number, f"{path}:{number}")  # else an answer trains twice
        # Checked here, not where the chat template meets them: a null `final` read as the text "None",
        # and a number or a list crashed inside the tokenizer with a traceback.
        if not isinstance(row["final"], str):
            raise RecordsError(f"{path}:{number}: `final` must be text, got {type(row['final']).__name__} "
                               "-- give the output of `cai critique`")
        row["prompt"] = check_prompt(row["prompt"], f"{path}:{number}")
        records.append(row)
    if not records:
        raise RecordsError(f"{path}: no critique records -- the file is empty")
    return records


def answer_helpful(engine, prompts: list[dict[str, Any]], cfg: "SFTConfig", task) -> list[dict[str, Any]]:
    """The starting model's answers (greedy) to `prompts`, as helpful-answer cache records."""
    from cai.engine import Sampling
    from cai.records import as_messages
    from cai.stages.critique import clean_text

    sampling = Sampling(max_new_tokens=cfg.helpful_max_new_tokens, temperature=0.0)
    outputs = engine.generate_chat([as_messages(p["prompt"]) for p in prompts], sampling,
                                   progress=lambda items, tokens: task.advance(items, tokens))
    return [{"id": prompt["id"], "prompt": prompt["prompt"], "answer": clean_text(output.text, "answer", output.finished),
             "finished": output.finished, "model": cfg.model} for prompt, output in zip(prompts, outputs, strict=True)]


def fit_length(examples: list[dict[str, Any]], tokenizer, max_length: int,
               rejected: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(examples that train, how many of them are cut at max_length). An example whose prompt alone fills
    max_length would train on nothing: it goes to `rejected` as prompt-too-long."""
    kept, truncated = [], 0
    for item, (prompt_len, full_len) in zip(examples, prompt_lengths(tokenizer, examples), strict=True):
        if prompt_len >= max_length:
            rejected.append({"id": item["id"], "source": item["source"], "reason": "prompt-too-long"})
            continue
        truncated += full_len > max_length
        kept.append(item)
    return kept, truncated


def prompt_lengths(tokenizer, examples: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(prompt tokens, prompt + answer tokens) of each example under the chat template."""
    lengths = []
    for item in examples:
        prompt = tokenizer.apply_chat_template(item["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(item["prompt"] + item["completion"], tokenize=False)
        lengths.append((len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                        len(tokenizer(full, add_special_tokens=False)["input_ids"])))
    return lengths


# ----------------------------------------------------------------------------- training


def trl_config(cfg: SFTConfig, output_dir: Path, device: str):
    """trl's SFTConfig for this run. Precision comes from the device, never from trl's defaults."""
    from trl import SFTConfig as TrlSFTConfig

    from cai.models import precision_for

    return TrlSFTConfig(
        output_dir=str(output_dir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.per_device_train_batch_size,
        max_length=cfg.max_length, completion_only_loss=True, assistant_only_loss=False, packing=False,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1, logging_steps=1,
        report_to="none", disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
        **precision_for(device).trainer_kwargs(),
    )


def build_trainer(cfg: SFTConfig, model, tokenizer, examples: list[dict[str, Any]], output_dir: Path, device: str):
    """The trl SFTTrainer on these examples (LoRA applied by trl when lora_r > 0)."""
    import datasets
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from cai.models import lora_config

    rows = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
    progress_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # stages draw progress through the reporter only
    try:
        trainer = SFTTrainer(model=model, args=trl_config(cfg, output_dir, device),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=lora_config(cfg.lora_r) if cfg.lora_r > 0 else None)
    finally:
        if progress_bars:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)  # it prints logs to stdout, which carries results only
    return trainer


def report_callback(reporter):
    """A trainer callback that advances a reporter task per step and keeps the logged losses."""
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        def __init__(self):
            self.task = None
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = reporter.task("sft", total=state.max_steps, unit="steps")
            if state.global_step:  # resumed from a checkpoint
                self.task.advance(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.task.advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if self.task:
                self.task.close()

    return ReportCallback()


# ----------------------------------------------------------------------------- stage


def run(cfg: SFTConfig, ctx: StageContext | None = None) -> StageResult:
    from cai.engine import Engine, resolve_backend
    from cai.models import default_device, load_causal_lm, load_tokenizer, save_standalone
    from cai.records import Resume, read_prompts, write_jsonl

    ctx = ctx or StageContext()
    out = Path(cfg.out)
    manifest = Manifest("sft", cfg, ctx.manifest_for(out), outputs=[out], force=cfg.force,
                        inputs={"data": cfg.data, "helpful": cfg.helpful, "model": cfg.model}, scratch=[out / CHECKPOINTS])
    if (done := manifest.previous()) is not None:
        return done
    records = _read_critique_records(cfg.data)
    helpful_prompts = read_prompts(cfg.helpful) if cfg.helpful else []
    resuming = manifest.start()
    started = time.time()
    device = ctx.device or default_device()

    examples, rejected = critique_examples(records)
    if not examples:
        reasons = sorted({item["reason"] for item in rejected})
        raise RecordsError(f"{cfg.data}: no record has a revised `final` ({', '.join(reasons)}) -- nothing to "
                           "train on; rerun `cai critique` with a model that can revise")
    # On vLLM the helpful answers come first, from its own copy of the model; the model to train loads
    # after it is closed, so the two never compete for GPU memory.
    on_vllm = resolve_backend(cfg.backend, device) == "vllm"
    model, tokenizer = (None, load_tokenizer(cfg.model)) if on_vllm else load_causal_lm(cfg.model, quantize=cfg.quantize,
                                                                                         device=device)
    # Lengths first: the helpful share is sized on the revisions that will train.
    kept, truncated = fit_length(examples, tokenizer, cfg.max_length, rejected)
    if not kept:
        write_jsonl(out / REJECTED, rejected)
        raise RecordsError(f"every example was left out (see {out / REJECTED}) -- raise --max-length")

    # Helpful answers from the starting model, before any adapter touches it. An answer left out (empty, or
    # past --max-length) is replaced by one to another prompt, while there are prompts, so the mix keeps
    # its fraction; the replacements come from the prompts not drawn, in a seeded order.
    needed = helpful_needed(len(kept), cfg.helpful_fraction)
    chosen = choose_helpful(helpful_prompts, needed, cfg.seed)
    drawn = {prompt["id"] for prompt in chosen}
    spare = [prompt for prompt in helpful_prompts if prompt["id"] not in drawn]
    random.Random(cfg.seed).shuffle(spare)
    batch, answered, helpful = chosen, 0, []
    if chosen:
        engine = (Engine.from_reference(cfg.model, batch_size=cfg.generation_batch_size, device=device, options=cfg)
                  if on_vllm else Engine(model, tokenizer, batch_size=cfg.generation_batch_size))
        with Resume(out / HELPFUL_CACHE, [], cfg.generation_batch_size) as cache:  # read once for every round
            while batch:
                cache.add(batch)
                task = ctx.reporter.task("helpful answers" + (" (replacing those left out)" if answered else ""),
                                         total=len(batch), unit="prompts")
                for chunk in cache:
                    cache.write(answer_helpful(engine, chunk, cfg, task))
                task.close()
                answered += len(batch)
                new = []
                for prompt in batch:
                    answer = cache.by_id[str(prompt["id"])]["answer"]
                    if answer.strip():
                        new.append({"id": prompt["id"], "source": "helpful", **example(prompt["prompt"], answer)})
                    else:
                        rejected.append({"id": prompt["id"], "source": "helpful", "reason": "empty-helpful-answer"})
                new, new_truncated = fit_length(new, tokenizer, cfg.max_length, rejected)
                helpful, truncated = helpful + new, truncated + new_truncated
                batch, spare = spare[:needed - len(helpful)], spare[needed - len(helpful):]
        engine.close()
    kept = kept + helpful
    if model is None:
        model, tokenizer = load_causal_lm(cfg.model, quantize=cfg.quantize, device=device)
    if rejected:
        write_jsonl(out / REJECTED, rejected)

    checkpoints = out / CHECKPOINTS
    trainer = build_trainer(cfg, model, tokenizer, kept, checkpoints, device)
    callback = report_callback(ctx.reporter)
    trainer.add_callback(callback)
    last = last_checkpoint(checkpoints)
    if last:
        ctx.reporter.log(f"resuming training from {last}")
    elif resuming:
        ctx.reporter.log("resuming: earlier run left no checkpoint; training from the start")
    result = train_or_resume(trainer, last, ctx.reporter.log)
    save_standalone(trainer.model, tokenizer, out, base_reference=cfg.model)  # checkpoints go with complete()

    seconds = time.time() - started
    steps = int(trainer.state.global_step)
    # The trainer state's log history, not this process's callback: a resumed run restores the steps
    # logged before the interruption, so the summary covers the whole training either way.
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h] or callback.losses
    mean_loss = sum(losses) / len(losses) if losses else float(result.training_loss if result else "nan")
    dropped = {}
    for item in rejected:
        dropped[item["reason"]] = dropped.get(item["reason"], 0) + 1
    counts = {"examples": len(kept), "harmless": sum(e["source"] == "critique" for e in kept),
              "helpful": sum(e["source"] == "helpful" for e in kept), "helpful_answered": answered,
              "truncated": truncated, "rejected": len(rejected), "steps": steps,
              **{f"rejected/{k}": v for k, v in sorted(dropped.items())}}
    metrics = {"train_loss": mean_loss, "first_loss": losses[0] if losses else None,
               "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
               "helpful_fraction_actual": counts["helpful"] / len(kept), "learning_rate": cfg.learning_rate}
    loss_text = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else f"loss {mean_loss:.3f}"
    summary = (f"{len(kept)} examples ({counts['harmless']} revisions + {counts['helpful']} helpful), "
               f"{steps} steps, {loss_text} (mean {mean_loss:.3f}), {seconds:.0f} s"
               + (f"; {len(rejected)} left out ({', '.join(f'{v} {k}' for k, v in sorted(dropped.items()))})"
                  if rejected else "") + (f"; {truncated} answers cut at {cfg.max_length} tokens" if truncated else ""))
    outputs = {"model": out}
    if rejected:
        outputs["rejected"] = out / REJECTED
    return manifest.complete(outputs=outputs, counts=counts, summary=summary, metrics=metrics)
