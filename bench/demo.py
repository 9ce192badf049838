"""Where the demo's time goes: wall time of each stage, the share spent generating, tokens/s per stage.

Runs a recipe (default recipes/demo.yaml) in this process from scratch, with the generation paths timed:
cai's engine (`Engine.generate`, `Engine.score`) and transformers' `generate` (what trl's RL trainers
call). Prints one row per stage and the total against the demo's 30-minute budget on this CPU (the
baseline here is the budget: there is no older pipeline to compare with). Process CPU seconds per stage
are printed too: on a machine shared with other work, wall time overstates what a stage costs.

    python bench/demo.py [--recipe recipes/demo.yaml] [--name bench-demo] [--set rl.max_steps=4]... [--json]

The run directory is recreated (`--runs-dir`/`--name`), so every stage does its work; the harmlessness
and over-refusal figures of the eval stage are printed at the end.
"""

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

BUDGET_S = 30 * 60  # the demo must finish within 30 minutes on a 2-core CPU


class Timings:
    """Seconds and tokens spent generating and scoring, per stage."""

    def __init__(self):
        self.stage = "setup"
        self.seconds = defaultdict(float)  # (stage, kind) -> seconds
        self.tokens = defaultdict(int)  # (stage, kind) -> tokens generated (or scored)
        self.depth = 0  # nested timed calls (engine.generate_chat -> generate) count once

    @contextlib.contextmanager
    def timed(self, kind: str):
        outermost = self.depth == 0
        self.depth += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            if outermost:
                self.seconds[(self.stage, kind)] += time.perf_counter() - started


def instrument(timings: Timings) -> None:
    import transformers.generation.utils as generation_utils

    from cai.engine import Engine

    engine_generate, engine_score = Engine.generate, Engine.score
    hf_generate = generation_utils.GenerationMixin.generate

    def generate(self, prompts, *args, **kwargs):
        with timings.timed("generate"):
            results = engine_generate(self, prompts, *args, **kwargs)
        timings.tokens[(timings.stage, "generate")] += sum(r.num_tokens for r in results)
        return results

    def score(self, contexts, continuations, *args, **kwargs):
        with timings.timed("score"):
            results = engine_score(self, contexts, continuations, *args, **kwargs)
        timings.tokens[(timings.stage, "score")] += sum(len(r.token_logprobs) for r in results)
        return results

    def hf(self, *args, **kwargs):
        with timings.timed("generate"):
            output = hf_generate(self, *args, **kwargs)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        sequences = getattr(output, "sequences", output)
        if inputs is not None and hasattr(sequences, "shape"):
            timings.tokens[(timings.stage, "generate")] += int(sequences.shape[0] * (sequences.shape[1] - inputs.shape[1]))
        return output

    Engine.generate, Engine.score = generate, score
    generation_utils.GenerationMixin.generate = hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--name", default="bench-demo", help="run name (its directory is recreated)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="STAGE.KEY=VALUE")
    parser.add_argument("--keep", action="store_true", help="reuse the run directory (finished stages skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    from cai import recipe as recipes
    from cai.stages.base import NullReporter

    loaded = recipes.load(args.recipe, args.overrides, name=args.name, runs_dir=args.runs_dir)
    if loaded.run_dir.exists() and not args.keep:
        shutil.rmtree(loaded.run_dir)
    timings = Timings()
    instrument(timings)

    class Log(NullReporter):
        def log(self, message: str) -> None:
            print(f"  {message}", file=sys.stderr, flush=True)

    cpu_marks: list[tuple[str, float]] = []  # (stage, process CPU seconds when it started)

    def on_stage(index: int, total: int, stage: str) -> None:
        cpu_marks.append((stage, time.process_time()))
        timings.stage = stage
        print(f"[{index + 1}/{total}] {stage} ...", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = recipes.run(loaded, Log(), on_stage=on_stage)
    total = time.perf_counter() - started
    cpu_marks.append(("end", time.process_time()))
    cpu_seconds = {stage: after - before for (stage, before), (_, after) in zip(cpu_marks, cpu_marks[1:], strict=False)}

    rows = []
    for outcome in result.outcomes:
        name = outcome.name
        gen_s, score_s = timings.seconds[(name, "generate")], timings.seconds[(name, "score")]
        gen_tokens = timings.tokens[(name, "generate")]
        rows.append({"stage": name, "seconds": outcome.seconds, "cpu_s": round(cpu_seconds.get(name, 0.0), 1),
                     "skipped": outcome.skipped,
                     "generate_s": round(gen_s, 1), "score_s": round(score_s, 1),
                     "generation_share": round(gen_s / outcome.seconds, 3) if outcome.seconds else None,
                     "generated_tokens": gen_tokens,
                     "generate_tokens_per_s": round(gen_tokens / gen_s, 1) if gen_s else None,
                     "scored_tokens": timings.tokens[(name, "score")], "summary": outcome.summary})
    metrics_path = loaded.run_dir / "6-eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    summary = {"recipe": args.recipe, "total_s": round(total, 1), "budget_s": BUDGET_S,
               "ratio_to_budget": round(total / BUDGET_S, 3), "stages": rows,
               "generation_share": round(sum(r["generate_s"] for r in rows) / total, 3) if total else None,
               "models": {label: {k: v for k, v in values.items() if k in ("harmful_refusal_rate",
                                                                            "benign_refusal_rate",
                                                                            "judge_vs_refusal",
                                                                            "pm_score_benign")}
                          for label, values in metrics.get("models", {}).items()},
               "elo": metrics.get("elo"), "report": str(result.report_path) if result.report_path else None}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'stage':10} {'wall s':>8} {'cpu s':>7} {'gen s':>7} {'gen %':>6} {'gen tok':>8} {'gen tok/s':>9} "
          f"{'score s':>8}")
    for r in rows:
        share = f"{r['generation_share']:.0%}" if r["generation_share"] is not None else "-"
        tps = f"{r['generate_tokens_per_s']:.0f}" if r["generate_tokens_per_s"] else "-"
        print(f"{r['stage']:10} {r['seconds']:8.0f} {r['cpu_s']:7.0f} {r['generate_s']:7.0f} {share:>6} "
              f"{r['generated_tokens']:8d} "
              f"{tps:>9} {r['score_s']:8.0f}")
    print(f"total      {total:8.0f} s = {total / 60:.1f} min; budget {BUDGET_S / 60:.0f} min; ratio "
          f"{total / BUDGET_S:.2f}; generation {summary['generation_share']:.0%} of the time")
    for line in recipes.summary_lines(metrics) if metrics else []:
        print(line)
    if result.report_path:
        print(f"report: {Path(result.report_path)}")


if __name__ == "__main__":
    main()
