"""Preference-model throughput: cai's trainer against trl's RewardTrainer, and batched scoring.

Same model (embedded SmolLM2-135M-Instruct with a new score head, LoRA r=16 as `cai pm train` uses),
same tokenized pairs (data/helpful_prefs_example.jsonl, chat template applied, left-truncated to
--max-length), same batches (same seed), same run:

1. training tokens/s of cai's SoftRewardTrainer (soft-label loss) against trl's RewardTrainer, both
   with the precision cai picks for the device (`precision_for`; on CPU: fp32 weights, bf16 autocast
   where the CPU has native bf16, no gradient checkpointing). Target: at least 1x (the soft label must
   cost nothing);
2. the gain of that per-device choice over trl's default config (bf16 + gradient checkpointing),
   on a shorter run (--default-steps), since those defaults are slow on a CPU without fast bf16;
   When the device's choice is bf16 autocast (a CPU with native bf16), cai's trainer also runs in plain
   fp32, and the gain of autocast is printed;
3. scoring pairs/s of `RewardScorer` (length-sorted batches, no gradients) against one forward pass
   per response.

Tokens are the non-padding tokens the trainers saw; times are wall-clock around `train()`.

    python bench/pm.py [--pairs 64] [--steps 4] [--default-steps 2] [--batch-size 4] [--max-length 256] [--json]
"""

import argparse
import json
import tempfile
import time

import torch

from cai.models import DEFAULT_MODEL, load_sequence_classifier, lora_config, precision_for
from cai.paths import bundled
from cai.records import read_preferences
from cai.stages import pm


def fresh_model(reference: str):
    from transformers import set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(0)  # the same random score head for every trainer
    with suppress_seqcls_warning():
        return load_sequence_classifier(reference, device="cpu")


def train_throughput(trainer_class, collator, rows, reference, *, steps, batch_size, lora_r,
                     precision_kwargs) -> dict:
    """Tokens/s of `steps` optimizer steps of one trainer on a fresh model."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig

    model, tokenizer = fresh_model(reference)
    with tempfile.TemporaryDirectory() as output_dir:
        args = RewardConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps,
                            learning_rate=1e-4, seed=0, data_seed=0, max_length=None, save_strategy="no",
                            report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
                            logging_steps=steps, **precision_kwargs)
        kwargs = {"data_collator": collator(pad_token_id=tokenizer.pad_token_id)} if collator else {}
        trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer,
                                peft_config=lora_config(lora_r, task_type="SEQ_CLS", modules_to_save=["score"]),
                                **kwargs)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = trainer._total_train_tokens
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def scoring_throughput(reference: str, records: list[dict], batch_size: int, max_length: int) -> dict:
    """Pairs/s: RewardScorer's batches against one forward per response (same model, same ids)."""
    model, tokenizer = fresh_model(reference)
    scorer = pm.RewardScorer(model, tokenizer, max_length=max_length, batch_size=batch_size)
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    encoded, _ = pm.encode_responses(tokenizer, prompts, responses, max_length)
    start = time.perf_counter()
    with torch.inference_mode():
        naive = [float(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, 0]) for ids in encoded]
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = scorer.rewards(prompts, responses)
    batched_s = time.perf_counter() - start
    max_difference = max(abs(a - b) for a, b in zip(naive, batched, strict=True))
    return {"pairs": len(records), "naive_pairs_per_s": len(records) / naive_s,
            "batched_pairs_per_s": len(records) / batched_s, "ratio": naive_s / batched_s,
            "max_reward_difference": max_difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=64, help="pairs of data/helpful_prefs_example.jsonl to use")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps for cai's and trl's trainer")
    parser.add_argument("--default-steps", type=int, default=2,
                        help="optimizer steps for trl's default config (bf16 + checkpointing); 0 skips it")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--score-batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    from trl import RewardTrainer

    records = read_preferences(bundled("data/helpful_prefs_example.jsonl"), limit=args.pairs)
    _, tokenizer = fresh_model(args.model)
    rows, truncated = pm._training_rows(tokenizer, records, args.max_length)
    trl_rows = [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows]
    collator, soft_trainer = pm.trainer_classes()
    device_kwargs = precision_for("cpu").trainer_kwargs()
    common = {"batch_size": args.batch_size, "lora_r": args.lora_r}

    # A warm-up step first, so neither measured trainer pays for one-time setup.
    train_throughput(soft_trainer, collator, rows, args.model, steps=1, precision_kwargs=device_kwargs, **common)
    ours = train_throughput(soft_trainer, collator, rows, args.model, steps=args.steps,
                            precision_kwargs=device_kwargs, **common)
    trl_proper = train_throughput(RewardTrainer, None, trl_rows, args.model, steps=args.steps,
                                  precision_kwargs=device_kwargs, **common)
    ours_fp32 = None
    if device_kwargs["bf16"]:
        fp32_kwargs = dict(device_kwargs, bf16=False)
        ours_fp32 = train_throughput(soft_trainer, collator, rows, args.model, steps=args.steps,
                                     precision_kwargs=fp32_kwargs, **common)
    trl_default = None
    if args.default_steps:
        trl_default = train_throughput(RewardTrainer, None, trl_rows, args.model, steps=args.default_steps,
                                       precision_kwargs={}, **common)
    scoring = scoring_throughput(args.model, records, args.score_batch_size, args.max_length)

    result = {"model": args.model, "pairs": len(records), "batch_size": args.batch_size,
              "max_length": args.max_length, "truncated_sequences": truncated, "lora_r": args.lora_r,
              "cai_trainer": ours, "cai_trainer_fp32": ours_fp32, "trl_reward_trainer": trl_proper,
              "gain_vs_fp32": ours["tokens_per_s"] / ours_fp32["tokens_per_s"] if ours_fp32 else None, "trl_default_config": trl_default,
              "ratio_vs_trl": ours["tokens_per_s"] / trl_proper["tokens_per_s"],
              "gain_vs_trl_defaults": ours["tokens_per_s"] / trl_default["tokens_per_s"] if trl_default else None,
              "scoring": scoring}
    if args.json:
        print(json.dumps(result))
        return

    def line(name, run):
        return (f"{name:<44}: {run['tokens']:>6} tokens in {run['seconds']:6.1f} s = {run['tokens_per_s']:6.1f} tok/s "
                f"(bf16={run['bf16']}, checkpointing={run['gradient_checkpointing']}, {run['steps']} steps)")

    print(f"{args.model}, LoRA r={args.lora_r}, {len(records)} pairs, batch {args.batch_size}, "
          f"max length {args.max_length} ({truncated} sequences truncated)")
    print(line("cai SoftRewardTrainer (per-device precision)", ours))
    print(line("trl RewardTrainer (same precision)", trl_proper))
    if ours_fp32:
        print(line("cai SoftRewardTrainer, plain fp32", ours_fp32))
    if trl_default:
        print(line("trl RewardTrainer (trl's default config)", trl_default))
    print(f"ratio vs trl RewardTrainer                  : {result['ratio_vs_trl']:.2f}x")
    if ours_fp32:
        print(f"gain of bf16 autocast over plain fp32       : {result['gain_vs_fp32']:.2f}x")
    if trl_default:
        print(f"gain vs trl's defaults (bf16 + checkpointing): {result['gain_vs_trl_defaults']:.1f}x")
    print(f"scoring: batched {scoring['batched_pairs_per_s']:.1f} pairs/s vs one forward per response "
          f"{scoring['naive_pairs_per_s']:.1f} pairs/s = {scoring['ratio']:.1f}x "
          f"(max reward difference {scoring['max_reward_difference']:.1e})")


if __name__ == "__main__":
    main()
