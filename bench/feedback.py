"""Judging throughput: cai's log-probability judge against a judge that generates its answer letter.

Same model (embedded SmolLM2-135M-Instruct), same pairs (the first 32 built-in sanity pairs, the
labelled winner shown as (A) or (B) by a seeded coin), same run, order swap on for every multiple-choice
judge (two questions per comparison). Timed, in comparisons per second:

- ours     : `Judge(method="mc")`: one forward pass reads the log-probabilities of " (A)" and " (B)"
             after each ordering; the few-shot block all questions share is computed once and kept for
             later calls (a warm-up call computes it, as a run's first chunk does), and
             the two orderings of a question share a row (their conversation and question computed once);
- ours, no prefix sharing: the same with the few-shot block's reuse turned off (what it contributes);
- generate : the same prompts, the judge's reply begun as "The answer is:", greedy generation of 4
             tokens through the same batched engine, the letter parsed from the text (a hard label):
             what reading log-probabilities instead of generating saves, everything else equal;
- generate, one at a time: the same, written the way people first write it, one `model.generate`
             call per question (on --naive-pairs pairs: its cost per comparison is flat);
- generate b16, b64: the same with plain batched, left-padded `model.generate` (batch 16 and 64);
- cot      : `Judge(method="mc", cot=True)`: reasoning generated first (--cot-max-new-tokens), on
             --cot-pairs pairs (it is slow; the rate is per comparison, so it compares);
- contrast : `Judge(method="contrast")`: four scored continuations per comparison, no swap.
- vllm, vllm prompt_logprobs (when vLLM is installed; fp32): `Judge(method="mc")` on the vLLM backend,
             which reads the option tokens in one decode step per (question, option) with prefix caching,
             against the same judge scoring " (A)" and " (B)" whole through `prompt_logprobs`.

Precision: every judge runs in the precision the stage picks (`--precision auto`: bf16 on CPUs that
multiply bf16 natively); "ours" and the one-at-a-time generating judge also run in fp32 (what
`from_pretrained` gives on CPU), so like-against-like ratios show what batching and log-probabilities
give apart from what bf16 gives.

Also prints each judge's agreement with the labels and the position consistency: the share of pairs
whose two orders pick the same winner. Without the swap a label's winner is whatever the one order
says, so it flips with the presentation order on the inconsistent pairs; with the swap the label
averages both orders and does not depend on the order at all.

    python bench/feedback.py [--pairs 32] [--cot-pairs 8] [--naive-pairs 8] [--batch-size 16] [--repeats 1]
                             [--precision auto] [--judge REF] [--device cpu|cuda] [--json]

`--judge` times another judge (a 1B-class model directory or cached hub id, say, on a GPU: `--device
cuda`); the default is the embedded model on the CPU, which the README's figures come from.
"""

import argparse
import json
import re
import time

import torch

from cai import constitution as c
from cai.engine import Engine, Sampling
from cai.judge import Judge, winner
from cai.models import PRECISION_CHOICES, cast_weights, inference_dtype
from cai.paths import bundled
from cai.records import read_preferences
from cai.stages.feedback import agreement_metrics, judged_pairs

LETTER = re.compile(r"\(?\b([AB])\b\)?")


def judge_prompts(engine: Engine, constitution, comparisons) -> list[str]:
    """Each comparison's question in both orders (A first, then swapped), the reply begun "The answer is:"."""
    contexts = []
    for comparison in comparisons:
        [principle] = comparison.principles
        for first, second in ((comparison.response_a, comparison.response_b),
                              (comparison.response_b, comparison.response_a)):
            contexts.append(engine.render(c.judge_messages(constitution, comparison.prompt, first, second, principle),
                                          assistant_prefix=c.JUDGE_ANSWER_PREFIX))
    return contexts


def hard_labels(replies: list[str]) -> list[list[float]]:
    """Generated replies of `judge_prompts` order -> [P(original A) shown first, shown second] per
    comparison as 1/0 (0.5 when no letter can be parsed)."""
    picks = []
    for reply in replies:
        match = LETTER.search(reply)
        picks.append(0.5 if match is None else 1.0 if match.group(1) == "A" else 0.0)
    return [[picks[2 * i], 1.0 - picks[2 * i + 1]] for i in range(len(replies) // 2)]


def generating_judge(engine: Engine, constitution, comparisons, max_new_tokens: int = 4) -> list[list[float]]:
    """The baseline: ask in both orders, generate the reply after "The answer is:", parse the letter."""
    outputs = engine.generate(judge_prompts(engine, constitution, comparisons), Sampling(max_new_tokens=max_new_tokens))
    return hard_labels([output.text for output in outputs])


def naive_generating_judge(engine: Engine, constitution, comparisons, max_new_tokens: int = 4) -> list[list[float]]:
    """The generating judge as usually written: one `model.generate` per question, no batching, no
    shared prefix. Same prompts, same parsing as `generating_judge`."""
    replies = []
    for text in judge_prompts(engine, constitution, comparisons):
        ids = engine.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(engine.model.device)
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=engine.tokenizer.eos_token_id)
        replies.append(engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return hard_labels(replies)


def batched_generating_judge(engine: Engine, constitution, comparisons, batch_size: int,
                             max_new_tokens: int = 4) -> list[list[float]]:
    """The generating judge on plain batched, left-padded `model.generate`."""
    tokenizer, replies = engine.tokenizer, []
    tokenizer.padding_side = "left"
    texts = judge_prompts(engine, constitution, comparisons)
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(engine.model.device)
        with torch.inference_mode():
            out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return hard_labels(replies)


def vllm_judges(args, constitution, comparisons) -> dict[str, float] | None:
    """Seconds of the mc judge on vLLM (fp32): option tokens read in a decode step, and whole options
    scored with prompt_logprobs. None when vLLM is not installed."""
    from cai.engine import EngineOptions, vllm_installed

    if not vllm_installed():
        return None
    engine = Engine.from_reference(args.judge, device=args.device, precision="fp32",
                                   options=EngineOptions(backend="vllm", max_model_len=4096))
    decode = Judge(engine, constitution, method="mc")
    scored = Judge(engine, constitution, method="mc")
    scored._options = None  # score " (A)" and " (B)" whole: prompt_logprobs
    decode.compare(comparisons[:2]), scored.compare(comparisons[:2])  # warm-up
    seconds = {"vllm": timed(lambda: decode.compare(comparisons))[1],
               "vllm_prompt_logprobs": timed(lambda: scored.compare(comparisons))[1]}
    engine.close()
    return seconds


def timed(fn):
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--cot-pairs", type=int, default=8)
    parser.add_argument("--naive-pairs", type=int, default=8, help="pairs the one-at-a-time generating judge runs on")
    parser.add_argument("--cot-max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all judges; the best time of each counts")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="of every judge but the fp32 pair (default: auto)")
    parser.add_argument("--judge", default="embedded:smollm2-135m-instruct",
                        help="model reference of the judge (default: the embedded model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    constitution = c.load("default")
    records = read_preferences(bundled("data/judge_sanity_pairs.jsonl"), default_source="sanity")[:args.pairs]
    comparisons, targets = judged_pairs(records, constitution, principles=1, seed=0)
    engine = Engine.from_reference(args.judge, batch_size=args.batch_size, device=args.device, precision="fp32")
    dtype = inference_dtype(args.device, args.precision)
    n, n_cot = len(comparisons), min(args.cot_pairs, len(comparisons))
    n_naive = min(args.naive_pairs, n)

    def unshared(pairs):
        engine.backend.MIN_SHARED_PREFIX = 10**9
        try:
            return Judge(engine, constitution, method="mc").compare(pairs)
        finally:
            engine.backend.MIN_SHARED_PREFIX = type(engine.backend).MIN_SHARED_PREFIX

    # Each judge as a function of the pairs it labels.
    fp32_runs = {
        "ours_fp32": lambda pairs: Judge(engine, constitution, method="mc").compare(pairs),
        "generate_one_at_a_time_fp32": lambda pairs: naive_generating_judge(engine, constitution, pairs[:n_naive]),
    }
    runs = {
        "ours": lambda pairs: Judge(engine, constitution, method="mc").compare(pairs),
        "ours_no_prefix_sharing": unshared,
        "generate": lambda pairs: generating_judge(engine, constitution, pairs),
        "generate_one_at_a_time": lambda pairs: naive_generating_judge(engine, constitution, pairs[:n_naive]),
        "generate_b16": lambda pairs: batched_generating_judge(engine, constitution, pairs, 16),
        "generate_b64": lambda pairs: batched_generating_judge(engine, constitution, pairs, 64),
        "cot": lambda pairs: Judge(engine, constitution, method="mc", cot=True,
                                   cot_max_new_tokens=args.cot_max_new_tokens).compare(pairs[:n_cot]),
        "contrast": lambda pairs: Judge(engine, constitution, method="contrast").compare(pairs),
    }
    # Round-robin over the judges, best time of each: this machine's load changes within a run.
    seconds = {name: float("inf") for name in (*fp32_runs, *runs)}
    values = {}
    for group, group_dtype in ((fp32_runs, torch.float32), (runs, dtype)):
        cast_weights(engine.model, group_dtype)
        # Untimed first calls: kernels and allocations warm for every judge (on two pairs), and ours
        # computes the few-shot block the engine keeps for later calls (on all: a run labels pairs chunk
        # after chunk and only its first chunk computes the block).
        Judge(engine, constitution, method="mc").compare(comparisons)
        for fn in group.values():
            fn(comparisons[:2])
        for _ in range(args.repeats):
            for name, fn in group.items():
                values[name], elapsed = timed(lambda fn=fn: fn(comparisons))
                seconds[name] = min(seconds[name], elapsed)
    ours, generated, cot, contrast = values["ours"], values["generate"], values["cot"], values["contrast"]
    ours_s, unshared_s, generate_s = seconds["ours"], seconds["ours_no_prefix_sharing"], seconds["generate"]
    cot_s, contrast_s = seconds["cot"], seconds["contrast"]

    def agreement(probabilities, wanted):
        return sum(winner(p) is not None and winner(p) == winner(t) for p, t in zip(probabilities, wanted,
                                                                                    strict=True)) / len(wanted)

    ours_metrics = agreement_metrics(ours, targets)
    rates = {"ours_fp32": n / seconds["ours_fp32"], "ours": n / ours_s, "ours_no_prefix_sharing": n / unshared_s, "generate": n / generate_s,
             "generate_one_at_a_time": n_naive / seconds["generate_one_at_a_time"],
             "generate_one_at_a_time_fp32": n_naive / seconds["generate_one_at_a_time_fp32"],
             "generate_b16": n / seconds["generate_b16"], "generate_b64": n / seconds["generate_b64"],
             "cot": n_cot / cot_s, "contrast": n / contrast_s}
    if (vllm_seconds := vllm_judges(args, constitution, comparisons)) is not None:
        rates.update({name: n / value for name, value in vllm_seconds.items()})
    result = {
        "judge": args.judge, "device": args.device, "precision": str(dtype).removeprefix("torch."), "pairs": n, "cot_pairs": n_cot, "naive_pairs": n_naive, "batch_size": args.batch_size, "repeats": args.repeats,
        "comparisons_per_s": rates,
        "ratio_vs_generate": rates["ours"] / rates["generate"],
        "ratio_vs_generate_b16": rates["ours"] / rates["generate_b16"],
        "ratio_vs_generate_b64": rates["ours"] / rates["generate_b64"],
        "ratio_vs_vllm": rates["ours_fp32"] / rates["vllm"] if "vllm" in rates else None,
        "ratio_vllm_decode_vs_prompt_logprobs": (rates["vllm"] / rates["vllm_prompt_logprobs"]
                                                 if "vllm" in rates else None),
        "ratio_vs_generate_one_at_a_time": rates["ours"] / rates["generate_one_at_a_time"],
        "ratio_fp32_vs_generate_one_at_a_time_fp32": rates["ours_fp32"] / rates["generate_one_at_a_time_fp32"],
        "ratio_vs_generate_one_at_a_time_fp32": rates["ours"] / rates["generate_one_at_a_time_fp32"],
        "ratio_no_sharing_vs_generate": rates["ours_no_prefix_sharing"] / rates["generate"],
        "ratio_vs_cot": rates["ours"] / rates["cot"], "ratio_vs_contrast": rates["ours"] / rates["contrast"],
        "position_consistency": {
            "ours": ours_metrics["position_consistency"],
            "generate": sum(winner(a) is not None and winner(a) == winner(b) for a, b in generated) / n,
            "cot": sum(bool(v.agree) for v in cot) / n_cot,
        },
        "agreement": {
            "ours_without_swap": ours_metrics["agreement_first"], "ours_with_swap": ours_metrics["agreement"],
            "generate_without_swap": agreement([g[0] for g in generated], targets),
            "cot_with_swap": agreement([v.p_a for v in cot], targets[:n_cot]),
            "contrast": agreement([v.p_a for v in contrast], targets),
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{n} pairs (CoT: {n_cot}, one at a time: {n_naive}), judge {args.judge}, {args.device}, batch "
          f"{args.batch_size}, swap on for mc, best of {args.repeats}; fp32 where named, else {result['precision']}")
    for name, rate in rates.items():
        print(f"{name:<28}: {rate:7.3f} comparisons/s")
    print(f"ratio ours / generate, one at a time: {result['ratio_vs_generate_one_at_a_time']:.1f}x "
          f"(both fp32: {result['ratio_fp32_vs_generate_one_at_a_time_fp32']:.1f}x; ours against the fp32 "
          f"one: {result['ratio_vs_generate_one_at_a_time_fp32']:.1f}x)")
    print(f"ratio ours / generate, same batching: {result['ratio_vs_generate']:.1f}x "
          f"(without prefix sharing: {result['ratio_no_sharing_vs_generate']:.1f}x)")
    print(f"ratio ours / batched model.generate: {result['ratio_vs_generate_b16']:.1f}x (b16), "
          f"{result['ratio_vs_generate_b64']:.1f}x (b64)")
    if result["ratio_vs_vllm"] is None:
        print("vllm: not installed here (no rows); see docs/engines.md")
    else:
        print(f"ratio ours fp32 / vllm fp32: {result['ratio_vs_vllm']:.2f}x; vllm decode-step options / vllm "
              f"prompt_logprobs: {result['ratio_vllm_decode_vs_prompt_logprobs']:.2f}x")
    print(f"ratio ours / cot        : {result['ratio_vs_cot']:.1f}x")
    print(f"ratio ours / contrast   : {result['ratio_vs_contrast']:.1f}x")
    consistency = result["position_consistency"]
    print(f"position consistency (both orders pick the same winner): ours {consistency['ours']:.2f}, "
          f"generate {consistency['generate']:.2f}, cot {consistency['cot']:.2f}")
    print(f"  without swap the label follows the first order: it flips with the presentation order on "
          f"{1 - consistency['ours']:.0%} of pairs; with swap: on none (both orders averaged)")
    agreement_ = result["agreement"]
    print(f"agreement with the labels: ours {agreement_['ours_without_swap']:.2f} without swap, "
          f"{agreement_['ours_with_swap']:.2f} with swap; generate {agreement_['generate_without_swap']:.2f}; "
          f"cot {agreement_['cot_with_swap']:.2f}; contrast {agreement_['contrast']:.2f}")


if __name__ == "__main__":
    main()
