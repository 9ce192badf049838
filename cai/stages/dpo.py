"""Offline path: DPO on the mixed human/AI preferences, as an alternative to PM + RL.

    cai dpo --model runs/x/2-sft/model --ai runs/x/3-feedback/prefs.jsonl \\
            --human data/helpful_prefs_example.jsonl --out runs/x/5-dpo/model --soft-labels

- The pairs are prepared exactly as `cai pm train` prepares them, with its own functions: pairs with
  identical answers dropped (`partition_trainable`), `eval_fraction` of each side held out
  (`split_heldout`), the rest mixed by `records.mix_preferences`. The same files, fractions and seed
  give both paths the same training mix and the same held-out pairs, on which the DPO model's implicit
  reward accuracy is reported beside the PM's. One difference: without `--soft-labels`, training pairs
  labelled exactly 0.5 are dropped too (`without_ties`): a hard label would pick their winner at random.
- The reference model is the starting policy. With LoRA (the default) trl's DPOTrainer gets the LoRA
  config, and its reference log-probs come from the same model with the adapter disabled: no second
  copy in memory. With full fine-tuning (`--lora-r 0`) the reference log-probs are computed once,
  before the first step (trl's `precompute_ref_log_probs`), so no copy is kept there either, unless
  the run is shorter than one pass over the pairs (then trl keeps a frozen copy: cheaper than scoring
  pairs that are never trained on).
- `--soft-labels` trains on each pair's `p_chosen` (the judge's confidence) instead of treating every
  pair as certain: the per-pair loss is the cross-entropy against the soft label (`soft_dpo_loss`),
  which is conservative DPO (Mitchell 2023) with label smoothing 1 - p per pair. trl's
  `label_smoothing` is one number for the whole run, so `CaiDPOTrainer` carries `p_chosen` through the
  collator and replaces only the loss of the sigmoid and IPO cases; everything else is trl's. `--loss-type
  robust` is trl's robust DPO with one label-noise rate, the mean of 1 - p_chosen.
- Checkpoints go to `DIR/checkpoints` and a re-run resumes from the last one; the final model is a
  standalone merged directory (`from_pretrained(DIR)`, the adapter kept in `DIR/adapter`), and the
  checkpoints are removed once it is saved.

Torch, transformers and trl are imported inside functions: the CLI imports this module for its option
help, and `import cai.cli` must stay light.
"""

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import records
from cai.errors import ConfigError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, QUANTIZE_CHOICES
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_directory_out,
    last_checkpoint,
    train_or_resume,
)

# The PM stage's data preparation, shared so both paths train on the same pairs (pm.py imports no torch).
from cai.stages.pm import (
    AI_SOURCE,
    HUMAN_SOURCE,
    PAPER_HUMAN_FRACTION,
    partition_trainable,
    split_heldout,
    without_ties,
)

LOSSES = ("sigmoid", "ipo", "robust")  # --loss-type choices; each is the trl loss_type of the same name
LORA_LR = 5e-5  # default learning rate with LoRA/QLoRA adapters
FULL_LR = 1e-6  # default learning rate for full fine-tuning (trl's DPOConfig default)
MAX_ROBUST_SMOOTHING = 0.49  # trl's robust loss divides by 1 - 2 * epsilon: keep epsilon below 0.5


@dataclass
class DPOConfig:
    """`cai dpo`: one field per option; recipes use the same names as keys."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Starting policy (usually the SL-CAI model): embedded:NAME, a hub id or a local directory. "
                "It is also the DPO reference model."})
    ai: str | None = field(default=None, metadata={
        "help": "AI preference records (JSONL from `cai feedback`: prompt, chosen, rejected, p_chosen, source). "
                "Required."})
    out: str = field(default="", metadata={
        "hash": False,
        "help": "Output directory: a standalone merged model (`from_pretrained(DIR)` loads it), the adapter "
                "in DIR/adapter, checkpoints in DIR/checkpoints while training, manifest.json. Required."})
    human: str | None = field(default=None, metadata={
        "help": "Human helpfulness comparisons in any accepted preference format (hh-rlhf transcripts, trl "
                "conversational, cai records). Left out: train on the AI records alone."})
    human_fraction: float = field(default=PAPER_HUMAN_FRACTION, metadata={
        "help": f"Share of human comparisons in the training mix, in [0, 1]; the smaller side is repeated "
                f"(seeded) when too small. Default {PAPER_HUMAN_FRACTION}, the CAI paper's ratio (135,296 human "
                "helpfulness to 182,831 AI harmlessness comparisons). The same mixing as `cai pm train`."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of each side (AI, human) held out, 0-0.5, chosen as `cai pm train` chooses it (the same "
                "pairs for the same files and seed); the DPO model's implicit-reward accuracy on them is "
                "reported per side. 0: no held-out pairs."})
    beta: float = field(default=0.1, metadata={
        "help": "DPO beta: strength of the implicit KL penalty to the reference (> 0; higher stays closer). "
                "0.1 is trl's default."})
    loss_type: str = field(default="sigmoid", metadata={"choices": LOSSES,
        "help": "DPO loss: sigmoid (Rafailov et al. 2023), ipo (squared loss, length-normalised as in trl) or "
                "robust (label-noise corrected, with the noise rate taken as the mean of 1 - p_chosen)."})
    soft_labels: bool = field(default=False, metadata={
        "help": "Train on each pair's p_chosen instead of treating every pair as certain: per-pair label "
                "smoothing 1 - p (conservative DPO). Works with --loss-type sigmoid and ipo; p = 1 is the ordinary "
                "loss, p = 0.5 pulls toward no preference."})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "4bit: load the policy in NF4 and train LoRA adapters (QLoRA). Left out (or none): full precision."})
    lora_r: int = field(default=16, metadata={
        "help": "LoRA rank (alpha = 2r, every linear layer); the reference is the adapter-disabled model. "
                "0: full fine-tuning (reference log-probs precomputed for runs of at least one pass, else a "
                "frozen copy of the policy)."})
    epochs: int = field(default=1, metadata={
        "help": "Passes over the training mix (ignored when max_steps is set)."})
    lr: float | None = field(default=None, metadata={
        "help": f"Learning rate (AdamW, linear decay). Left out: {LORA_LR:g} with LoRA/QLoRA, {FULL_LR:g} (trl's "
                "default) for full fine-tuning."})
    max_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps to train; left out: train for --epochs passes."})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per sequence (prompt + answer, chat template included). Longer answers are cut at the "
                "end; pairs whose prompt alone fills it are dropped to DIR/dropped.jsonl."})
    per_device_train_batch_size: int = field(default=4, metadata={
        "help": "Preference pairs per optimizer step on each device (each pair is two sequences)."})
    save_steps: int = field(default=50, metadata={
        "hash": False,
        "help": "Save a checkpoint to DIR/checkpoints every this many steps (a re-run resumes from the last)."})
    seed: int = field(default=0, metadata={
        "help": "Seed for the human/AI mix, data order and adapter initialisation."})
    force: bool = field(default=False, metadata={
        "hash": False,
        "help": "Discard an existing output made with a different config or inputs, and start over."})

    def __post_init__(self):
        check_directory_out(self.out, "dpo", "dpo-model")
        if self.quantize == "none":
            self.quantize = None
        if self.quantize not in (None, "4bit"):
            raise ConfigError(f"--quantize {self.quantize!r} is not supported -- use 4bit or none")
        if self.loss_type not in LOSSES:
            raise ConfigError(f"--loss-type {self.loss_type!r} is not a DPO loss cai offers -- use one of: {', '.join(LOSSES)}")
        if self.soft_labels and self.loss_type == "robust":
            raise ConfigError("--soft-labels with --loss-type robust: robust DPO already corrects for label noise "
                              "with one rate for all pairs (the mean of 1 - p_chosen) -- use --loss-type sigmoid (or "
                              "ipo) with --soft-labels for per-pair confidences, or drop --soft-labels")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r {self.lora_r} -- use a rank >= 1 for LoRA, or 0 for full fine-tuning")
        if self.quantize == "4bit" and self.lora_r == 0:
            raise ConfigError("--quantize 4bit with --lora-r 0: 4-bit weights cannot be trained directly -- "
                              "use --lora-r 16 (QLoRA), or drop --quantize for full fine-tuning")
        if not 0.0 <= self.human_fraction <= 1.0:
            raise ConfigError(f"--human-fraction {self.human_fraction} -- use a share in [0, 1] "
                              f"(the paper's is {PAPER_HUMAN_FRACTION})")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"--eval-fraction {self.eval_fraction} -- use a share in [0, 0.5] (0: hold out nothing)")
        if self.beta <= 0:
            raise ConfigError(f"--beta {self.beta} -- DPO's beta must be > 0 (trl's default is 0.1)")
        check_at_least_one(self, "epochs", "per_device_train_batch_size", "save_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps} must be >= 1 -- or leave it out to train for "
                              f"{self.epochs} epoch(s)")
        if self.max_length < 16:
            raise ConfigError(f"--max-length {self.max_length} is too short for a prompt and an answer -- use 256 or more")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} -- use a positive learning rate, or leave --lr out for the default")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.lora_r > 0 else FULL_LR


# ----------------------------------------------------------------------------- losses (pure)


def soft_dpo_loss(chosen_logratios, rejected_logratios, p_chosen, beta: float):
    """Per-pair DPO loss against a soft label: cross-entropy between the label (p, 1 - p) and the
    preference the policy implies, sigmoid(beta * h), where h = chosen_logratios - rejected_logratios:

        loss_i = -p_i log sigmoid(beta h_i) - (1 - p_i) log sigmoid(-beta h_i)

    p = 1 is DPO's sigmoid loss. p = 0.5 is symmetric in chosen and rejected, its minimum and zero
    gradient are at h = 0 (the reference's own preference): the pair pushes toward neither answer.
    This is label smoothing with epsilon_i = 1 - p_i (conservative DPO, Mitchell 2023).

    chosen_logratios, rejected_logratios: (B,) log pi(y|x) - log pi_ref(y|x), summed over answer tokens.
    p_chosen: (B,) in [0, 1]. Returns (B,).
    """
    import torch.nn.functional as F

    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    return -p_chosen * F.logsigmoid(logits) - (1.0 - p_chosen) * F.logsigmoid(-logits)  # (B,)


def soft_ipo_loss(chosen_scores, rejected_scores, p_chosen, beta: float):
    """Per-pair IPO loss against a soft label. IPO regresses the margin onto a target; with a label that
    is right with probability p, the expected loss p (d - 1/(2 beta))^2 + (1 - p) (d + 1/(2 beta))^2 is,
    up to a constant, the regression onto the target (2p - 1) / (2 beta):

        loss_i = (d_i - (2 p_i - 1) / (2 beta))^2,   d_i = chosen_scores_i - rejected_scores_i

    p = 1 is trl's IPO loss; p = 0.5 targets d = 0 (no preference).
    chosen_scores, rejected_scores: (B,) log-ratios divided by the answer's token count (as trl does).
    p_chosen: (B,). Returns (B,).
    """
    margin = chosen_scores - rejected_scores  # (B,)
    return (margin - (2.0 * p_chosen - 1.0) / (2.0 * beta)) ** 2  # (B,)


def robust_label_noise(p_chosen: list[float]) -> float:
    """The label-noise rate robust DPO assumes for the whole run: the mean probability that a pair's
    label is flipped, 1 - p_chosen, kept below 0.5 (trl's robust loss divides by 1 - 2 epsilon)."""
    if not p_chosen:
        return 0.0
    return min(MAX_ROBUST_SMOOTHING, max(0.0, sum(1.0 - p for p in p_chosen) / len(p_chosen)))


# ----------------------------------------------------------------------------- data


@dataclass
class PreparedPairs:
    """What `prepare_pairs` made of the input files."""

    mix: records.PreferenceMix  # the training mix
    heldout_ai: list[dict[str, Any]]
    heldout_human: list[dict[str, Any]]
    dropped: list[dict[str, Any]]  # pairs that cannot teach anything, each with a `reason`
    ai_available: int  # records in the files
    human_available: int


def prepare_pairs(cfg: DPOConfig) -> PreparedPairs:
    """The pairs exactly as `cai pm train` prepares them, with its functions: read, drop identical
    answers, hold out `eval_fraction` of each side, mix the rest with `records.mix_preferences`."""
    ai_all = records.read_preferences(cfg.ai, default_source=AI_SOURCE)
    human_all = records.read_preferences(cfg.human, default_source=HUMAN_SOURCE) if cfg.human else []
    ai_usable, ai_dropped = partition_trainable(ai_all)
    human_usable, human_dropped = partition_trainable(human_all)
    ai_train, heldout_ai = split_heldout(ai_usable, cfg.eval_fraction, cfg.seed)
    human_train, heldout_human = split_heldout(human_usable, cfg.eval_fraction, cfg.seed)
    if not cfg.soft_labels:  # after the split, so the held-out pairs stay the PM's
        ai_train, ai_ties = without_ties(ai_train)
        human_train, human_ties = without_ties(human_train)
        ai_dropped, human_dropped = ai_dropped + ai_ties, human_dropped + human_ties
    if not ai_train and not human_train:
        raise ConfigError(f"{cfg.ai}: no pair left to train on after holding out {cfg.eval_fraction:.0%} and "
                          f"dropping {len(ai_dropped) + len(human_dropped)} -- give more pairs or lower --eval-fraction")
    mix = records.mix_preferences(ai_train, human_train, cfg.human_fraction, cfg.seed)
    return PreparedPairs(mix, heldout_ai, heldout_human, ai_dropped + human_dropped, len(ai_all), len(human_all))


def to_trl_example(record: dict[str, Any]) -> dict[str, Any]:
    """A preference record -> trl's conversational preference format, plus the soft label, oriented so
    that `chosen` is the answer the label prefers (p_chosen >= 0.5). A record may say p_chosen = 0.2: trl's
    hard-label losses and its reward accuracy take `chosen` as the winner, and the soft losses give the
    same value either way round."""
    chosen, rejected, p_chosen = record["chosen"], record["rejected"], float(record["p_chosen"])
    if p_chosen < 0.5:
        chosen, rejected, p_chosen = rejected, chosen, 1.0 - p_chosen
    return {
        "prompt": records.as_messages(record["prompt"]),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p_chosen,
    }


def screen_pairs(pairs: list[dict[str, Any]], tokenizer, max_length: int):
    """Turn pairs into trl examples, dropping those whose prompt alone fills `max_length` (no answer token
    would be left; trl would drop them silently) with the reason `prompt-too-long`, and counting the kept
    pairs whose longer answer will be cut at `max_length`. Returns (examples, dropped, truncated)."""

    def length(messages, add_generation_prompt=False) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt)["input_ids"])

    kept, dropped, truncated = [], [], 0
    for record in pairs:
        example = to_trl_example(record)
        prompt_tokens = length(example["prompt"], add_generation_prompt=True)
        if prompt_tokens >= max_length:
            dropped.append({**record, "reason": "prompt-too-long", "prompt_tokens": prompt_tokens})
            continue
        longest = max(length(example["prompt"] + example["chosen"]), length(example["prompt"] + example["rejected"]))
        truncated += longest > max_length
        kept.append(example)
    return kept, dropped, truncated


# ----------------------------------------------------------------------------- trainer

# Batch keys that are not model inputs (trl's own list, plus the soft label).
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "p_chosen"}


@functools.cache
def _trl_classes():
    """(trainer class, collator class, progress callback class), built on first use so that importing
    this module loads neither torch nor trl."""
    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        """trl's preference collator, also carrying each pair's `p_chosen` as a (B,) tensor."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch["p_chosen"] = torch.tensor([float(e.get("p_chosen", 1.0)) for e in examples], dtype=torch.float32)
            return batch

    class CaiDPOTrainer(DPOTrainer):
        """trl's DPOTrainer, with soft labels for the sigmoid and IPO losses.

        Without soft labels every loss is trl's own (`p_chosen` is removed from the batch first). With
        them, `_compute_loss` does the policy forward as trl does, gets the reference log-probs from trl
        (`compute_ref_log_probs`: adapter disabled, or precomputed), and applies `soft_dpo_loss` /
        `soft_ipo_loss`. It also counts the tokens it trains on (`tokens_seen`), for throughput.
        """

        def __init__(self, *args, soft_labels: bool = False, **kwargs):
            self.soft_labels = soft_labels
            self.tokens_seen = 0
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "p_chosen"})

        def _compute_loss(self, model, inputs, return_outputs):
            inputs = dict(inputs)
            p_chosen = inputs.pop("p_chosen", None)
            if self.model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            if not self.soft_labels or p_chosen is None:
                return super()._compute_loss(model, inputs, return_outputs)
            loss = self._soft_label_loss(model, inputs, p_chosen)
            return (loss, None) if return_outputs else loss

        def _soft_label_loss(self, model, inputs, p_chosen):
            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]  # (2B, T): chosen rows, then rejected rows
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)  # (2B, T)
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
            seq_len = completion_mask.size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1)  # (2B,): answer tokens (others are 0)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # (B,) each
            if "ref_chosen_logps" in inputs:
                ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                reference = self.ref_model if self.ref_model is not None else model
                ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(reference, inputs)
            chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
            rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
            p = p_chosen.to(chosen_logratios.device, chosen_logratios.dtype)  # (B,)
            if self.loss_types == ["ipo"]:
                chosen_len, rejected_len = completion_mask.sum(dim=1).clamp(min=1).chunk(2, dim=0)  # (B,) each
                per_pair = soft_ipo_loss(chosen_logratios / chosen_len, rejected_logratios / rejected_len, p,
                                         self.beta)
            else:
                per_pair = soft_dpo_loss(chosen_logratios, rejected_logratios, p, self.beta)
            loss = per_pair.mean()

            with torch.no_grad():
                gather = self.accelerator.gather_for_metrics
                chosen_rewards = self.beta * chosen_logratios.detach()  # (B,)
                rejected_rewards = self.beta * rejected_logratios.detach()  # (B,)
                metrics = self._metrics[mode]
                metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
                metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
                metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
                metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
                metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
                metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
                metrics["p_chosen"].append(gather(p).mean().item())
                if mode == "train":
                    self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum().item())
                metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    class ReporterProgress(TrainerCallback):
        """Advances a cai reporter task each optimizer step, with the tokens trained on."""

        def __init__(self, reporter):
            self.reporter, self.trainer, self.task, self.tokens = reporter, None, None, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = self.reporter.task("dpo", total=state.max_steps, unit="steps")
            if state.global_step:
                self.task.advance(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            seen = self.trainer.tokens_seen if self.trainer is not None else 0
            self.task.advance(1, seen - self.tokens)
            self.tokens = seen

        def on_train_end(self, args, state, control, **kwargs):
            self.task.close()

    return CaiDPOTrainer, SoftLabelCollator, ReporterProgress


def precompute_reference(cfg: DPOConfig, pairs: int) -> bool:
    """Whether to compute the reference log-probs of every pair once before training instead of keeping a
    reference copy of the model: for full fine-tuning (LoRA needs neither: it disables the adapter) when
    the run makes at least one pass over the pairs, so no forward pass is wasted on pairs never trained on."""
    return cfg.lora_r == 0 and (cfg.max_steps is None or cfg.max_steps * cfg.per_device_train_batch_size >= pairs)


def build_trainer(cfg: DPOConfig, model, tokenizer, examples: list[dict[str, Any]], output_dir: Path,
                  device: str, label_smoothing: float = 0.0, callbacks=(),
                  heldout: dict[str, list[dict[str, Any]]] | None = None):
    """The DPO trainer for these examples: LoRA (reference = adapter disabled) or full fine-tuning
    (reference log-probs precomputed), device-aware precision, checkpoints in `output_dir`. `heldout`
    (name -> examples) is evaluated by `trainer.evaluate()`; it is given here, not later, because trl
    precomputes its reference log-probs with the training set's."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import DPOConfig as TrlDPOConfig

    from cai.models import lora_config, precision_for

    trainer_class, collator_class, _ = _trl_classes()
    args = TrlDPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=label_smoothing,
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=precompute_reference(cfg, len(examples)),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        # trl logs the mean of its per-batch means: one pair a batch makes the held-out accuracy a share
        # of pairs (a short last batch would otherwise weigh as much as a full one).
        per_device_eval_batch_size=1,
        precompute_ref_batch_size=cfg.per_device_train_batch_size,  # else it follows the eval batch size
        eval_strategy="no",  # evaluated once, after training
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        **precision_for(device).trainer_kwargs(),  # fp32 and no checkpointing on CPU (trl defaults to bf16)
    )
    collator = collator_class(pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length,
                              truncation_mode="keep_start", pad_to_multiple_of=args.pad_to_multiple_of)
    peft_config = lora_config(cfg.lora_r) if cfg.lora_r > 0 else None
    eval_sets = {name: Dataset.from_list(rows) for name, rows in (heldout or {}).items() if rows} or None
    trainer = trainer_class(model=model, ref_model=None, args=args, data_collator=collator,
                            train_dataset=Dataset.from_list(examples), eval_dataset=eval_sets,
                            processing_class=tokenizer,
                            peft_config=peft_config, soft_labels=cfg.soft_labels, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; stdout carries results only
    trainer.remove_callback(ProgressCallback)
    return trainer


def evaluate_heldout(trainer) -> dict[str, dict[str, float]]:
    """Implicit-reward metrics on each held-out set (name -> trl's eval metrics: `eval_rewards/accuracies`,
    `eval_rewards/margins`, ...). trl logs those metrics rather than returning them, so each set is
    evaluated alone and its log entry read back."""
    results = {}
    for name in trainer.eval_dataset or {}:
        trainer.evaluate(eval_dataset=name, metric_key_prefix=f"eval_{name}")
        results[name] = dict(trainer.state.log_history[-1])
    return results


def _last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


# ----------------------------------------------------------------------------- run


def run(cfg: DPOConfig, ctx: StageContext) -> StageResult:
    if not cfg.ai:
        raise ConfigError("dpo needs the AI preference records -- pass --ai F.jsonl (the output of `cai feedback`)")
    if not cfg.out:
        raise ConfigError("dpo needs an output directory -- pass --out DIR")
    out = Path(cfg.out)
    manifest = Manifest("dpo", cfg, ctx.manifest_for(out), inputs={"policy": cfg.model, "ai": cfg.ai, "human": cfg.human},
                        outputs=[out], force=cfg.force, scratch=[out / "checkpoints"])
    if (done := manifest.previous()) is not None:
        return done
    resuming = manifest.start()

    from datasets.utils.logging import disable_progress_bar

    from cai.models import default_device, load_causal_lm, save_standalone

    device = ctx.device or default_device()
    disable_progress_bar()  # datasets' map bars; the reporter shows training progress
    pairs = prepare_pairs(cfg)
    mix = pairs.mix
    ctx.reporter.log(f"dpo: training mix: {mix.summary()}; held out {len(pairs.heldout_ai)} AI + "
                     f"{len(pairs.heldout_human)} human")
    model, tokenizer = load_causal_lm(cfg.model, quantize=cfg.quantize, device=device)
    examples, too_long, truncated = screen_pairs(mix.records, tokenizer, cfg.max_length)
    heldout = {}
    for name, side in (("ai", pairs.heldout_ai), ("human", pairs.heldout_human)):
        # A pair labelled 0.5 has no winner to get right; the PM leaves it out of its accuracy too.
        heldout[name], side_too_long, _ = screen_pairs(without_ties(side)[0], tokenizer, cfg.max_length)
        too_long += side_too_long
    dropped = pairs.dropped + too_long
    if dropped:
        records.write_jsonl(out / "dropped.jsonl", dropped)
        ctx.reporter.log(f"dpo: dropped {len(dropped)} pairs (see {out / 'dropped.jsonl'})")
    if not examples:
        raise ConfigError(f"no preference pair is left to train on ({len(dropped)} dropped, see "
                          f"{out / 'dropped.jsonl'}) -- raise --max-length or check the input files")
    if truncated:
        ctx.reporter.log(f"dpo: {truncated} pairs have an answer longer than --max-length {cfg.max_length}; "
                         "its end is cut")
    label_smoothing = robust_label_noise([e["p_chosen"] for e in examples]) if cfg.loss_type == "robust" else 0.0
    if cfg.loss_type == "robust":
        ctx.reporter.log(f"dpo: robust loss with label-noise rate {label_smoothing:.3f} (mean of 1 - p_chosen)")

    checkpoints = out / "checkpoints"
    resume_from = last_checkpoint(checkpoints) if resuming else None
    if resume_from:
        ctx.reporter.log(f"dpo: resuming from {resume_from}")
    progress = _trl_classes()[2](ctx.reporter)
    trainer = build_trainer(cfg, model, tokenizer, examples, checkpoints, device, label_smoothing, [progress],
                            heldout=heldout)
    progress.trainer = trainer
    if cfg.lora_r > 0:
        reference = "the starting policy with the adapter disabled (no second copy)"
    elif precompute_reference(cfg, len(examples)):
        reference = "the starting policy's log-probs, computed once before training (no second copy)"
    else:
        reference = "a frozen copy of the starting policy (fewer steps than pairs: cheaper than precomputing)"
    ctx.reporter.log(f"dpo: reference model = {reference}")
    started = time.perf_counter()
    train_or_resume(trainer, resume_from, ctx.reporter.log)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate_heldout(trainer)

    save_standalone(trainer.model, tokenizer, out, base_reference=cfg.model)
    history = trainer.state.log_history
    records.write_jsonl(out / "metrics.jsonl", history)  # the checkpoints go with complete()

    counts = {
        "ai_available": pairs.ai_available, "human_available": pairs.human_available, "ai_used": mix.ai_used,
        "human_used": mix.human_used, "ai_heldout": len(heldout["ai"]), "human_heldout": len(heldout["human"]),
        "pairs_trained": len(examples), "dropped": len(dropped), "truncated": truncated,
        "steps": trainer.state.global_step,
        "resumed_from_step": int(Path(resume_from).name.rsplit("-", 1)[-1]) if resume_from else 0,
        "tokens": trainer.tokens_seen,  # trained on in this session (after a resume: since the resume)
    }
    metrics = {
        "loss": _last_logged(history, "loss"),
        "reward_margin": _last_logged(history, "rewards/margins"),
        "reward_accuracy": _last_logged(history, "rewards/accuracies"),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(trainer.tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "label_smoothing": label_smoothing,
    }
    for side in ("ai", "human"):  # the names `cai pm train` uses for its held-out accuracy
        metrics[f"heldout_accuracy_{side}"] = evaluation.get(side, {}).get("eval_rewards/accuracies")
        metrics[f"heldout_margin_{side}"] = evaluation.get(side, {}).get("eval_rewards/margins")
    summary = (f"{counts['steps']} steps on {mix.summary()}"
               f"{f', {len(dropped)} dropped' if dropped else ''}; loss {cfg.loss_type}"
               f"{' with soft labels' if cfg.soft_labels else ''}")
    accuracies = [f"{name} {metrics[f'heldout_accuracy_{side}']:.0%} of {counts[f'{side}_heldout']}"
                  for side, name in (("ai", "AI"), ("human", "human"))
                  if metrics[f"heldout_accuracy_{side}"] is not None]
    if accuracies:
        summary += "; held-out implicit-reward accuracy: " + ", ".join(accuracies)
    return manifest.complete(outputs={"model": out}, counts=counts, summary=f"{summary} -> {out}", metrics=metrics)
