"""Cost of the offline path (`cai dpo`) against the PM + RL path (`cai pm train` then `cai rl`), same run.

Same model (embedded SmolLM2-135M-Instruct), same preference file (the sanity pairs as AI labels with
p_chosen 0.8, plus the example human file), so both stages prepare the same training mix and held-out
pairs; same LoRA rank, batch size, max length and optimizer steps for DPO and the PM; RL then runs
`--rl-steps` steps against that PM on the same file's prompts (trl's GRPO, cai's defaults: 2 prompts x 4
answers of up to 64 tokens a step). Each stage runs in its own subprocess, so its peak memory
(`ru_maxrss`: the whole process, model load and save included; torch's allocations are invisible to
tracemalloc) is its own.

Prints: training tokens/s of DPO and of the PM (prompt + answer tokens of both answers of each pair,
per second of training; the same pairs, so the same tokens), wall seconds of each stage (what a user
waits for, loading and saving included), peak memory, and the ratios. RL's throughput is not in
training tokens (it generates), so the path comparison is in wall time: DPO against PM + RL.

    python bench/dpo.py [--steps 4] [--rl-steps 2] [--batch-size 2] [--max-length 256] [--threads N] [--json]

CPU only here (no GPU this session): GPU figures (a 1B-class model in 4 bits) are out of scope.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "embedded:smollm2-135m-instruct"


def make_inputs(directory: Path) -> tuple[Path, Path, Path]:
    """The AI file (sanity pairs, p_chosen 0.8, source ai-harmless), the example human file, and the AI
    file's prompts as a prompt set for RL."""
    from cai.paths import bundled
    from cai.records import read_jsonl, write_jsonl

    ai = [{**row, "p_chosen": 0.8, "source": "ai-harmless"}
          for _, row in read_jsonl(bundled("data/judge_sanity_pairs.jsonl"))]
    ai_path, prompts_path = directory / "ai.jsonl", directory / "prompts.jsonl"
    write_jsonl(ai_path, ai)
    write_jsonl(prompts_path, [{"id": row["id"], "prompt": row["prompt"]} for row in ai])
    return ai_path, Path(bundled("data/helpful_prefs_example.jsonl")), prompts_path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- the stages (one per subprocess)


def run_dpo(args, workdir: Path) -> dict:
    from cai.stages.base import StageContext
    from cai.stages.dpo import DPOConfig, run

    ai, human, _ = make_inputs(workdir)
    cfg = DPOConfig(model=args.model, ai=str(ai), human=str(human), out=str(workdir / "dpo"), soft_labels=True,
                    lora_r=args.lora_r, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    max_length=args.max_length, force=True)
    result = run(cfg, StageContext(device="cpu"))
    return {"tokens": result.counts["tokens"], "train_s": result.metrics["train_seconds"],
            "steps": result.counts["steps"]}


def run_pm(args, workdir: Path) -> dict:
    from cai.stages.base import StageContext
    from cai.stages.pm import PMTrainConfig, run_train

    ai, human, _ = make_inputs(workdir)
    cfg = PMTrainConfig(model=args.model, ai=str(ai), human=str(human), out=str(workdir / "pm"),
                        lora_r=args.lora_r, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        max_length=args.max_length, force=True)
    timer = _TrainTimer()
    result = run_train(cfg, StageContext(device="cpu", reporter=timer))
    return {"tokens": result.metrics["train_tokens"], "train_s": timer.seconds(), "steps": result.metrics["steps"]}


def run_rl(args, workdir: Path) -> dict:
    from cai.stages.base import StageContext
    from cai.stages.rl import RLConfig, run

    _, _, prompts = make_inputs(workdir)
    cfg = RLConfig(model=args.model, pm=str(workdir / "pm"), prompts=[str(prompts)], out=str(workdir / "rl"),
                   lora_r=args.lora_r, max_steps=args.rl_steps, judge="none", force=True)
    result = run(cfg, StageContext(device="cpu"))
    return {"steps": result.counts["steps"], "seconds_per_step": result.metrics.get("seconds_per_step"),
            "generation_share": result.metrics.get("generation_share")}


class _TrainTimer:
    """A reporter that times the PM stage's training task (its first progress task) from first to last
    step, since `cai pm train` reports training time only through its progress bar."""

    def __init__(self):
        self.start = self.end = None
        self.messages = []

    def task(self, description, total, unit="items"):
        timer = self
        first = self.start is None and "train" in description

        class _Task:
            def advance(self, items=1, tokens=0):
                pass

            def close(self):
                if first:
                    timer.end = time.perf_counter()

        if first:
            self.start = time.perf_counter()
        return _Task()

    def log(self, message):
        self.messages.append(message)

    def seconds(self) -> float:
        return (self.end or time.perf_counter()) - self.start


STAGES = {"dpo": run_dpo, "pm": run_pm, "rl": run_rl}


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    figures = STAGES[args.child](args, Path(args.workdir))
    figures["wall_s"] = time.perf_counter() - started
    figures["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(figures))


def measure(stage: str, args, workdir: str) -> dict:
    command = [sys.executable, __file__, "--child", stage, "--workdir", workdir, "--model", args.model,
               "--steps", str(args.steps), "--rl-steps", str(args.rl_steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--lora-r", str(args.lora_r), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1][len("RESULT "):])
    if "tokens" in figures:
        figures["tokens_per_s"] = figures["tokens"] / figures["train_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps for DPO and for the PM")
    parser.add_argument("--rl-steps", type=int, default=2, help="RL steps against the PM")
    parser.add_argument("--batch-size", type=int, default=2, help="preference pairs per step (DPO and PM)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage (0: torch's default; 1 is steadier on a shared CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--child", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="cai-bench-dpo-") as workdir:
        pm = measure("pm", args, workdir)
        rl = measure("rl", args, workdir)  # needs the PM just trained
        dpo = measure("dpo", args, workdir)
    path_wall = pm["wall_s"] + rl["wall_s"]
    result = {
        "model": args.model, "steps": args.steps, "rl_steps": args.rl_steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "lora_r": args.lora_r, "threads": args.threads,
        "dpo": dpo, "pm": pm, "rl": rl,
        "dpo_over_pm_tokens_per_s": dpo["tokens_per_s"] / pm["tokens_per_s"],
        "dpo_over_pm_rl_wall": dpo["wall_s"] / path_wall,
        "dpo_over_pm_rl_peak_rss": dpo["peak_rss_mb"] / max(pm["peak_rss_mb"], rl["peak_rss_mb"]),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, CPU, {args.threads or 'default'} torch threads; DPO and PM: {args.steps} steps x "
          f"{args.batch_size} pairs, max length {args.max_length}, LoRA r={args.lora_r}; RL: {args.rl_steps} steps")
    for name, figures in (("cai dpo (soft labels)", dpo), ("cai pm train", pm)):
        print(f"{name:22s}: {figures['tokens']} tokens in {figures['train_s']:.1f} s = "
              f"{figures['tokens_per_s']:.0f} tok/s training; {figures['wall_s']:.0f} s wall, "
              f"peak RSS {figures['peak_rss_mb']:.0f} MB")
    print(f"{'cai rl':22s}: {rl['steps']} steps, {rl['seconds_per_step'] or 0:.1f} s/step "
          f"({(rl['generation_share'] or 0):.0%} generating); {rl['wall_s']:.0f} s wall, "
          f"peak RSS {rl['peak_rss_mb']:.0f} MB")
    print(f"ratios                : DPO/PM training tok/s {result['dpo_over_pm_tokens_per_s']:.2f}x; "
          f"DPO/(PM + RL) wall {result['dpo_over_pm_rl_wall']:.2f}x; "
          f"DPO/max(PM, RL) peak memory {result['dpo_over_pm_rl_peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
