"""GPU figures on a 7B-shaped model with random weights: generation on both backends, QLoRA training.

Nothing is downloaded: the model is a Llama-shaped config (hidden 4096, 32 layers, 32 heads, MLP
11008; the embedded model's tokenizer and vocabulary, 6.9B parameters) with random weights. vLLM is
told to ignore end-of-turn tokens, so it always writes --max-new-tokens; the HF engine stops where a
random argmax happens to end the turn. Rates count the tokens each produced.

- generation: cai's transformers engine (bf16) against vLLM (`load_format="dummy"`, bf16), the same
  --prompts chat prompts and --max-new-tokens, greedy; tok/s of each and the ratio vLLM / HF engine;
- QLoRA: the model saved once with random weights, loaded 4-bit NF4 through cai's loader, LoRA r=16 on
  every linear layer, gradient checkpointing, --train-steps steps of --seq-len-token rows; peak GPU
  memory (torch.cuda.max_memory_allocated) and trained tok/s.

Without CUDA (or with --dry-run) it builds the configs and checks its arguments, and prints the plan.

    python bench/gpu.py [--dry-run] [--prompts 256] [--max-new-tokens 256] [--batch-size 64]
                        [--train-steps 10] [--seq-len 1024] [--train-batch 4] [--skip-vllm] [--skip-train]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
TOKENIZER = "embedded:smollm2-135m-instruct"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="build the configs and stop (default without CUDA)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="the HF engine's batch")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--tokenizer", default=TOKENIZER, help="model reference whose tokenizer (and vocabulary) "
                                                                "the 7B shape uses (default: the embedded model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "batch_size", "train_steps", "seq_len", "train_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    return args


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       torch_dtype="bfloat16", tie_word_embeddings=False, **SHAPE)


def parameter_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def prompts(count: int) -> list[list[dict]]:
    from cai.paths import bundled
    from cai.records import read_prompts

    records = read_prompts(bundled("data/helpful_prompts.jsonl"))
    return [[{"role": "user", "content": records[i % len(records)]["prompt"]}] for i in range(count)]


def write_model_dir(directory: Path, config, tokenizer, weights: bool) -> None:
    """config.json + tokenizer (+ random bf16 weights for the 4-bit loader when `weights`)."""
    import torch
    from transformers import AutoModelForCausalLM

    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if weights:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(directory)
        del model
        torch.cuda.empty_cache()


def hf_generation(config, tokenizer, conversations, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cai.engine import Engine, Sampling

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    engine = Engine(model, tokenizer, batch_size=args.batch_size)
    engine.generate_chat(conversations[:2], Sampling(max_new_tokens=8))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate_chat(conversations, Sampling(max_new_tokens=args.max_new_tokens))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del engine, model
    torch.cuda.empty_cache()
    tokens = sum(o.num_tokens for o in out)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def vllm_generation(directory: Path, tokenizer, conversations, args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(directory), load_format="dummy", dtype="bfloat16",
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=True)
    startup = time.perf_counter() - start
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in conversations]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids[:2]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "startup_s": startup}


def qlora_training(directory: Path, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from cai.models import load_causal_lm

    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_causal_lm(str(directory), quantize="4bit", device="cuda")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, len(tokenizer), (args.train_batch, args.seq_len), generator=generator).cuda()
    model.train()
    seconds = 0.0
    for step in range(args.train_steps + 1):  # step 0 warms up, untimed
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step:
            seconds += time.perf_counter() - start
    tokens = args.train_steps * args.train_batch * args.seq_len
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tokens_per_s": tokens / seconds,
            "steps": args.train_steps}


def main(argv=None) -> None:
    args = parse(argv)
    import torch

    from cai.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    config = model_config(tokenizer)
    params = parameter_count(config)
    dry = args.dry_run or not torch.cuda.is_available()
    plan = {"shape": SHAPE, "vocab_size": config.vocab_size, "parameters_b": params / 1e9, "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "train": {"steps": args.train_steps, "seq_len": args.seq_len, "batch": args.train_batch},
            "dry_run": dry}
    if dry:
        plan["note"] = "dry run: configs built and arguments checked; run on a CUDA machine for the figures"
        print(json.dumps(plan) if args.json else "\n".join(f"{k}: {v}" for k, v in plan.items()))
        return
    conversations = prompts(args.prompts)
    result = dict(plan, device=torch.cuda.get_device_name())
    with tempfile.TemporaryDirectory(prefix="cai-gpu-bench-") as tmp:
        directory = Path(tmp)
        write_model_dir(directory, config, tokenizer, weights=not args.skip_train)
        result["hf_engine"] = hf_generation(config, tokenizer, conversations, args)
        if not args.skip_vllm:
            result["vllm"] = vllm_generation(directory, tokenizer, conversations, args)
            result["ratio_vllm_vs_hf_engine"] = result["vllm"]["tokens_per_s"] / result["hf_engine"]["tokens_per_s"]
        if not args.skip_train:
            result["qlora"] = qlora_training(directory, args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}: 7B-shaped model ({params / 1e9:.2f}B parameters, random weights), "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens, greedy, bf16")
    print(f"HF engine (batch {args.batch_size}): {result['hf_engine']['tokens_per_s']:8.0f} tok/s")
    if "vllm" in result:
        print(f"vLLM                 : {result['vllm']['tokens_per_s']:8.0f} tok/s "
              f"(start-up {result['vllm']['startup_s']:.0f} s, not counted); ratio vLLM / HF engine "
              f"{result['ratio_vllm_vs_hf_engine']:.1f}x")
    if "qlora" in result:
        print(f"QLoRA r=16, {args.train_batch} x {args.seq_len} tokens a step: peak "
              f"{result['qlora']['peak_gib']:.1f} GiB, {result['qlora']['tokens_per_s']:.0f} tok/s trained")


if __name__ == "__main__":
    main()
