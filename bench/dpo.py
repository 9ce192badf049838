"""Training cost of the offline path (`cai dpo`) against the PM + RL path, on the same preference file.

Same model (embedded SmolLM2-135M-Instruct), same human/AI mix (`records.mix_preferences`, same seed and
fraction), same LoRA rank, batch size, max length and step count, same run. Each path trains in its own
subprocess so its peak memory (`ru_maxrss`: the whole process, model load and save included; torch's
allocations are invisible to tracemalloc) is its own. Prints training tokens/s (prompt + answer tokens
of both answers of each pair, per second of `trainer.train()`), peak memory, and the ratios.

The PM + RL path: `cai.stages.pm` and `cai.stages.rl` were not on main when this was written, so the PM
part is trl's RewardTrainer (what `cai pm train` wraps) on the same pairs, and the RL part is a hook
(`rl_path`) that reports "not measured" until `cai rl` lands. DPO replaces both; the PM comparison alone
understates the saving, since RL adds generation on top of a PM-sized training step.

    python bench/dpo.py [--steps 8] [--batch-size 4] [--max-length 256] [--lora-r 16] [--json]

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


def make_inputs(directory: Path) -> tuple[Path, Path]:
    """A feedback-stage-style AI file (the sanity pairs, p_chosen 0.8) and the example human file."""
    from cai.paths import bundled
    from cai.records import read_jsonl, write_jsonl

    ai = [{**row, "p_chosen": 0.8, "source": "ai-harmless"}
          for _, row in read_jsonl(bundled("data/judge_sanity_pairs.jsonl"))]
    ai_path = directory / "ai.jsonl"
    write_jsonl(ai_path, ai)
    return ai_path, Path(bundled("data/helpful_prefs_example.jsonl"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- the paths (one per subprocess)


def dpo_path(args, ai: Path, human: Path, out: Path) -> dict:
    """`cai dpo` itself: the stage's run(), soft labels on."""
    from cai.stages.base import StageContext
    from cai.stages.dpo import DPOConfig, run

    cfg = DPOConfig(policy=args.model, ai=str(ai), human=str(human), out=str(out), soft_labels=True,
                    lora_r=args.lora_r, max_steps=args.steps, batch_size=args.batch_size,
                    max_length=args.max_length, seed=0, force=True)
    result = run(cfg, StageContext(device="cpu"))
    return {"tokens": result.counts["tokens"], "train_s": result.metrics["train_seconds"],
            "steps": result.counts["steps"]}


def pm_path(args, ai: Path, human: Path, out: Path) -> dict:
    """The PM part of PM + RL: trl's RewardTrainer on the same mix, LoRA with the score head trained."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import RewardConfig, RewardTrainer

    from cai import records
    from cai.models import load_sequence_classifier, lora_config, precision_for, save_standalone
    from cai.stages.dpo import PAPER_HUMAN_FRACTION, to_trl_example

    mix = records.mix_preferences(records.read_preferences(ai, default_source="ai-harmless"),
                                  records.read_preferences(human), PAPER_HUMAN_FRACTION, 0)
    examples = [{k: v for k, v in to_trl_example(r).items() if k != "p_chosen"} for r in mix.records]
    model, tokenizer = load_sequence_classifier(args.model, device="cpu")
    config = RewardConfig(output_dir=str(out / "checkpoints"), max_steps=args.steps,
                          per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                          learning_rate=5e-5, logging_steps=1, save_strategy="no", report_to="none",
                          disable_tqdm=True, use_cpu=True, seed=0, **precision_for("cpu").trainer_kwargs())
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples),
                            processing_class=tokenizer,
                            peft_config=lora_config(args.lora_r, task_type="SEQ_CLS", modules_to_save=["score"]))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    save_standalone(trainer.model, tokenizer, out, base_reference=args.model, auto_class="sequence-classification")
    return {"tokens": trainer._total_train_tokens, "train_s": train_s, "steps": trainer.state.global_step}


def rl_path(args, pm_dir: Path, out: Path) -> dict | None:
    """Hook for the RL part of PM + RL (`cai rl --pm DIR` on the same prompts). Not on main yet: returns
    None, and the report says the PM + RL figures cover the PM only. Fill in with `cai.stages.rl.run`."""
    return None


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    workdir = Path(args.workdir)
    ai, human = make_inputs(workdir)
    out = workdir / args.child
    if args.child == "dpo":
        figures = dpo_path(args, ai, human, out)
    else:
        figures = pm_path(args, ai, human, out)
        rl = rl_path(args, out, workdir / "rl")
        figures["rl"] = rl
    figures["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(figures))


def measure(path: str, args, workdir: str) -> dict:
    command = [sys.executable, __file__, "--child", path, "--workdir", workdir, "--model", args.model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--lora-r", str(args.lora_r)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1][len("RESULT "):])
    figures["tokens_per_s"] = figures["tokens"] / figures["train_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per path")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--child", choices=["dpo", "pm"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="cai-bench-dpo-") as workdir:
        pm = measure("pm", args, workdir)
        dpo = measure("dpo", args, workdir)
    result = {
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "lora_r": args.lora_r, "dpo": dpo, "pm": pm, "rl_measured": pm.get("rl") is not None,
        "dpo_over_pm_tokens_per_s": dpo["tokens_per_s"] / pm["tokens_per_s"],
        "dpo_over_pm_peak_rss": dpo["peak_rss_mb"] / pm["peak_rss_mb"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, {args.steps} steps x {args.batch_size} pairs, max length {args.max_length}, "
          f"LoRA r={args.lora_r}, CPU")
    for name, figures in (("cai dpo (soft labels)", dpo), ("PM (trl RewardTrainer)", pm)):
        print(f"{name:24s}: {figures['tokens']} tokens in {figures['train_s']:.1f} s = "
              f"{figures['tokens_per_s']:.0f} tok/s, peak RSS {figures['peak_rss_mb']:.0f} MB")
    print(f"ratio dpo/pm            : {result['dpo_over_pm_tokens_per_s']:.2f}x tokens/s, "
          f"{result['dpo_over_pm_peak_rss']:.2f}x peak memory")
    if not result["rl_measured"]:
        print("RL part of PM + RL       : not measured (cai rl not on main yet; see rl_path) -- DPO replaces "
              "PM training AND RL, so the PM-only figures understate the saving")


if __name__ == "__main__":
    main()
