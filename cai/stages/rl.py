"""Stage 4: RL. Optimise the policy (the SL-CAI model) against the preference model with trl's GRPO or
RLOO, a KL penalty to the starting policy, and optional verifiable rewards.

    cai rl --model runs/x/2-sft/model --pm runs/x/4-pm/model \\
        --prompts data/red_team_prompts.jsonl --prompts data/helpful_prompts.jsonl --out runs/x/5-rl

Writes `OUT/model/` (a standalone merged model), `OUT/metrics.jsonl` (one record a step: rewards, KL,
response length, the hacking monitors, time spent generating) and `OUT/manifest.json`. Checkpoints go
to `OUT/checkpoints/` every `save_steps` steps; an interrupted run resumes from the last one when
run again with the same options, and they are removed once the model is saved.

Each step samples `prompts_per_step` prompts, `num_generations` answers each, scores them with the
combined reward (`cai.rewards.CombinedReward`), and takes one optimiser step. The KL coefficient is
always set from `beta` (default 0.05 for both algorithms): trl's GRPO default is 0, no KL at all, which
this stage never inherits silently. With LoRA the reference is the base with the adapter disabled.
"""

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.engine import EngineOptions
from cai.errors import ConfigError, RecordsError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, QUANTIZE_CHOICES
from cai.rewards import REWARD_NAMES, Thresholds, hacking_warnings, parse_reward_spec, slope
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_directory_out,
    check_limit,
    last_checkpoint,
    none_as_missing,
    train_or_resume,
)

ALGOS = ("grpo", "rloo")


@dataclass
class RLConfig(EngineOptions):
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "Prompt files (JSONL, CSV or .txt, in any format cai reads), mixed into one training set: give "
                "red-team and helpful prompts (the paper trained RL on both). Records with `answer` or `tests` "
                "feed the math and code rewards."})
    out: str = field(default="", metadata={
        "help": "Output directory: model/ (standalone), metrics.jsonl, manifest.json, checkpoints/ while running.",
        "hash": False})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Starting policy (the SL model): embedded:NAME, a hub id or a local directory. Also the KL reference."})
    pm: str | None = field(default=None, metadata={
        "help": "Preference model directory (`cai pm train --out`). Needed by the pm reward. Left out (or none): no PM."})
    algo: str = field(default="grpo", metadata={"choices": ALGOS, "help": "RL algorithm: grpo or rloo (trl's trainers)."})
    beta: float = field(default=0.05, metadata={
        "help": "KL penalty coefficient against the starting policy, for both algorithms. 0 turns the KL "
                "penalty off (only when you ask for it)."})
    reward: list[str] = field(default_factory=lambda: ["pm:1"], metadata={
        "help": "Rewards as NAME:WEIGHT, summed with their weights; NAME is one of "
                f"{', '.join(REWARD_NAMES)}. Each works alone (e.g. math:1 code:1 without a PM)."})
    num_generations: int = field(default=4, metadata={
        "help": "Answers sampled per prompt (the group GRPO/RLOO compare against each other); at least 2."})
    prompts_per_step: int = field(default=2, metadata={
        "help": "Prompts per optimiser step; a step trains on prompts_per_step x num_generations answers."})
    max_steps: int = field(default=10, metadata={"help": "Optimiser steps to train for."})
    lr: float | None = field(default=None, metadata={
        "help": "Learning rate. Left out: 2e-5 with LoRA, 1e-6 for full fine-tuning (--lora-r 0)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated at most per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for the answers (> 0)."})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_CHOICES,
        "help": "4bit: load the policy in 4-bit NF4 and train LoRA adapters (QLoRA). Left out (or none): full precision."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = full fine-tuning (not with --quantize 4bit)."})
    limit: int | None = field(default=None, metadata={"help": "Read at most this many prompts from each file (left out: all)."})
    length_target: int | None = field(default=None, metadata={
        "help": "Tokens after which the length reward starts to penalise. Left out: 3/4 of --max-new-tokens."})
    code_timeout: float = field(default=5.0, metadata={
        "help": "Seconds (wall clock) a code answer and its tests may run before scoring 0."})
    code_memory_mb: int = field(default=512, metadata={"help": "Address-space limit of a code run, in MiB."})
    unsafe_run_code: bool = field(default=False, metadata={
        "help": "Where bubblewrap cannot run, run code answers with NO isolation instead of refusing: the "
                "model's code gets this user's files, network and processes. Only on a throwaway machine; "
                "see docs/sandbox.md.", "hash": False})
    judge: str | None = field(default=None, metadata={
        "help": "Model for the held-back contrast judge that watches for PM hacking (never a reward). "
                "Left out: the starting policy; none: no judge monitor."})
    constitution: str = field(default="default", metadata={
        "help": "Constitution whose judge principles the held-back judge uses (path or bundled name)."})
    judge_every: int = field(default=1, metadata={
        "help": "Run the held-back judge on every Nth step's answers (costs two scoring passes per answer)."})
    save_steps: int = field(default=5, metadata={
        "help": "Save a resumable checkpoint every this many steps.", "hash": False})
    pm_batch_size: int = field(default=16, metadata={"help": "PM scoring batch size.", "hash": False})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, prompt order and adapter init."})
    force: bool = field(default=False, metadata={
        "help": "Discard an earlier run in OUT made with other options and start over.", "hash": False})
    # Rollouts on vLLM (trl's integration): on CUDA when vLLM is installed (--backend auto or vllm)
    gpu_memory_utilization: float = field(default=0.3, metadata={
        "hash": False, "help": "vLLM: share of the GPU's memory vLLM takes beside training (colocate mode; "
                               "the held-back judge takes as much again when it runs on vLLM)."})
    vllm_mode: str = field(default="colocate", metadata={
        "hash": False, "help": "Rollouts on vLLM: colocate (vLLM in the training process, sharing its GPU) or "
                               "server (a separate `trl vllm-serve --model POLICY` on other GPUs; see "
                               "docs/engines.md)."})
    vllm_server_base_url: str | None = field(default=None, metadata={
        "hash": False, "help": "server mode: the URL of `trl vllm-serve` (left out: http://localhost:8000)."})

    def __post_init__(self):
        self.check_engine_options()
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"vllm_mode {self.vllm_mode!r}: pass colocate or server")
        check_directory_out(self.out, "rl", "rl")
        check_limit(self.limit)
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        self.prompts = [str(p) for p in self.prompts]
        if self.quantize == "none":
            self.quantize = None
        self.pm = none_as_missing(self.pm)  # as --quantize none: the word for "no PM"
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo {self.algo!r}: use one of {', '.join(ALGOS)}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"--beta {self.beta}: the KL coefficient must be >= 0 (0 turns the KL penalty off)")
        names = [parse_reward_spec(spec)[0] for spec in self.reward]
        if not names:
            raise ConfigError("no --reward given -- pass at least one, e.g. --reward pm:1")
        if len(set(names)) != len(names):
            raise ConfigError(f"--reward {' '.join(self.reward)}: a reward is named twice -- give each once")
        if "pm" in names and not self.pm:
            raise ConfigError("--reward pm needs --pm DIR (a `cai pm train` output) -- pass --pm, or use only "
                              "verifiable rewards, e.g. --reward math:1 --reward code:1")
        if self.pm and "pm" not in names:
            raise ConfigError(f"--pm {self.pm} is given but --reward {' '.join(self.reward)} does not use it -- "
                              "add --reward pm:1, or drop --pm")
        if self.num_generations < 2:
            raise ConfigError(f"--num-generations {self.num_generations}: GRPO and RLOO compare answers to the "
                              "same prompt, so they need at least 2")
        check_at_least_one(self, "prompts_per_step", "max_steps", "max_new_tokens", "judge_every", "save_steps",
                           "code_memory_mb", "pm_batch_size")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr {self.lr}: the learning rate must be positive")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature}: sampling needs a temperature > 0")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ConfigError(f"--quantize {self.quantize!r}: use one of {', '.join(QUANTIZE_CHOICES)}")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r {self.lora_r}: use a rank >= 1, or 0 for full fine-tuning")
        if self.quantize and self.lora_r == 0:
            raise ConfigError("--quantize 4bit with --lora-r 0: a 4-bit model cannot be fully fine-tuned -- "
                              "give --lora-r 16 (QLoRA), or drop --quantize")
        if self.length_target is not None and self.length_target < 1:
            raise ConfigError(f"--length-target {self.length_target} must be >= 1 -- or leave it out for 3/4 of "
                              "--max-new-tokens")
        if self.code_timeout <= 0:
            raise ConfigError(f"--code-timeout {self.code_timeout}: must be positive seconds")

    @property
    def weights(self) -> dict[str, float]:
        return dict(parse_reward_spec(spec) for spec in self.reward)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.lora_r > 0 else 1e-6)

    @property
    def uses_judge(self) -> bool:
        return (self.judge or "").lower() != "none"


# ----------------------------------------------------------------------------- helpers


def load_prompt_rows(paths: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Prompt records from every file, as trl rows: a conversational `prompt` plus `answer` and `tests`
    (None where a record has none) and the record's `id` (made unique across files)."""
    from cai.records import as_messages, read_prompts
    from cai.rewards import parse_number

    rows, seen = [], set()
    for path in paths:
        for record in read_prompts(path, limit):
            row_id = record["id"] if record["id"] not in seen else f"{Path(path).stem}:{record['id']}"
            seen.add(row_id)
            answer, tests = record.get("answer"), record.get("tests")
            where = f"{path}: record {record['id']!r}"
            # Checked here, not when the record is first drawn mid-run inside trl's reward call.
            if answer is not None and str(answer).strip() and parse_number(str(answer)) is None:
                raise RecordsError(f"{where}: answer {answer!r} is not one number -- the math reward compares "
                                   "numbers; write it as 42, -3/4, 1,234.5 or 25% (or leave `answer` out)")
            if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
                tests = "\n".join(tests)  # MBPP's test_list: one assert a line
            elif tests is not None and not isinstance(tests, str):
                raise RecordsError(f"{where}: `tests` must be Python source (a string) or a list of assert "
                                   f"lines, got {type(tests).__name__}")
            rows.append({"prompt": as_messages(record["prompt"]), "id": row_id,
                         "answer": None if answer is None else str(answer), "tests": tests})
    return rows


def trainer_args(cfg: RLConfig, out: Path, device: str, precision) -> Any:
    """trl's GRPOConfig / RLOOConfig for this run. Precision comes from the device (never trl's bf16 +
    checkpointing defaults) and `beta` always from cai's config (never GRPO's default of 0)."""
    from trl import GRPOConfig, RLOOConfig

    config_class = GRPOConfig if cfg.algo == "grpo" else RLOOConfig
    batch = cfg.prompts_per_step * cfg.num_generations
    return config_class(
        output_dir=str(out / "checkpoints"),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_generations=cfg.num_generations,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        generation_batch_size=batch,  # generate once per optimiser step: a step = one fresh batch of answers
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        max_steps=cfg.max_steps,
        num_iterations=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        **rollout_kwargs(cfg, device),
        **precision.trainer_kwargs(),
    )


def rollouts_on_vllm(cfg: RLConfig, device: str) -> bool:
    """Whether trl generates the rollouts with vLLM: --backend vllm, or auto with vLLM installed, on CUDA.
    Never on a CPU: trl's weight sync into vLLM's CPU backend fails (it repacks linear weights), so there
    the rollouts stay on transformers whatever the backend (`run` says so when vllm was asked for)."""
    from cai.engine import resolve_backend

    return not str(device).startswith("cpu") and resolve_backend(cfg.backend, device) == "vllm"


def rollout_kwargs(cfg: RLConfig, device: str) -> dict[str, Any]:
    """trl's vLLM arguments for the rollouts (empty when they run on transformers)."""
    if not rollouts_on_vllm(cfg, device):
        return {}
    kwargs: dict[str, Any] = {"use_vllm": True, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_mode == "server":
        if cfg.vllm_server_base_url:
            kwargs["vllm_server_base_url"] = cfg.vllm_server_base_url
        return kwargs
    kwargs.update(vllm_gpu_memory_utilization=cfg.gpu_memory_utilization,
                  vllm_tensor_parallel_size=cfg.tensor_parallel_size)
    if cfg.max_model_len:
        kwargs["vllm_max_model_length"] = cfg.max_model_len
    return kwargs


def checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.split("-", 1)[1]) if checkpoint else 0


def build_reward(cfg: RLConfig, tokenizer, device: str, observers=()):
    """The combined reward for `cfg.reward`, and the parts by name (the code part keeps outcome counts)."""
    from cai.engine import stop_token_ids
    from cai.rewards import (
        CodeReward,
        CombinedReward,
        FormatReward,
        LengthPenalty,
        PreferenceModelReward,
        math_reward,
    )

    parts: dict[str, Any] = {}
    for name in cfg.weights:
        if name == "pm":
            parts[name] = PreferenceModelReward(cfg.pm, device=device, batch_size=cfg.pm_batch_size)
        elif name == "math":
            parts[name] = math_reward
        elif name == "code":
            parts[name] = CodeReward(timeout_s=cfg.code_timeout, memory_mb=cfg.code_memory_mb,
                                     unsafe_run_code=cfg.unsafe_run_code)
        elif name == "format":
            parts[name] = FormatReward(stop_token_ids(tokenizer))
        elif name == "length":
            parts[name] = LengthPenalty(cfg.length_target or max(1, cfg.max_new_tokens * 3 // 4))
    combined = CombinedReward([(name, parts[name], weight) for name, weight in cfg.weights.items()], observers)
    return combined, parts


def build_judge(cfg: RLConfig, device: str):
    """The held-back contrast judge (a frozen copy of the starting policy by default), or None."""
    if not cfg.uses_judge:
        return None
    from cai import constitution
    from cai.engine import Engine
    from cai.rewards import ContrastJudgeScore

    engine = Engine.from_reference(cfg.judge or cfg.model, batch_size=16, device=device, options=cfg)
    return ContrastJudgeScore(engine, constitution.load(cfg.constitution), seed=cfg.seed)


class Monitor:
    """Per-step hacking monitors and timings, written to metrics.jsonl.

    It observes each reward batch (`observe`, called by CombinedReward), times generation (the trainer
    subclass calls `add_time`) and steps (the callback), and on each trl log line writes one record:
    trl's reward, KL, length and entropy plus cai's boilerplate share, held-back judge score and timings.
    """

    def __init__(self, path: Path, judge=None, judge_every: int = 1, reporter_task=None, batch_size: int = 1):
        from cai.records import read_jsonl, write_jsonl

        self.path, self.judge, self.judge_every, self.task = path, judge, judge_every, reporter_task
        self.batch_size = batch_size  # answers per step, to turn trl's mean length into tokens generated
        self.history: list[dict[str, Any]] = []
        if path.exists():
            self.history = [record for _, record in read_jsonl(path, allow_nan=True)]
        self._write_all = lambda: write_jsonl(self.path, self.history)
        self.pending: dict[str, Any] = {}
        self.times: dict[str, float] = {"generate_s": 0.0, "reward_s": 0.0, "judge_s": 0.0}
        self.step_started = 0.0

    def keep_until(self, step: int) -> None:
        """Drop records after `step` (a resumed run redoes those steps from the checkpoint)."""
        self.history = [r for r in self.history if r.get("step", 0) <= step]
        self._write_all()

    def observe(self, batch) -> None:
        from cai.rewards import step_signals

        step = (batch.step or 0) + 1  # trl's global_step counts finished steps; this batch trains the next
        judge = self.judge if self.judge is not None and step % self.judge_every == 0 else None
        started = time.perf_counter()
        signals = step_signals(batch, judge)
        self.times["judge_s"] += time.perf_counter() - started if judge is not None else 0.0
        self.pending = {"boilerplate_share": round(signals.boilerplate_share, 4),
                        "boilerplate_sentence": signals.boilerplate_sentence,
                        "judge_score": signals.judge_score}

    def add_time(self, key: str, seconds: float) -> None:
        self.times[key] += seconds

    def step_begin(self) -> None:
        self.step_started = time.perf_counter()
        self.times = {key: 0.0 for key in self.times}

    def log(self, step: int, logs: dict[str, Any]) -> None:
        if "reward" not in logs:  # the end-of-training summary line, not a step
            return
        step_s = time.perf_counter() - self.step_started if self.step_started else None
        mean_length = logs.get("completions/mean_length")
        record = {
            "step": step,
            "reward": logs.get("reward"),
            "reward_std": logs.get("reward_std"),
            **{key: value for key, value in logs.items() if key.startswith("reward_") and key != "reward_std"},
            # Groups whose answers all scored the same: their advantages are zero and they teach nothing.
            "frac_reward_zero_std": logs.get("frac_reward_zero_std"),
            "kl": logs.get("kl"),
            "mean_length": mean_length,
            "generated_tokens": round(mean_length * self.batch_size) if mean_length is not None else None,
            "clipped_ratio": logs.get("completions/clipped_ratio"),
            "entropy": logs.get("entropy"),
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            **self.pending,
            "step_s": round(step_s, 3) if step_s is not None else None,
            "generate_s": round(self.times["generate_s"], 3),
            "reward_s": round(self.times["reward_s"] - self.times["judge_s"], 3),  # PM + verifiable rewards
            "judge_s": round(self.times["judge_s"], 3),  # the held-back judge (runs inside the reward call)
        }
        self.history.append(record)
        # The whole file, atomically, rather than an append that a kill could tear: a torn line would stop
        # the resume (read_jsonl is strict), and a step takes seconds while this writes a few kB.
        self._write_all()
        self.pending = {}
        if self.task is not None:
            self.task.advance(1, tokens=record["generated_tokens"] or 0)


def _trainer_class(algo: str):
    """GRPOTrainer / RLOOTrainer, timing generation and reward scoring for the monitor."""
    from trl import GRPOTrainer, RLOOTrainer

    base = GRPOTrainer if algo == "grpo" else RLOOTrainer

    class TimedTrainer(base):
        cai_monitor: Monitor | None = None

        def _generate(self, prompts):
            started = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                if self.cai_monitor is not None:
                    self.cai_monitor.add_time("generate_s", time.perf_counter() - started)

        def _calculate_rewards(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                if self.cai_monitor is not None:
                    self.cai_monitor.add_time("reward_s", time.perf_counter() - started)

        def _get_train_sampler(self, *args, **kwargs):
            return epoch_seeded(super()._get_train_sampler(*args, **kwargs))

    TimedTrainer.__name__ = f"Cai{base.__name__}"
    return TimedTrainer


def epoch_seeded(sampler):
    """`sampler` (trl's RepeatSampler) with a `set_epoch` that reseeds its shuffle from (seed, epoch).

    It seeds its generator once and draws each pass's order from where the last left it, so a run resumed
    after its first pass over the prompts drew other prompts than the run it continued (its generator
    starts again at the seed). The trainer calls `set_epoch` before every pass, resumed ones included."""
    generator, seed = getattr(sampler, "generator", None), getattr(sampler, "seed", None)
    if generator is not None and seed is not None and not hasattr(sampler, "set_epoch"):
        sampler.set_epoch = lambda epoch: generator.manual_seed(seed + epoch)
    return sampler


def _monitor_callback(monitor: Monitor):
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            monitor.step_begin()

        def on_log(self, args, state, control, logs=None, **kwargs):
            monitor.log(state.global_step, logs or {})

    return MonitorCallback()


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Run-level numbers from the per-step records: first/last reward, KL, length trend, timing shares."""
    def values(key):
        return [r[key] for r in history if r.get(key) is not None]

    rewards, lengths = values("reward"), values("mean_length")
    step_s, generate_s = sum(values("step_s")), sum(values("generate_s"))
    metrics: dict[str, Any] = {"steps": len(history)}
    if rewards:
        metrics.update(reward_first=round(rewards[0], 4), reward_last=round(rewards[-1], 4))
    if values("kl"):
        metrics["kl_last"] = float(f"{values('kl')[-1]:.3g}")  # small early on: keep significant digits
    if lengths:
        metrics.update(mean_length_first=round(lengths[0], 1), mean_length_last=round(lengths[-1], 1),
                       length_slope_per_step=round(slope(lengths), 3))
    if step_s > 0:
        metrics.update(seconds_per_step=round(step_s / len(values("step_s")), 2),
                       generation_share=round(generate_s / step_s, 3),
                       reward_share=round(sum(values("reward_s")) / step_s, 3))
    return metrics


# ----------------------------------------------------------------------------- run


def run(cfg: RLConfig, ctx: StageContext) -> StageResult:
    if not cfg.prompts:
        raise ConfigError("no --prompts given -- pass one or more prompt files, e.g. --prompts "
                          "data/red_team_prompts.jsonl --prompts data/helpful_prompts.jsonl")
    if not cfg.out:
        raise ConfigError("no --out given -- name the directory for the RL model and metrics")
    out = Path(cfg.out)
    inputs = {"policy": cfg.model, "pm": cfg.pm, **{f"prompts[{i}]": p for i, p in enumerate(cfg.prompts)}}
    manifest = Manifest("rl", cfg, ctx.manifest_for(out), inputs=inputs,
                        outputs=[out / "model", out / "metrics.jsonl", out / "checkpoints"], force=cfg.force,
                        scratch=[out / "checkpoints"])  # removed once complete: a kill before resumes from them
    if (done := manifest.previous()) is not None:
        return done
    if "code" in cfg.weights:  # refuse before starting, and before any model loads, where no sandbox runs
        from cai.rewards import require_sandbox

        if (warning := require_sandbox(cfg.unsafe_run_code)) is not None:
            ctx.reporter.log(warning)
    resuming = manifest.start()

    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback

    from cai.models import default_device, load_causal_lm, lora_config, precision_for, save_standalone

    device = ctx.device or default_device()
    if cfg.backend == "vllm" and not rollouts_on_vllm(cfg, device):
        ctx.reporter.log("rl: rollouts are generated with transformers on this CPU (trl's vLLM integration needs "
                         "CUDA); the held-back judge uses vLLM")
    rows = load_prompt_rows(cfg.prompts, cfg.limit)
    if len(rows) < cfg.prompts_per_step:  # trl would draw no full batch: 0 steps, reported as success
        raise ConfigError(f"rl: {len(rows)} prompt(s) read, but a step takes --prompts-per-step "
                          f"{cfg.prompts_per_step} -- give more prompts (or a larger --limit), or lower "
                          "--prompts-per-step")
    weights = cfg.weights
    if not ({"pm", "format", "length"} & set(weights)):
        unscored = sum(1 for r in rows if not (("math" in weights and r["answer"]) or ("code" in weights and r["tests"])))
        if unscored == len(rows):  # every step would train on zeros and report success
            raise ConfigError(f"rl: none of the {len(rows)} prompts has an `answer` or `tests` for the rewards "
                              f"{', '.join(weights)}, so every answer would score 0 -- give prompts with answers "
                              "(e.g. data/verifiable_prompts.jsonl), or add the PM: --reward pm:1 --pm DIR")
        if unscored:
            ctx.reporter.log(f"{unscored} of {len(rows)} prompts have no `answer`/`tests` for the rewards "
                             f"{', '.join(weights)}: they score 0 and teach nothing")

    checkpoint = last_checkpoint(out / "checkpoints") if resuming else None
    if not resuming:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    task = ctx.reporter.task(f"rl ({cfg.algo})", total=cfg.max_steps, unit="steps")
    monitor = Monitor(out / "metrics.jsonl", judge=build_judge(cfg, device), judge_every=cfg.judge_every,
                      reporter_task=task, batch_size=cfg.prompts_per_step * cfg.num_generations)
    monitor.keep_until(checkpoint_step(checkpoint))
    if checkpoint:
        task.advance(checkpoint_step(checkpoint))
        ctx.reporter.log(f"resuming from {checkpoint}")

    precision = precision_for(device)
    frozen = cfg.lora_r > 0 and cfg.quantize is None  # a 4-bit base keeps its own compute dtype
    model, tokenizer = load_causal_lm(cfg.model, quantize=cfg.quantize, device=device,
                                      dtype=precision.frozen_dtype if frozen else None)
    reward, parts = build_reward(cfg, tokenizer, device, observers=[monitor.observe])
    trainer_class = _trainer_class(cfg.algo)
    trainer = trainer_class(
        model=model, reward_funcs=[reward], args=trainer_args(cfg, out, device, precision),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=lora_config(cfg.lora_r) if cfg.lora_r > 0 else None,
        callbacks=[_monitor_callback(monitor)])
    trainer.cai_monitor = monitor
    for callback in (PrinterCallback, ProgressCallback):  # stdout is for results; progress is the reporter's
        trainer.remove_callback(callback)
    if cfg.beta == 0:
        ctx.reporter.log("KL penalty off (--beta 0, as asked): nothing holds the policy near where it started")

    train_or_resume(trainer, checkpoint, ctx.reporter.log)
    task.close()

    model_dir = save_standalone(trainer.model, tokenizer, out / "model", base_reference=cfg.model)

    history = monitor.history
    warnings = hacking_warnings(history, Thresholds())
    for warning in warnings:
        ctx.reporter.log(f"warning: {warning}")
    metrics = summarize(history)
    metrics["warnings"] = warnings
    counts = {"prompts": len(rows), "steps": len(history),
              "answers": len(history) * cfg.prompts_per_step * cfg.num_generations}
    if "code" in parts:
        counts.update({f"code_{outcome}": n for outcome, n in sorted(parts["code"].counts.items())})
    reward_text = " + ".join(f"{w:g}*{n}" for n, w in weights.items())
    summary = (f"{cfg.algo} {len(history)} steps on {len(rows)} prompts, reward {reward_text}: "
               f"{metrics.get('reward_first', float('nan')):+.3f} -> {metrics.get('reward_last', float('nan')):+.3f}; "
               f"beta {cfg.beta:g}" + (f", KL {metrics['kl_last']:.2g}" if "kl_last" in metrics else "")
               + (f"; {metrics['generation_share']:.0%} of step time generating" if "generation_share" in metrics else "")
               + (f"; {len(warnings)} hacking warning(s)" if warnings else "; no hacking warnings"))
    return manifest.complete(outputs={"model": str(model_dir), "metrics": str(out / "metrics.jsonl")},
                             counts=counts, summary=summary, metrics=metrics)
