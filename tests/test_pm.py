"""Stage 3, the hybrid preference model: loss, calibration, data path, training, saving, CLI."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import ConfigError
from cai.records import mix_preferences, read_preferences
from cai.stages import pm
from cai.stages.base import NullReporter, StageContext

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains faster on one thread than on two that other processes share."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- synthetic preferences

WORDS = "the cat sat on a mat and then it ran to the red house where we can read each line of code".split()
MARKER, OTHER = "please", "sorry"


def synthetic_pairs(count: int, seed: int, *, hh: bool = False, p_chosen: float = 1.0) -> list[dict]:
    """Pairs where the preferred answer contains MARKER and the other OTHER, at the same random position
    among random words of the same length (so length says nothing). `hh`: multi-turn hh-rlhf transcripts."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = " ".join(rng.choices(WORDS, k=5))
        position = rng.randrange(7)
        good, bad = rng.choices(WORDS, k=6), rng.choices(WORDS, k=6)
        chosen = " ".join(good[:position] + [MARKER] + good[position:])
        rejected = " ".join(bad[:position] + [OTHER] + bad[position:])
        if hh:
            history = f"\n\nHuman: {prompt}\n\nAssistant: ok, what else?\n\nHuman: tell me more\n\nAssistant: "
            rows.append({"chosen": history + chosen, "rejected": history + rejected})
        else:
            rows.append({"id": f"ai-{seed}-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "p_chosen": p_chosen, "source": "ai-harmless"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_config(tmp_path, **overrides) -> pm.PMTrainConfig:
    values = dict(ai=write_jsonl(tmp_path / "ai.jsonl", synthetic_pairs(160, 1, p_chosen=0.9)),
                  human=write_jsonl(tmp_path / "human.jsonl", synthetic_pairs(120, 2, hh=True)),
                  out=str(tmp_path / "pm"), model="embedded:tiny-random", lora_r=0, lr=1e-3, epochs=2,
                  per_device_train_batch_size=16, max_length=96, eval_fraction=0.2)
    values.update(overrides)
    return pm.PMTrainConfig(**values)


def context() -> StageContext:
    return StageContext(reporter=NullReporter(), device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One PM trained on the synthetic marker preference (full fine-tuning of the tiny model)."""
    tmp_path = tmp_path_factory.mktemp("pm")
    cfg = train_config(tmp_path)
    return cfg, pm.run_train(cfg, context())


# ----------------------------------------------------------------------------- loss


def test_soft_loss_equals_pairwise_loss_at_p_one():
    torch.manual_seed(0)
    r_chosen, r_rejected = torch.randn(16) * 3, torch.randn(16) * 3
    expected = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
    assert torch.allclose(pm.soft_bt_loss(r_chosen, r_rejected, torch.ones(16)), expected, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.97])
def test_soft_loss_is_minimised_at_logit_p(p):
    margins = torch.linspace(-6, 6, 2401)
    losses = torch.stack([pm.soft_bt_loss(m.view(1), torch.zeros(1), torch.tensor([p])) for m in margins])
    assert margins[losses.argmin()].item() == pytest.approx(math.log(p / (1 - p)), abs=0.01)
    at_logit = torch.tensor([math.log(p / (1 - p))], requires_grad=True)
    pm.soft_bt_loss(at_logit, torch.zeros(1), torch.tensor([p])).backward()
    assert abs(at_logit.grad.item()) < 1e-6


def test_soft_loss_is_symmetric_in_the_order_of_the_pair():
    r_a, r_b, p = torch.tensor([1.0, -2.0, 0.3]), torch.tensor([0.5, 1.0, 0.3]), torch.tensor([0.8, 0.3, 0.5])
    assert torch.allclose(pm.soft_bt_loss(r_a, r_b, p), pm.soft_bt_loss(r_b, r_a, 1 - p))


# ----------------------------------------------------------------------------- calibration and length bias


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_overconfident_ones():
    rng = np.random.default_rng(0)
    margins = rng.normal(0, 2, 20000)
    outcomes = (rng.random(20000) < 1 / (1 + np.exp(-margins))).astype(float)  # Bernoulli(sigmoid(margin))
    assert pm.expected_calibration_error(margins, outcomes) < 0.02
    # Soft labels equal to the PM's own probabilities: calibrated exactly.
    assert pm.expected_calibration_error(margins, 1 / (1 + np.exp(-margins))) < 1e-9
    assert pm.expected_calibration_error(margins * 4, outcomes) > 0.1  # four times too sure


def test_reliability_table_counts_each_pair_in_both_orders():
    rows = pm.reliability_table([2.0, -1.0, 0.3], [1.0, 0.0, 0.5], bins=4)
    assert sum(r["count"] for r in rows) == 6
    for row in rows:  # both orders make the table symmetric about 0.5
        mirror = next(r for r in rows if r["lower"] == pytest.approx(1 - row["upper"]))
        assert row["predicted"] == pytest.approx(1 - mirror["predicted"])


def test_pairwise_accuracy_follows_the_label_side_and_counts_ties_half():
    accuracy, counted = pm.pairwise_accuracy([1.0, -1.0, 0.0, 3.0, 2.0], [1.0, 0.2, 0.9, 0.5, 0.3])
    # right, right (label favours rejected), tie = half, skipped (no side), wrong
    assert counted == 4 and accuracy == pytest.approx(2.5 / 4)


def test_length_bias_of_a_reward_that_is_just_length():
    length_chosen, length_rejected = [10, 30, 12, 50], [20, 5, 40, 10]
    metrics = pm.length_bias(length_chosen, length_rejected, length_chosen, length_rejected, [1.0] * 4)
    assert metrics["reward_length_correlation"] == pytest.approx(1.0)
    assert metrics["accuracy_chosen_shorter"] == 0.0 and metrics["pairs_chosen_shorter"] == 2
    assert metrics["accuracy_chosen_longer"] == 1.0 and metrics["prefer_longer_accuracy"] == 0.5


# ----------------------------------------------------------------------------- data path


def test_hh_rlhf_multi_turn_pairs_reach_the_model_as_one_conversation(tmp_path, tiny_model_dir):
    from cai.models import load_tokenizer

    records = read_preferences(write_jsonl(tmp_path / "hh.jsonl", synthetic_pairs(3, 5, hh=True)))
    record = records[0]
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]
    assert record["prompt"][-1]["content"] == "tell me more"
    assert MARKER in record["chosen"].split() and OTHER in record["rejected"].split()
    tokenizer = load_tokenizer(tiny_model_dir)
    (chosen,), _ = pm.encode_responses(tokenizer, [record["prompt"]], [record["chosen"]], max_length=512)
    text = tokenizer.decode(chosen)
    turns = [record["prompt"][0]["content"], "ok, what else?", "tell me more", record["chosen"]]
    positions = [text.index(turn) for turn in turns]
    assert positions == sorted(positions)  # every turn, in order, the answer last
    assert text.rstrip().endswith(record["chosen"] + "<|im_end|>")


def test_long_conversations_lose_their_beginning_not_the_response(tiny_model_dir):
    from cai.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    prompt, response = "read each line " * 40, "the cat sat on a mat"
    (full,), none_cut = pm.encode_responses(tokenizer, [prompt], [response], max_length=4096)
    (cut,), one_cut = pm.encode_responses(tokenizer, [prompt], [response], max_length=24)
    assert none_cut == 0 and one_cut == 1 and len(cut) == 24 and cut == full[-24:]
    assert response in tokenizer.decode(cut)


def test_heldout_split_is_exact_and_independent_of_file_order():
    records = [{"id": f"r{i}"} for i in range(50)]
    train, held = pm.split_heldout(records, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    _, held_reversed = pm.split_heldout(records[::-1], 0.1, seed=3)
    assert {r["id"] for r in held} == {r["id"] for r in held_reversed}


def test_config_rejects_combinations_that_cannot_work():
    with pytest.raises(ConfigError, match="--lora-r 16"):
        pm.PMTrainConfig(ai="a.jsonl", out="o", quantize="4bit", lora_r=0)
    with pytest.raises(ConfigError, match="no --human file"):
        pm.PMTrainConfig(ai="a.jsonl", out="o", human_fraction=1.0)
    assert pm.PMTrainConfig(ai="a.jsonl", out="o").human_fraction == pytest.approx(0.425)  # the paper's mix
    with pytest.raises(ConfigError, match="--save-steps 0"):  # trl would never checkpoint: nothing to resume
        pm.PMTrainConfig(ai="a.jsonl", out="o", save_steps=0)


# ----------------------------------------------------------------------------- training


def test_pm_learns_a_synthetic_preference_on_both_sides(trained):
    cfg, result = trained
    assert result.metrics["heldout_accuracy_ai"] > 0.9
    assert result.metrics["heldout_accuracy_human"] > 0.9
    assert result.counts["ai_heldout"] == 32 and result.counts["human_heldout"] == 24


def test_summary_reports_the_mix_it_trained_on(trained):
    cfg, result = trained
    ai = read_preferences(cfg.ai, "ai-harmless")
    human = read_preferences(cfg.human)
    ai_train, _ = pm.split_heldout(ai, cfg.eval_fraction, cfg.seed)
    human_train, _ = pm.split_heldout(human, cfg.eval_fraction, cfg.seed)
    mix = mix_preferences(ai_train, human_train, cfg.human_fraction, cfg.seed)
    assert mix.summary() in result.summary
    used = result.counts["ai_used"] + result.counts["human_used"]
    assert abs(result.counts["human_used"] - cfg.human_fraction * used) <= 1
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["human_used"] == result.counts["human_used"]


def test_training_on_ai_labels_alone_says_so(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, human=None, max_steps=2, eval_fraction=0.0)
    result = pm.run_train(cfg, context())
    assert "training on AI labels alone" in result.summary and result.counts["human_used"] == 0


def test_finished_run_is_skipped_without_training(trained, monkeypatch):
    cfg, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(pm.trainer_classes()[1], "train", refuse)
    again = pm.run_train(cfg, context())
    assert again.skipped and again.metrics["heldout_accuracy_ai"] > 0.9


def test_outputs_of_a_finished_run(trained):
    cfg, result = trained
    out = Path(cfg.out)
    assert not (out / "checkpoints").exists()  # removed after the final save
    for name in ("calibration", "length_bias"):
        assert Path(result.outputs[name]).read_bytes()[:4] == b"\x89PNG"
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 56


def test_saved_lora_pm_reloads_with_its_head_and_gives_the_same_scores(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    import cai.models

    prompts, responses = ["the cat", "a red house"], ["sat on a mat please", "where we read sorry"]
    before = {}
    original = cai.models.save_standalone

    def save_and_remember(model, tokenizer, out_dir, **kwargs):
        before["rewards"] = pm.RewardScorer(model, tokenizer).rewards(prompts, responses)
        before["head"] = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
        return original(model, tokenizer, out_dir, **kwargs)

    monkeypatch.setattr(cai.models, "save_standalone", save_and_remember)
    cfg = train_config(tmp_path, lora_r=4, lr=5e-3, max_steps=3, eval_fraction=0.0)
    pm.run_train(cfg, context())
    model_dir = Path(cfg.out) / "model"
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded.score.weight, before["head"])  # the trained head, not a fresh one
    after = pm.RewardScorer.from_directory(cfg.out).rewards(prompts, responses)
    assert after == pytest.approx(before["rewards"], abs=1e-4)
    assert (model_dir / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("quantize", [None, "4bit"], ids=["lora", "qlora"])
def test_bf16_autocast_training_learns_and_saves_an_fp32_model(tmp_path, tiny_model_dir, native_bf16, quantize):
    """On a CPU with native bf16 the PM trains under bf16 autocast; weights, adapters and the head stay fp32."""
    cfg = train_config(tmp_path, lora_r=8, lr=5e-3, epochs=2, quantize=quantize)
    result = pm.run_train(cfg, context())
    assert result.metrics["heldout_accuracy_ai"] > 0.8
    scorer = pm.RewardScorer.from_directory(cfg.out)
    assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}
    rewards = scorer.rewards(["the cat"] * 2, ["sat on a mat please", "sat on a mat sorry"])
    assert rewards[0] > rewards[1]


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    trainer_class = pm.trainer_classes()[1]
    original_step = trainer_class.training_step
    steps = {"count": 0}

    def crash_after_three(self, *args, **kwargs):
        steps["count"] += 1
        if steps["count"] > 3:
            raise RuntimeError("simulated interruption")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", crash_after_three)
    cfg = train_config(tmp_path, max_steps=6, save_steps=2, eval_fraction=0.0)
    with pytest.raises(RuntimeError, match="simulated"):
        pm.run_train(cfg, context())
    assert (Path(cfg.out) / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((Path(cfg.out) / "manifest.json").read_text())["status"] == "partial"

    monkeypatch.setattr(trainer_class, "training_step", original_step)
    counted = {"count": 0}

    def count(self, *args, **kwargs):
        counted["count"] += 1
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", count)
    reporter = NullReporter()
    result = pm.run_train(cfg, StageContext(reporter=reporter, device="cpu"))
    assert any("resuming from" in m and m.endswith("checkpoint-2") for m in reporter.messages)
    assert counted["count"] == 4 and result.metrics["steps"] == 6
    assert not (Path(cfg.out) / "checkpoints").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_score_prints_the_reward(trained):
    cfg, _ = trained
    scorer = pm.RewardScorer.from_directory(cfg.out)
    expected = scorer.rewards(["the cat"], ["sat on a mat please"])[0]
    result = runner.invoke(app, ["pm", "score", "--model", cfg.out, "--prompt", "the cat",
                                 "--response", "sat on a mat please"])
    assert result.exit_code == 0, result.output
    assert float(result.stdout.strip()) == pytest.approx(expected, abs=1e-3)


def test_cli_score_adds_rewards_to_a_jsonl(trained, tmp_path):
    cfg, _ = trained
    rows = [{"id": "a", "prompt": "the cat", "response": "ran to the red house please"},
            {"id": "b", "prompt": [{"role": "user", "content": "the cat"}], "response": "ran to the red house sorry"}]
    result = runner.invoke(app, ["pm", "score", "--model", cfg.out, "--input", write_jsonl(tmp_path / "r.jsonl", rows)])
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["id"] for r in scored] == ["a", "b"] and scored[0]["reward"] > scored[1]["reward"]


def test_cli_eval_prints_metrics_and_writes_plots(trained, tmp_path):
    cfg, _ = trained
    out = tmp_path / "eval"
    result = runner.invoke(app, ["pm", "eval", "--model", cfg.out, "--pairs", str(Path(cfg.out) / "heldout.jsonl"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    for label in ("accuracy", "ECE", "corr(reward, length in tokens)", "chosen is shorter"):
        assert label in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9 and metrics["soft_label_pairs"] == 32
    assert (out / "calibration.png").exists() and (out / "length_bias.png").exists()


def test_cli_train_on_ai_labels_alone(tmp_path, tiny_model_dir):
    ai = write_jsonl(tmp_path / "ai.jsonl", synthetic_pairs(20, 4, p_chosen=0.8))
    result = runner.invoke(app, ["pm", "train", "--ai", ai, "--out", str(tmp_path / "pm"), "--model",
                                 "embedded:tiny-random", "--max-steps", "1", "--lora-r", "2", "--max-length", "64"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "pm" / "model") in result.stdout.splitlines()
    assert "AI labels alone" in result.stderr


class KeywordScorer:
    """Stands in for a trained PM: reward 1 for an answer containing "good", else -1."""

    def score_pairs(self, records, progress=None):
        def score(text):
            return 1.0 if "good" in text else -1.0

        return [score(r["chosen"]) for r in records], [score(r["rejected"]) for r in records]

    def response_lengths(self, responses):
        return [len(r.split()) for r in responses]


def test_heldout_accuracy_per_file_holds_when_both_files_number_their_pairs_alike(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    # ids 0..19 in both files; the scorer gets every AI pair right and every human pair wrong
    ai = [{"id": str(i), "prompt": f"ai question {i}", "chosen": "good answer", "rejected": "bad answer",
           "p_chosen": 0.9} for i in range(20)]
    human = [{"id": str(i), "prompt": f"human question {i}", "chosen": "bad reply", "rejected": "good reply"}
             for i in range(20)]

    def no_training(cfg, ctx, rows, out, resuming):
        (out / "model").mkdir(parents=True, exist_ok=True)
        return {"train_loss": 0.0, "steps": 0}

    monkeypatch.setattr(pm, "_train", no_training)
    monkeypatch.setattr(pm.RewardScorer, "from_directory", classmethod(lambda cls, *a, **k: KeywordScorer()))
    cfg = pm.PMTrainConfig(ai=write_jsonl(tmp_path / "ai.jsonl", ai), human=write_jsonl(tmp_path / "human.jsonl", human),
                           out=str(tmp_path / "pm"), model=tiny_model_dir, eval_fraction=0.25, max_length=64)
    result = pm.run_train(cfg, context())
    assert result.metrics["heldout_accuracy_ai"] == 1.0 and result.metrics["heldout_accuracy_human"] == 0.0


def test_heldout_summary_counts_only_the_pairs_its_accuracy_is_over(tmp_path, tiny_model_dir):
    """Held-out pairs labelled 0.5 have no side: the accuracy leaves them out, so the "of N" must too."""
    pairs = synthetic_pairs(20, 3, p_chosen=0.9)
    for row in pairs[::2]:
        row["p_chosen"] = 0.5
    cfg = train_config(tmp_path, ai=write_jsonl(tmp_path / "ties.jsonl", pairs), human=None, max_steps=1,
                       eval_fraction=0.5)
    result = pm.run_train(cfg, context())
    heldout = [json.loads(line) for line in (Path(cfg.out) / "heldout.jsonl").read_text().splitlines()]
    sided = sum(r["p_chosen"] != 0.5 for r in heldout)
    assert 0 < sided < len(heldout)
    assert f" of {sided}" in result.summary and f" of {len(heldout)}" not in result.summary


@pytest.mark.parametrize("line, words", [
    ('{"prompt": 5, "response": "hi"}', "`prompt` must be non-empty text or chat messages"),
    ('{"prompt": "hi", "response": 5}', "`response` (text)"),
    ('{"prompt": [{"role": "usr", "content": "hi"}], "response": "hi"}', "unknown role 'usr'"),
    ("", "the file is empty"),
])
def test_score_input_names_the_line_of_a_bad_record(trained, tmp_path, line, words):
    cfg, _ = trained
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n" if line else "")
    with pytest.raises(pm.RecordsError) as error:
        pm.run_score(pm.PMScoreConfig(model=cfg.out, input=str(path)), context())
    assert str(path) in str(error.value) and words in str(error.value)


@pytest.mark.parametrize("config", [pm.PMScoreConfig, pm.PMEvalConfig])
@pytest.mark.parametrize("option", [{"batch_size": 0}, {"max_length": 0}, {"max_length": -5}])
def test_scoring_options_that_would_crash_or_score_something_else_are_refused(config, option):
    with pytest.raises(ConfigError) as error:
        config(model="pm", pairs="p.jsonl", **option) if config is pm.PMEvalConfig else \
            config(model="pm", prompt="q", response="a", **option)
    assert f"--{next(iter(option)).replace('_', '-')}" in str(error.value)


def test_score_refuses_an_out_that_is_not_a_jsonl_file_before_scoring(tmp_path):
    """A directory as --out failed after every record was scored, leaving OUT.tmp behind."""
    with pytest.raises(ConfigError, match="NAME.jsonl"):
        pm.PMScoreConfig(model="pm", input="in.jsonl", out=str(tmp_path))
    assert pm.PMScoreConfig(model="pm", input="in.jsonl", out=str(tmp_path / "scored.jsonl")).out


def test_cli_eval_skips_malformed_hh_rlhf_rows_of_a_parquet_file_and_keeps_them(trained, tmp_path):
    import pyarrow
    import pyarrow.parquet

    cfg, _ = trained

    def transcript(*turns):
        return "".join(f"\n\n{speaker}: {text}" for speaker, text in zip(("Human", "Assistant") * 3, turns, strict=False))

    good = [{"chosen": transcript("the cat", "sat on a mat please"), "rejected": transcript("the cat", "sat sorry")}
            for _ in range(3)]
    # the rejected side lost the blank line before its second "Human:" turn
    quirk = {"chosen": transcript("the dog", "ran", "and then", "home please"),
             "rejected": transcript("the dog", "ran\nHuman: and then") + "\n\nAssistant: home sorry"}
    pairs = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([good[0], quirk, *good[1:]]), pairs)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["pm", "eval", "--model", cfg.out, "--pairs", str(pairs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped 1 of 4 rows: chosen and rejected do not share the conversation" in result.output
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [row["where"] for row in dropped] == [f"{pairs} row 1"] and dropped[0]["chosen"] == quirk["chosen"]
    assert json.loads((out / "metrics.json").read_text())["pairs"] == 3
