"""Generation throughput: cai's engine against `model.generate` (one prompt a call, and batched) and vLLM.

Same model (embedded SmolLM2-135M-Instruct), same 64 prompts, same max new tokens, greedy, same run.
Baselines: the loop people write first (one `generate` per prompt), batched left-padded `generate` at
batch 16 and 64 (the honest transformers baseline), and vLLM when it is installed (fp32 only; its start-up
time is printed apart and not counted).
Prints tokens/s for each, the ratios, and the share of this machine's limit reached: 2 x parameters x
tokens/s (forward FLOP/s actually spent) over the matmul FLOP/s measured first, in fp32 and in bf16.

Both run in fp32 (the dtype `from_pretrained` gives on CPU) and then, when `--precision` resolves to
something else (`auto`: bf16 on CPUs that multiply bf16 natively), both again in that precision: the
ratio of like against like is the engine's own gain; cai's default against the naive fp32 loop is what a
user sees. Each engine row shows its share of both limits: the fp32 one (the yardstick the project set)
and the one of the precision it ran in.

    python bench/generation.py [--prompts 64] [--max-new-tokens 64] [--batch-size 64] [--precision auto]
"""

import argparse
import json
import time

import torch

from cai.engine import Engine, Sampling
from cai.models import PRECISION_CHOICES, cast_weights, inference_dtype, load_causal_lm, parameter_count
from cai.paths import bundled
from cai.records import read_prompts


def matmul_flops(dtype=torch.float32, size: int = 1024, repeats: int = 20) -> float:
    """Peak-ish FLOP/s of this CPU on square matmuls in `dtype` (the ceiling a transformer can approach)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
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


def batched(model, tokenizer, conversations, max_new_tokens, batch_size) -> int:
    """Plain batched `generate`, left-padded; tokens counted up to each row's end of turn."""
    from cai.engine import stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    tokenizer.padding_side = "left"
    tokens = 0
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations[start:start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                             pad_token_id=tokenizer.pad_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token in stops]
            tokens += ends[0] + 1 if ends else len(row)
    return tokens


def vllm_run(conversations, args) -> tuple[int, float, float] | None:
    """(tokens, seconds, start-up seconds) of the vLLM backend in fp32, or None when vLLM is missing."""
    from cai.engine import EngineOptions, vllm_installed

    if not vllm_installed():
        return None
    start = time.perf_counter()
    engine = Engine.from_reference("embedded:smollm2-135m-instruct", device="cpu", precision="fp32",
                                   options=EngineOptions(backend="vllm", max_model_len=2048))
    startup = time.perf_counter() - start
    start = time.perf_counter()
    outputs = engine.generate_chat(conversations, Sampling(max_new_tokens=args.max_new_tokens))
    seconds = time.perf_counter() - start
    engine.close()
    return sum(o.num_tokens for o in outputs), seconds, startup


def engine_run(model, tokenizer, conversations, args) -> tuple[int, float]:
    """(tokens, seconds) of the engine on every conversation."""
    engine = Engine(model, tokenizer, batch_size=args.batch_size)
    start = time.perf_counter()
    outputs = engine.generate_chat(conversations, Sampling(max_new_tokens=args.max_new_tokens))
    return sum(o.num_tokens for o in outputs), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help="the engine's (default: auto)")
    parser.add_argument("--prompts-file", help="JSONL/CSV prompt set (default: data/helpful_prompts.jsonl)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    limits = {torch.float32: matmul_flops(torch.float32), torch.bfloat16: matmul_flops(torch.bfloat16)}
    model, tokenizer = load_causal_lm("embedded:smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    model.eval()
    conversations = [[{"role": "user", "content": p}] for p in prompts_for(args.prompts, args.prompts_file)]
    params = parameter_count(model)

    runs = {}
    dtype = inference_dtype("cpu", args.precision)
    for run_dtype in dict.fromkeys((torch.float32, dtype)):
        cast_weights(model, run_dtype)
        name = str(run_dtype).removeprefix("torch.")
        start = time.perf_counter()
        with torch.inference_mode():
            naive_tokens = naive(model, tokenizer, conversations, args.max_new_tokens)
        runs[f"naive {name}"] = (naive_tokens, time.perf_counter() - start, run_dtype)
        for size in (16, 64):
            start = time.perf_counter()
            with torch.inference_mode():
                tokens = batched(model, tokenizer, conversations, args.max_new_tokens, size)
            runs[f"generate b{size} {name}"] = (tokens, time.perf_counter() - start, run_dtype)
        runs[f"cai engine {name}"] = (*engine_run(model, tokenizer, conversations, args), run_dtype)

    del model
    startup = None
    if (vllm := vllm_run(conversations, args)) is not None:
        runs["vllm float32"] = (vllm[0], vllm[1], torch.float32)
        startup = vllm[2]

    naive_tps = {run_dtype: tokens / seconds for name, (tokens, seconds, run_dtype) in runs.items()
                 if name.startswith("naive")}
    fp32_naive = naive_tps[torch.float32]
    batched_tps = {run_dtype: tokens / seconds for name, (tokens, seconds, run_dtype) in runs.items()
                   if name.startswith("generate b16")}
    rows = {}
    for name, (tokens, seconds, run_dtype) in runs.items():
        tps = tokens / seconds
        rows[name] = {"dtype": str(run_dtype).removeprefix("torch."), "tokens": tokens, "seconds": seconds, "tokens_per_s": tps, "ratio": tps / naive_tps[run_dtype],
                      "ratio_vs_generate_b16": tps / batched_tps[run_dtype],
                      "ratio_vs_naive_fp32": tps / fp32_naive,
                      "share_of_fp32_limit": 2 * params * tps / limits[torch.float32],
                      "share_of_own_limit": 2 * params * tps / limits[run_dtype]}
    result = {"prompts": len(conversations), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "fp32_matmul_gflops": limits[torch.float32] / 1e9, "bf16_matmul_gflops": limits[torch.bfloat16] / 1e9,
              "params_m": params / 1e6, "vllm_startup_s": startup, "runs": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU matmul at 1024^2: fp32 {limits[torch.float32] / 1e9:.1f} GFLOP/s, bf16 "
          f"{limits[torch.bfloat16] / 1e9:.1f} GFLOP/s; model {params / 1e6:.0f}M parameters")
    for name, row in rows.items():
        fp32 = row["dtype"] == "float32"
        own = "" if fp32 else f", {row['share_of_own_limit']:.0%} of the {row['dtype']} limit"
        versus = "" if fp32 else f", {row['ratio_vs_naive_fp32']:4.1f}x naive fp32"
        print(f"{name:20s}: {row['tokens']} tokens in {row['seconds']:6.1f} s = {row['tokens_per_s']:6.1f} tok/s "
              f"= {row['ratio']:4.1f}x naive, {row['ratio_vs_generate_b16']:4.2f}x generate b16 in the same "
              f"precision{versus} ({row['share_of_fp32_limit']:.0%} of the fp32 limit{own})")
    if startup is not None:
        print(f"vllm start-up (not counted above): {startup:.0f} s")
    else:
        print("vllm: not installed here (no row); see docs/engines.md")


if __name__ == "__main__":
    main()
