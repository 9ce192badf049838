"""`cai sft`: the loss mask, training lowers the loss, standalone output, helpful mix, resume, skip."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.engine import Engine, Generation
from cai.errors import RecordsError
from cai.models import load_causal_lm
from cai.stages import sft
from cai.stages.base import NullReporter, StageContext
from cai.stages.sft import SFTConfig

FINALS = [
    ("How do I pick my neighbour's lock?", "I can't help you get into someone else's home. A locksmith can help with your own."),
    ("Write an insult about my coworker.", "I'd rather not write insults. If something is bothering you, I can help you say it kindly."),
    ("How do I make a fake ID?", "I can't help make fake IDs; they are illegal. I can explain how to get a real one."),
    ("Tell me how to hack my ex's phone.", "I won't help access someone's phone without permission; that is illegal."),
    ("How can I cheat on my exam?", "I can't help with cheating, but I can help you make a study plan."),
    ("How do I poison a dog?", "I can't help hurt an animal. If a dog worries you, contact animal control."),
]


@pytest.fixture
def critique_file(tmp_path):
    path = tmp_path / "critique.jsonl"
    rows = [{"id": f"r{i}", "prompt": prompt, "initial": "Sure, here is how.", "rounds": [], "final": final,
             "model": "x"} for i, (prompt, final) in enumerate(FINALS)]
    rows.append({"id": "empty", "prompt": "Anything?", "initial": "", "rounds": [], "final": "  ", "model": "x"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def helpful_file(tmp_path):
    path = tmp_path / "helpful.jsonl"
    path.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"Explain topic number {i} briefly."}) + "\n"
                            for i in range(20)))
    return path


def cfg_for(critique_file, tmp_path, model, **overrides):
    values = {"data": str(critique_file), "out": str(tmp_path / "sft"), "model": model, "lr": 5e-3,
              "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 256, "save_steps": 100}
    values.update(overrides)
    return SFTConfig(**values)


def completion_logprob(engine, pairs) -> float:
    """Mean per-token log-probability of each answer (and the end-of-turn token) after its prompt."""
    contexts = [engine.render([{"role": "user", "content": prompt}]) for prompt, _ in pairs]
    scores = engine.score(contexts, [answer + "<|im_end|>" for _, answer in pairs])
    return sum(s.mean_logprob for s in scores) / len(scores)


# ----------------------------------------------------------------------------- the loss mask


def test_the_loss_mask_covers_exactly_the_answer_tokens(tiny_model_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    examples = [sft.example(prompt, answer) for prompt, answer in FINALS[:3]]
    examples.append(sft.example([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Help me steal a car."}], "No, I can't help with that."))
    trainer = sft.build_trainer(SFTConfig(lora_r=0, max_steps=1), model, tokenizer, examples, tmp_path, "cpu")
    rows = [trainer.train_dataset[i] for i in range(len(examples))]
    for item, row in zip(examples, rows, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        targets = [i for i, label in enumerate(labels) if label != -100]
        start = targets[0]
        assert targets == list(range(start, len(ids)))  # one contiguous span at the end
        assert [labels[i] for i in targets] == ids[start:]
        prompt = tokenizer.apply_chat_template(item["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids[:start]) == prompt  # the whole prompt, template included, is masked
        answer = item["completion"][0]["content"]
        # The answer, then the end-of-turn token that closes it and the template's newline after it.
        assert tokenizer.decode(ids[start:]) == answer + "<|im_end|>\n"
    # Batching pads with ignored labels and keeps every target.
    batch = trainer.data_collator(rows)
    assert int((batch["labels"] != -100).sum()) == sum(sum(label != -100 for label in r["labels"]) for r in rows)


# ----------------------------------------------------------------------------- training


def test_sft_lowers_the_loss_and_writes_a_standalone_model(critique_file, tmp_path, tiny_model_dir, tiny_engine,
                                                            monkeypatch):
    before = completion_logprob(tiny_engine, FINALS)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=8)
    result = sft.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    out = tmp_path / "sft"
    trained = AutoModelForCausalLM.from_pretrained(out)  # no adapter step
    assert not any("lora" in name for name in trained.state_dict())
    after = completion_logprob(Engine(trained, tiny_engine.tokenizer), FINALS)
    assert after > before + 0.1, (before, after)  # measured: -6.22 -> -6.00 nats per token
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "checkpoints").exists()
    assert result.counts["examples"] == 6 and result.counts["steps"] == 8
    assert result.counts["rejected/empty-final"] == 1
    assert [json.loads(line)["id"] for line in (out / "rejected.jsonl").read_text().splitlines()] == ["empty"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["final_loss"] is not None

    # Running it again does no work: nothing is loaded or trained.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage must not load or train anything")

    import cai.models

    monkeypatch.setattr(sft, "build_trainer", refuse)
    monkeypatch.setattr(cai.models, "load_causal_lm", refuse)
    again = sft.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    assert again.skipped


def test_bf16_autocast_training_on_a_cpu_with_native_bf16_keeps_fp32_weights(critique_file, tmp_path,
                                                                             tiny_model_dir, tiny_engine, native_bf16):
    from cai.models import precision_for

    precision = precision_for("cpu")
    assert precision.bf16 and precision.fp32_weights and not precision.gradient_checkpointing
    before = completion_logprob(tiny_engine, FINALS)
    sft.run(cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=8), StageContext(device="cpu"))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert completion_logprob(Engine(trained, tiny_engine.tokenizer), FINALS) > before + 0.1


def test_full_fine_tuning_with_lora_r_0(critique_file, tmp_path, tiny_model_dir, tiny_engine):
    before = completion_logprob(tiny_engine, FINALS)
    sft.run(cfg_for(critique_file, tmp_path, tiny_model_dir, lora_r=0, lr=2e-3), StageContext(device="cpu"))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert completion_logprob(Engine(trained, tiny_engine.tokenizer), FINALS) > before + 0.3
    assert not (tmp_path / "sft" / "adapter").exists()


def test_qlora_4bit_trains_and_saves_a_full_precision_model(critique_file, tmp_path, tiny_model_dir):
    result = sft.run(cfg_for(critique_file, tmp_path, tiny_model_dir, quantize="4bit", lora_r=8, max_steps=2),
                     StageContext(device="cpu"))
    assert result.counts["steps"] == 2
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_an_interrupted_run_resumes_from_its_last_checkpoint(critique_file, tmp_path, tiny_model_dir, monkeypatch):
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=4, save_steps=2, per_device_train_batch_size=2)
    real_callback = sft.report_callback
    interrupted = []

    def interrupting(reporter):
        callback = real_callback(reporter)
        interrupted.append(callback)
        step_end = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            step_end(args, state, control, **kwargs)
            if state.global_step == 3:  # checkpoint-2 is on disk; step 3 is lost with the kill
                raise KeyboardInterrupt

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(sft, "report_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    assert (tmp_path / "sft" / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["status"] == "partial"
    (tmp_path / "sft" / "checkpoints" / "checkpoint-3").mkdir()  # what a kill while saving leaves

    monkeypatch.setattr(sft, "report_callback", real_callback)
    reporter = NullReporter()
    result = sft.run(cfg, StageContext(reporter=reporter, device="cpu"))
    assert any("resuming training from" in m and m.endswith("checkpoint-2") for m in reporter.messages)
    assert result.counts["steps"] == 4
    # The summary's loss starts at step 1, logged before the interruption, not at the resumed step 3.
    assert result.metrics["first_loss"] == pytest.approx(interrupted[0].losses[0])
    assert not (tmp_path / "sft" / "checkpoints").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")


def _interrupting_at_step(monkeypatch, step: int, interrupts: int):
    """sft's report callback sends this process `interrupts` SIGINTs (Ctrl-C) at the end of `step`."""
    import os
    import signal

    real_callback = sft.report_callback

    def interrupting(reporter):
        callback = real_callback(reporter)
        step_end = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            step_end(args, state, control, **kwargs)
            if state.global_step == step:
                for _ in range(interrupts):
                    os.kill(os.getpid(), signal.SIGINT)

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(sft, "report_callback", interrupting)
    return real_callback


def test_ctrl_c_saves_the_step_under_way_and_the_run_resumes_from_it(critique_file, tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    import signal

    handler = signal.getsignal(signal.SIGINT)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=5, save_steps=100, per_device_train_batch_size=2)
    real_callback = _interrupting_at_step(monkeypatch, 3, interrupts=1)
    reporter = NullReporter()
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(reporter=reporter, device="cpu"))
    # save_steps=100 would have saved nothing before step 100: the interrupted step was saved instead
    assert [p.name for p in (tmp_path / "sft" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    assert any(m.startswith("interrupted: saving a checkpoint") for m in reporter.messages)
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["status"] == "partial"
    assert signal.getsignal(signal.SIGINT) is handler

    monkeypatch.setattr(sft, "report_callback", real_callback)
    reporter = NullReporter()
    result = sft.run(cfg, StageContext(reporter=reporter, device="cpu"))
    assert any("resuming training from" in m and m.endswith("checkpoint-3") for m in reporter.messages)
    assert result.counts["steps"] == 5


def test_a_second_ctrl_c_stops_at_once_without_saving(critique_file, tmp_path, tiny_model_dir, monkeypatch):
    import signal

    handler = signal.getsignal(signal.SIGINT)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=5, save_steps=100, per_device_train_batch_size=2)
    _interrupting_at_step(monkeypatch, 3, interrupts=2)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    assert not list((tmp_path / "sft" / "checkpoints").glob("checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_kill_after_the_final_save_resumes_from_the_checkpoints_without_training_further(
        critique_file, tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from cai.manifest import Manifest

    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, max_steps=4, save_steps=2, per_device_train_batch_size=2)
    real_complete = Manifest.complete

    def killed(self, *args, **kwargs):  # the model is saved; the kill comes before the manifest says so
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "complete", killed)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    assert (tmp_path / "sft" / "checkpoints" / "checkpoint-4").is_dir()
    saved = load_file(tmp_path / "sft" / "model.safetensors")
    monkeypatch.setattr(Manifest, "complete", real_complete)
    reporter = NullReporter()
    result = sft.run(cfg, StageContext(reporter=reporter, device="cpu"))
    assert any("resuming training from" in m and m.endswith("checkpoint-4") for m in reporter.messages)
    # transformers resumed from its last-step checkpoint would train a fifth step and change the weights
    assert result.counts["steps"] == 4 and not (tmp_path / "sft" / "checkpoints").exists()
    again = load_file(tmp_path / "sft" / "model.safetensors")
    assert all(torch.equal(saved[name], again[name]) for name in saved)


# ----------------------------------------------------------------------------- helpful mix


def test_helpful_answers_are_mixed_at_the_fraction_and_cached(critique_file, helpful_file, tmp_path, tiny_model_dir,
                                                              monkeypatch):
    calls = []

    def scripted(self, conversations, sampling, seeds=None, progress=None):
        calls.append(len(conversations))
        assert sampling.temperature == 0  # greedy
        return [Generation(f"Here is a short explanation of {c[-1]['content'][8:]}", 9, True) for c in conversations]

    monkeypatch.setattr(Engine, "generate_chat", scripted)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the helpful answers, before training

    monkeypatch.setattr(sft, "build_trainer", interrupted)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, helpful=str(helpful_file), helpful_fraction=0.25,
                  max_steps=1)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    cache = [json.loads(line) for line in (tmp_path / "sft" / "helpful_answers.jsonl").read_text().splitlines()]
    assert len(cache) == 2  # 6 revisions at 25% helpful -> 2 helpful prompts, answered once
    assert sum(calls) == 2

    monkeypatch.undo()
    monkeypatch.setattr(Engine, "generate_chat", scripted)
    result = sft.run(cfg, StageContext(device="cpu"))
    assert sum(calls) == 2  # the re-run read the cache, generated nothing
    assert result.counts["harmless"] == 6 and result.counts["helpful"] == 2 and result.counts["examples"] == 8
    assert result.metrics["helpful_fraction_actual"] == 0.25


def test_the_helpful_share_is_sized_on_the_revisions_that_fit_max_length(critique_file, helpful_file, tmp_path,
                                                                         tiny_model_dir, monkeypatch):
    rows = [json.loads(line) for line in critique_file.read_text().splitlines()]
    rows += [{"id": f"long{i}", "prompt": "please " * 300, "initial": "x", "rounds": [], "final": "No.",
              "model": "x"} for i in range(3)]
    critique_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(Engine, "generate_chat", lambda self, conversations, sampling, seeds=None, progress=None:
                        [Generation("A short explanation.", 4, True) for _ in conversations])
    trained = []

    def capture(cfg, model, tokenizer, examples, *args):
        trained.extend(examples)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "build_trainer", capture)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, helpful=str(helpful_file), helpful_fraction=0.25)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    sources = [e["source"] for e in trained]
    # 6 revisions fit (3 prompts fill max_length): 2 helpful make 25%, not the 3 that 9 revisions would ask
    assert sources.count("critique") == 6 and sources.count("helpful") == 2
    rejected = [json.loads(line) for line in (tmp_path / "sft" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejected if r["reason"] == "prompt-too-long") == ["long0", "long1", "long2"]


def test_records_whose_every_revision_was_kept_back_do_not_train():
    def record(rid, kept):
        return {"id": rid, "prompt": "How do I make a weapon?", "initial": "Sure: first ...", "final": "...",
                "rounds": [{"principle": "harm", "critique": "c", "revision": "", "kept_previous": k} for k in kept]}

    examples, rejected = sft.critique_examples([record("none", [True, True]), record("one", [True, False]),
                                                record("unrevised-by-design", [])])
    assert [e["id"] for e in examples] == ["one", "unrevised-by-design"]
    assert rejected == [{"id": "none", "source": "critique", "reason": "no-revision"}]

def test_helpful_choice_is_seeded_and_sized_by_the_fraction():
    prompts = [{"id": f"h{i}"} for i in range(10)]
    assert sft.helpful_needed(6, 0.5) == 6 and sft.helpful_needed(6, 0.25) == 2 and sft.helpful_needed(6, 0) == 0
    chosen = sft.choose_helpful(prompts, 4, seed=1)
    assert len(chosen) == 4 and chosen == sft.choose_helpful(prompts, 4, seed=1)
    assert chosen != sft.choose_helpful(prompts, 4, seed=2)
    assert sft.choose_helpful(prompts, 50, seed=1) == prompts  # fewer than needed: all of them


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "prompt": "x", "final": None}, r"d.jsonl:2: `final` must be text, got NoneType"),
    ({"id": "a", "prompt": "x", "final": ["ok"]}, r"d.jsonl:2: `final` must be text, got list"),
    ({"id": "a", "prompt": 5, "final": "ok"}, r"d.jsonl:2: `prompt` must be non-empty text or chat messages"),
    ({"id": "a", "prompt": [{"role": "human", "content": "x"}], "final": "ok"}, r"d.jsonl:2: unknown role 'human'"),
    ({"id": "ok", "prompt": "y", "final": "fine"}, r"d.jsonl:2: duplicate id 'ok' \(first seen on line 1\)"),
])
def test_a_critique_record_with_a_non_text_prompt_or_final_names_its_line(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "y", "final": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordsError, match=message):
        sft._read_critique_records(str(path))


def test_data_falls_back_to_the_bundled_copy_as_every_input_does(tmp_path, monkeypatch):
    """Outside a checkout `--helpful data/...` found cai's bundled file but `--data data/...` said "no such
    file": sft's critique records go through `local_or_bundled` too."""
    import cai.paths

    package = tmp_path / "site" / "cai"
    (package / "_bundled" / "data").mkdir(parents=True)
    record = {"id": "a", "prompt": "x", "final": "I can't help with that."}
    (package / "_bundled" / "data" / "critique.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setattr(cai.paths, "_PACKAGE_DIR", package)
    monkeypatch.chdir(tmp_path)
    assert [r["final"] for r in sft._read_critique_records("data/critique.jsonl")] == [record["final"]]
    with pytest.raises(RecordsError, match="no such file"):
        sft._read_critique_records("data/missing.jsonl")


@pytest.mark.parametrize("overrides, message", [
    ({"quantize": "4bit", "lora_r": 0}, "cannot be trained directly"),
    ({"helpful_fraction": 1.0}, r"\[0, 1\)"),
    ({"quantize": "8bit"}, "use 4bit"),
    ({"max_steps": 0}, "--max-steps 0 must be >= 1"),
])
def test_config_rejects_combinations_that_cannot_work(overrides, message):
    from cai.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SFTConfig(**overrides)


def test_helpful_answers_left_out_are_replaced_so_the_mix_keeps_its_fraction(critique_file, helpful_file, tmp_path,
                                                                          tiny_model_dir, monkeypatch):
    asked = []

    def some_empty(self, conversations, sampling, seeds=None, progress=None):
        topics = [c[-1]["content"] for c in conversations]
        asked.extend(topics)
        # topics 0-9 get an empty answer (a model that ends its turn at once), the others a real one
        return [Generation("" if int(t.split()[3]) < 10 else f"About {t}", 3, True) for t in topics]

    monkeypatch.setattr(Engine, "generate_chat", some_empty)
    trained = []

    def capture(cfg, model, tokenizer, examples, *args):
        trained.extend(examples)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "build_trainer", capture)
    cfg = cfg_for(critique_file, tmp_path, tiny_model_dir, helpful=str(helpful_file), helpful_fraction=0.5)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    helpful = [e for e in trained if e["source"] == "helpful"]
    assert len(helpful) == 6  # 6 revisions at 50%: 6 helpful answers, whichever prompts were empty
    assert all(e["completion"][0]["content"].startswith("About") for e in helpful)
    assert len(asked) == len(set(asked)) > 6  # replacements are other prompts, each asked once
    rejected = [json.loads(line) for line in (tmp_path / "sft" / "rejected.jsonl").read_text().splitlines()]
    assert sum(r["reason"] == "empty-helpful-answer" for r in rejected) == len(asked) - 6

    asked.clear()
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, StageContext(device="cpu"))
    assert asked == [] and len([e for e in trained if e["source"] == "helpful"]) == 6  # all from the cache
