"""Critique-stage throughput: `cai critique` (batched engine) against the naive one-prompt-at-a-time loop.

Same model (embedded SmolLM2-135M-Instruct, loaded once and shared), same red-team prompts, same
constitution and principles, same conversations, same max new tokens, greedy decoding (so both
write the same text, up to float noise), same run. The naive loop is what people write first: for
each prompt, one `model.generate` call for the answer, then one per critique and per revision.
Prints prompts/s and tokens/s for both and the ratios (target: >= 8x prompts/s). Both run in fp32 (what
`from_pretrained` gives on CPU) and then, when `--precision` resolves to something else (`auto`: bf16 on
CPUs that multiply bf16 natively), both again in that precision: like against like is the stage's own
gain; its default against the naive fp32 loop is what a user sees.

The naive loop runs on the first `--naive-prompts` (default 8) of the same prompts: each of its calls
pays the full few-shot prefill, so its cost per prompt is flat and 8 prompts measure its rate in a
quarter of the time (pass `--naive-prompts 32` to run it on all of them).

    python bench/critique.py [--prompts 32] [--naive-prompts 8] [--revisions 1] [--max-new-tokens 64]
                             [--batch-size 32] [--precision auto] [--json]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from cai import constitution as c
from cai.engine import Engine, stop_token_ids
from cai.models import PRECISION_CHOICES, cast_weights, inference_dtype, load_causal_lm
from cai.paths import bundled
from cai.records import read_prompts
from cai.stages import critique
from cai.stages.critique import CritiqueConfig, clean_text, degenerate_reason


def naive(model, tokenizer, cons, prompts, cfg: CritiqueConfig) -> tuple[int, int]:
    """The loop people write first: one generate() per prompt and step. Returns (records, tokens)."""
    stops = sorted(stop_token_ids(tokenizer, model))
    tokens = 0

    def generate(messages) -> str:
        nonlocal tokens
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        tokens += len(new)
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    for prompt in prompts:
        answer = clean_text(generate(c.answer_messages(cons, prompt["prompt"])))
        for principle in cons.sample_critique_principles(prompt["id"], cfg.revisions, cfg.seed):
            critique_text = clean_text(generate(c.critique_messages(cons, prompt["prompt"], answer, principle)),
                                       "critique")
            raw = generate(c.revision_messages(cons, prompt["prompt"], answer, principle, critique_text))
            revision = clean_text(raw)
            if degenerate_reason(revision, raw) is None:
                answer = revision
    return len(prompts), tokens


def ours(engine, cfg: CritiqueConfig) -> tuple[int, int]:
    """`cai critique` itself (the stage's run(), records written), on the already-loaded model."""
    original = critique.build_engine
    critique.build_engine = lambda config, device: engine
    try:
        result = critique.run(cfg)
    finally:
        critique.build_engine = original
    return result.counts["records"], result.metrics["tokens_generated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--naive-prompts", type=int, default=8, help="prompts the naive loop runs on (rate)")
    parser.add_argument("--revisions", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="of `cai critique`'s second run (default: auto)")
    parser.add_argument("--prompts-file", help="JSONL/CSV prompt set (default: data/red_team_prompts.jsonl)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    prompts_file = args.prompts_file or str(bundled("data/red_team_prompts.jsonl"))
    model, tokenizer = load_causal_lm("embedded:smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    model.eval()
    engine = Engine(model, tokenizer, batch_size=args.batch_size)
    cons = c.load("default")
    prompts = read_prompts(prompts_file, limit=args.prompts)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = CritiqueConfig(prompts=prompts_file, out=str(Path(tmp) / "critique.jsonl"), limit=args.prompts,
                             revisions=args.revisions, max_new_tokens=args.max_new_tokens, temperature=0.0,
                             batch_size=args.batch_size, chunk_size=args.prompts)
        dtype = inference_dtype("cpu", args.precision)
        runs = {}
        for run_dtype in dict.fromkeys((torch.float32, dtype)):
            cast_weights(model, run_dtype)
            name = str(run_dtype).removeprefix("torch.")
            start = time.perf_counter()
            with torch.inference_mode():
                records, tokens = naive(model, tokenizer, cons, prompts[:args.naive_prompts], cfg)
            naive_s = time.perf_counter() - start
            start = time.perf_counter()
            ours_records, ours_tokens = ours(engine, dataclasses.replace(cfg, out=str(Path(tmp) / f"{name}.jsonl")))
            ours_s = time.perf_counter() - start
            runs[name] = {"naive_s": naive_s, "naive_prompts": records, "naive_tokens": tokens,
                          "naive_prompts_per_s": records / naive_s, "naive_tokens_per_s": tokens / naive_s,
                          "ours_s": ours_s, "ours_prompts": ours_records, "ours_tokens": ours_tokens,
                          "ours_prompts_per_s": ours_records / ours_s, "ours_tokens_per_s": ours_tokens / ours_s}
    fp32 = runs["float32"]
    for row in runs.values():
        row["ratio_prompts_per_s"] = row["ours_prompts_per_s"] / row["naive_prompts_per_s"]
        row["ratio_tokens_per_s"] = row["ours_tokens_per_s"] / row["naive_tokens_per_s"]
        row["ratio_vs_naive_fp32"] = row["ours_prompts_per_s"] / fp32["naive_prompts_per_s"]
    result = {"prompts": len(prompts), "naive_prompts": args.naive_prompts, "revisions": args.revisions,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "generations_per_prompt": 1 + 2 * args.revisions, "runs": runs}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{len(prompts)} red-team prompts, {args.revisions} revision round(s) = {1 + 2 * args.revisions} "
          f"generations each, <= {args.max_new_tokens} new tokens, greedy, few-shot default constitution")
    for name, row in runs.items():
        print(f"naive loop, {name:9s}: {row['naive_s']:7.1f} s  {row['naive_prompts_per_s']:.3f} prompts/s  "
              f"{row['naive_tokens_per_s']:.1f} tok/s ({row['naive_prompts']} prompts, {row['naive_tokens']} tokens)")
        print(f"cai critique, {name:7s}: {row['ours_s']:7.1f} s  {row['ours_prompts_per_s']:.3f} prompts/s  "
              f"{row['ours_tokens_per_s']:.1f} tok/s ({row['ours_prompts']} prompts, {row['ours_tokens']} tokens)")
        versus = "" if name == "float32" else f"; {row['ratio_vs_naive_fp32']:.1f}x the naive loop in fp32"
        print(f"ratio, both {name:9s}: {row['ratio_prompts_per_s']:.1f}x prompts/s, "
              f"{row['ratio_tokens_per_s']:.1f}x tok/s{versus}")


if __name__ == "__main__":
    main()
