"""RL throughput: GRPO steps/s, generated tokens/s and the share of step time spent generating.

Same model (embedded SmolLM2-135M-Instruct as policy, and as the base of a preference model with an
untrained, seeded score head), same prompts (red-team + helpful), same step shape, same run:

- ours: `cai rl` as it runs (precision chosen for the device; on CPU: bf16 autocast where the CPU has
  native bf16, LoRA adapters in fp32 over a frozen base loaded in bf16, no gradient checkpointing);
- baseline: the same run with trl's own precision defaults (bf16 + gradient checkpointing), which is
  what a GRPOConfig gets when nobody overrides them.

Prints seconds per step, steps/s, generated tokens/s and generation share for both, and the ratio.
OpenRLHF reports generation at about 80% of RL time on GPU; this measures the share on this machine.
The first step of each run is warm-up and left out of the averages when there is more than one.

    python bench/rl.py [--steps 3] [--baseline-steps 2] [--max-new-tokens 64] [--json]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import cai.models
from cai.models import Precision, load_sequence_classifier
from cai.paths import bundled
from cai.stages import rl
from cai.stages.base import StageContext

MODEL = "embedded:smollm2-135m-instruct"


def build_pm(directory: Path) -> Path:
    """A PM on the embedded model with a seeded, untrained score head: it costs what a trained one costs."""
    torch.manual_seed(0)
    model, tokenizer = load_sequence_classifier(MODEL, device="cpu")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def measure(out: Path, pm: Path, steps: int, max_new_tokens: int, precision: Precision | None) -> dict:
    """Run `steps` GRPO steps; with `precision` given, force it instead of cai's device choice."""
    cfg = rl.RLConfig(prompts=[bundled("data/red_team_prompts.jsonl"), bundled("data/helpful_prompts.jsonl")],
                      out=str(out), model=MODEL, pm=str(pm), max_steps=steps, max_new_tokens=max_new_tokens,
                      judge="none", save_steps=10_000)
    original = cai.models.precision_for
    if precision is not None:
        cai.models.precision_for = lambda *args, **kwargs: precision
    started = time.perf_counter()
    try:
        rl.run(cfg, StageContext(device="cpu"))
    finally:
        cai.models.precision_for = original
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = history[1:] if len(history) > 1 else history
    step_s = sum(r["step_s"] for r in timed)
    return {
        "steps": len(history),
        "seconds_per_step": step_s / len(timed),
        "steps_per_s": len(timed) / step_s,
        "generated_tokens_per_s": sum(r["generated_tokens"] for r in timed) / step_s,
        "generation_share": sum(r["generate_s"] for r in timed) / step_s,
        "reward_share": sum(r["reward_s"] for r in timed) / step_s,
        "answers_per_step": cfg.prompts_per_step * cfg.num_generations,
        "wall_s_including_load_and_save": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps for cai's settings")
    parser.add_argument("--baseline-steps", type=int, default=2, help="steps with trl's defaults (0 = skip)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cai-bench-rl-") as tmp:
        root = Path(tmp)
        pm = build_pm(root / "pm")
        ours = measure(root / "ours", pm, args.steps, args.max_new_tokens, None)
        baseline = None
        if args.baseline_steps > 0:
            trl_defaults = Precision(bf16=True, fp16=False, gradient_checkpointing=True)
            baseline = measure(root / "baseline", pm, args.baseline_steps, args.max_new_tokens, trl_defaults)

    result = {"device": "cpu", "torch_threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
              "ours": ours, "baseline_trl_defaults": baseline,
              "speedup": baseline["seconds_per_step"] / ours["seconds_per_step"] if baseline else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"GRPO on {MODEL}, CPU ({result['torch_threads']} threads), {ours['answers_per_step']} answers a step, "
          f"up to {args.max_new_tokens} new tokens each")
    precision = cai.models.precision_for("cpu")
    ours_name = f"cai ({'bf16 autocast' if precision.bf16 else 'fp32'}, no checkpointing)"
    rows = [(ours_name, ours)] + ([("trl defaults (bf16 + checkpointing)", baseline)]
                                                       if baseline else [])
    for name, r in rows:
        print(f"  {name:38s} {r['seconds_per_step']:7.1f} s/step  {r['steps_per_s']:.3f} steps/s  "
              f"{r['generated_tokens_per_s']:6.1f} gen tok/s  generation {r['generation_share']:.0%} of step time, "
              f"reward scoring {r['reward_share']:.0%}")
    if baseline:
        print(f"  speedup of cai's precision over trl's defaults: {result['speedup']:.2f}x")
    print("  (OpenRLHF reports generation at ~80% of RL time on GPU; GPU/vLLM comparison needs a GPU.)")


if __name__ == "__main__":
    main()
