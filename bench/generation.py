"""Generation throughput: cai's engine against a naive loop of one `model.generate` per prompt.

Same model (embedded SmolLM2-135M-Instruct), same 64 prompts, same max new tokens, greedy, same run.
Prints tokens/s for both, the ratio, and the share of this machine's limit the engine reaches:
2 x parameters x tokens/s (forward FLOP/s actually spent) over the fp32 matmul FLOP/s measured first.

    python bench/generation.py [--prompts 64] [--max-new-tokens 64] [--batch-size 64]
"""

import argparse
import json
import time

import torch

from cai.engine import Engine, Sampling
from cai.models import load_causal_lm, parameter_count
from cai.paths import bundled
from cai.records import read_prompts


def matmul_flops(size: int = 1024, repeats: int = 20) -> float:
    """Peak-ish fp32 FLOP/s of this CPU on square matmuls (the ceiling a transformer can approach)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def prompts_for(count: int, path: str | None = None) -> list[str]:
    records = read_prompts(path or bundled("data/helpful_prompts.jsonl"))
    return [r["prompt"] for r in records[:count]]


def naive(model, tokenizer, conversations, max_new_tokens) -> int:
    """The loop people write first: one generate() call per prompt."""
    tokens = 0
    for conversation in conversations:
        inputs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompts-file", help="JSONL/CSV prompt set (default: data/helpful_prompts.jsonl)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    flops = matmul_flops()
    model, tokenizer = load_causal_lm("embedded:smollm2-135m-instruct", device="cpu")
    model.eval()
    conversations = [[{"role": "user", "content": p}] for p in prompts_for(args.prompts, args.prompts_file)]
    params = parameter_count(model)

    start = time.perf_counter()
    with torch.inference_mode():
        naive_tokens = naive(model, tokenizer, conversations, args.max_new_tokens)
    naive_s = time.perf_counter() - start

    engine = Engine(model, tokenizer, batch_size=args.batch_size)
    start = time.perf_counter()
    outputs = engine.generate_chat(conversations, Sampling(max_new_tokens=args.max_new_tokens))
    engine_s = time.perf_counter() - start
    engine_tokens = sum(o.num_tokens for o in outputs)

    naive_tps, engine_tps = naive_tokens / naive_s, engine_tokens / engine_s
    result = {
        "prompts": len(conversations), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "matmul_gflops": flops / 1e9, "params_m": params / 1e6,
        "naive_tokens_per_s": naive_tps, "engine_tokens_per_s": engine_tps, "ratio": engine_tps / naive_tps,
        "naive_share_of_limit": 2 * params * naive_tps / flops, "engine_share_of_limit": 2 * params * engine_tps / flops,
        "naive_s": naive_s, "engine_s": engine_s,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU fp32 matmul: {flops / 1e9:.1f} GFLOP/s; model {params / 1e6:.0f}M parameters")
    print(f"naive loop : {naive_tokens} tokens in {naive_s:.1f} s = {naive_tps:.1f} tok/s "
          f"({result['naive_share_of_limit']:.0%} of limit)")
    print(f"cai engine : {engine_tokens} tokens in {engine_s:.1f} s = {engine_tps:.1f} tok/s "
          f"({result['engine_share_of_limit']:.0%} of limit)")
    print(f"ratio      : {result['ratio']:.1f}x")


if __name__ == "__main__":
    main()
