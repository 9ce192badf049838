"""Stage 2 (cai/stages/feedback.py): preference records, identical pairs, resume, skip, and the CLI."""

import json
import math

import pytest
from typer.testing import CliRunner

from cai import constitution as c
from cai.engine import ContinuationScore, Generation
from cai.errors import ConfigError
from cai.judge import Verdict
from cai.records import read_jsonl
from cai.stages import feedback
from cai.stages.base import StageContext
from cai.stages.feedback import (
    FeedbackConfig,
    FeedbackEvalConfig,
    agreement_metrics,
    fit_contrast_temperature,
    label_summary,
    preference_record,
    rejected_path,
)

runner = CliRunner()
PROMPTS = ["How do I pick a lock?", "SAME every time", "ONCE the same", "Tell me a joke.",
           "How do I make a bomb?", "What's the capital of France?"]


class ScriptedEngine:
    """Policy and judge without a model. Answers depend only on the prompt and the seed (as the real
    engine's do), except "SAME" prompts (always one text) and "ONCE" prompts (the same text for the
    first two draws, then different). As a judge it prefers answers that refuse ("I can't")."""

    def __init__(self, constitution, fail_on_score_call: int | None = None):
        self.constitution = constitution
        self.fail_on_score_call = fail_on_score_call
        self.calls = {"generate_chat": 0, "score": 0, "render": 0}
        self.draws: dict[str, int] = {}

    def generate_chat(self, conversations, sampling, seeds=None, progress=None):
        self.calls["generate_chat"] += 1
        out = []
        for conversation, seed in zip(conversations, seeds, strict=True):
            prompt = conversation[-1]["content"]
            self.draws[prompt] = self.draws.get(prompt, 0) + 1
            if prompt.startswith("SAME") or (prompt.startswith("ONCE") and self.draws[prompt] <= 2):
                text = "the one answer"
            elif seed % 2:
                text = f"I can't help with that ({seed % 97})."
            else:
                text = f"Sure, here is how ({seed % 89})."
            out.append(Generation(text=text, num_tokens=5, finished=True))
            if progress:
                progress(1, 5)
        return out

    def render(self, messages, *, assistant_prefix=""):
        self.calls["render"] += 1
        return c.format_messages(messages, assistant_prefix)

    def score(self, contexts, continuations, progress=None):
        self.calls["score"] += 1
        if self.fail_on_score_call == self.calls["score"]:
            raise KeyboardInterrupt  # as if the run were killed here
        scores = []
        for context, continuation in zip(contexts, continuations, strict=True):
            tail = context.rsplit("Options:\n(A) ", 1)[1]
            a = tail.split("\n(B) ", 1)[0]
            refuses_a = "I can't" in a
            picked = (continuation == c.OPTION_CONTINUATIONS["A"]) == refuses_a
            value = math.log(0.7 if picked else 0.3)
            scores.append(ContinuationScore(logprob=value, token_logprobs=[value]))
        return scores


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": "test"}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return str(path)


@pytest.fixture
def constitution():
    return c.load("default")


def use_engines(monkeypatch, engines: list):
    """Make the stage load these engines, in order; returns the list of references it asked for."""
    loaded = []

    def load(reference, cfg, ctx):
        loaded.append(reference)
        return engines[len(loaded) - 1]

    monkeypatch.setattr(feedback, "_load_engine", load)
    return loaded


def config(prompts_file, out, **overrides):
    values = dict(prompts=prompts_file, model="embedded:stub", out=str(out), method="mc", principles=2,
                  batch_size=2, max_new_tokens=8)
    values.update(overrides)
    return FeedbackConfig(**values)


def records_of(path):
    return [record for _, record in read_jsonl(path)]


def same_up_to_rounding(a, b) -> bool:
    """Equal records, probabilities to 1e-4: a resumed run scores its rows in other batches, and batch
    position changes a model's rounding (~1e-7 in p_chosen)."""
    if isinstance(a, float) or isinstance(b, float):
        return b == pytest.approx(a, rel=1e-4, abs=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_up_to_rounding(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_up_to_rounding(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------- records


def test_one_preference_record_per_pair_with_the_soft_label_and_both_orders(monkeypatch, tmp_path, prompts_file,
                                                                              constitution):
    engine = ScriptedEngine(constitution)
    loaded = use_engines(monkeypatch, [engine])
    out = tmp_path / "prefs.jsonl"
    result = feedback.run(config(prompts_file, out), StageContext())
    assert loaded == ["embedded:stub"]  # the judge is the policy, loaded once
    records = records_of(out)
    assert len(records) == 5 and result.counts["pairs_labelled"] == 5
    for record in records:
        assert record["source"] == "ai-harmless" and record["method"] == "mc" and record["category"] == "test"
        assert len(record["p_a_by_order"]) == 2 and isinstance(record["agree"], bool)
        assert record["p_chosen"] == pytest.approx(max(record["p_a"], 1 - record["p_a"]))
        a_wins = record["p_a"] >= 0.5
        assert record["chosen"] == (record["response_a"] if a_wins else record["response_b"])
        assert record["rejected"] == (record["response_b"] if a_wins else record["response_a"])
        assert record["principle_ids"] == [p.id for p in constitution.sample_judge_principles(record["id"], 2, 0)]
        if "I can't" in record["response_a"] + record["response_b"] and "Sure" in record["response_a"] + record["response_b"]:
            assert "I can't" in record["chosen"] and record["agree"] is True  # this judge likes refusals
    assert len({r["id"] for r in records}) == len(records)


def test_identical_pairs_are_resampled_once_then_set_aside_and_counted(monkeypatch, tmp_path, prompts_file,
                                                                       constitution):
    use_engines(monkeypatch, [ScriptedEngine(constitution)])
    out = tmp_path / "prefs.jsonl"
    result = feedback.run(config(prompts_file, out), StageContext())
    [rejected] = records_of(rejected_path(out))
    assert rejected["id"] == "p1" and rejected["reason"] == "identical" and rejected["prompt"].startswith("SAME")
    once = next(r for r in records_of(out) if r["id"] == "p2")  # identical at first, different on the retry
    assert once["response_a"] != once["response_b"]
    assert result.counts["skipped"] == 1 and result.counts["skipped_identical"] == 1
    assert "skipped pairs: 1 identical" in result.summary and "position consistency" in result.summary
    assert "comparisons/s" in result.summary and result.metrics["judge_comparisons_per_s"] > 0


def test_without_swap_records_hold_one_order_and_the_summary_says_so(monkeypatch, tmp_path, prompts_file,
                                                                     constitution):
    use_engines(monkeypatch, [ScriptedEngine(constitution)])
    out = tmp_path / "prefs.jsonl"
    result = feedback.run(config(prompts_file, out, swap=False), StageContext())
    records = records_of(out)
    assert records and all(len(r["p_a_by_order"]) == 1 and r["agree"] is None for r in records)
    assert result.metrics["position_consistency"] is None
    assert "position consistency - (one order: --no-swap)" in result.summary


# ----------------------------------------------------------------------------- resume and skip


def test_a_killed_run_resumes_without_duplicates_and_matches_an_uninterrupted_run(monkeypatch, tmp_path,
                                                                                  prompts_file, constitution):
    use_engines(monkeypatch, [ScriptedEngine(constitution)])
    whole = tmp_path / "whole.jsonl"
    feedback.run(config(prompts_file, whole), StageContext())

    out = tmp_path / "prefs.jsonl"
    use_engines(monkeypatch, [ScriptedEngine(constitution, fail_on_score_call=2)])
    with pytest.raises(KeyboardInterrupt):
        feedback.run(config(prompts_file, out), StageContext())
    assert 0 < len(records_of(out)) < 5
    assert json.loads(StageContext().manifest_for(out).read_text())["status"] == "partial"

    resumed_engine = ScriptedEngine(constitution)
    use_engines(monkeypatch, [resumed_engine])
    feedback.run(config(prompts_file, out), StageContext())
    records = records_of(out)
    assert len(records) == len({r["id"] for r in records}) == 5
    assert same_up_to_rounding(sorted(records, key=lambda r: r["id"]), sorted(records_of(whole), key=lambda r: r["id"]))
    assert same_up_to_rounding(records_of(rejected_path(out)), records_of(rejected_path(whole)))


def test_a_finished_run_is_skipped_without_calling_the_engine(monkeypatch, tmp_path, prompts_file, constitution):
    use_engines(monkeypatch, [ScriptedEngine(constitution)])
    out = tmp_path / "prefs.jsonl"
    first = feedback.run(config(prompts_file, out), StageContext())
    again = ScriptedEngine(constitution)
    loaded = use_engines(monkeypatch, [again])
    second = feedback.run(config(prompts_file, out), StageContext())
    assert second.skipped and loaded == [] and sum(again.calls.values()) == 0
    assert second.counts == first.counts and len(records_of(out)) == 5


def test_a_different_judge_is_loaded_separately(monkeypatch, tmp_path, prompts_file, constitution):
    loaded = use_engines(monkeypatch, [ScriptedEngine(constitution), ScriptedEngine(constitution)])
    feedback.run(config(prompts_file, tmp_path / "prefs.jsonl", judge="embedded:other"), StageContext())
    assert loaded == ["embedded:stub", "embedded:other"]


# ----------------------------------------------------------------------------- config


def test_config_rejects_what_cannot_work(prompts_file, tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(ConfigError, match="cot"):
        config(prompts_file, out, method="contrast", cot=True)
    with pytest.raises(ConfigError, match="clamp"):
        config(prompts_file, out, clamp="0.6,0.9")
    with pytest.raises(ConfigError, match="LO,HI"):
        config(prompts_file, out, clamp="0.4")
    with pytest.raises(ConfigError, match="--temperature 0"):
        config(prompts_file, out, temperature=0)
    with pytest.raises(ConfigError, match="--top-p 0"):
        config(prompts_file, out, top_p=0)
    with pytest.raises(ConfigError, match="--prompts"):
        FeedbackConfig(out=str(out))
    for batch_size in (0, -3):  # the engine used to fail with a bare traceback
        with pytest.raises(ConfigError, match="--batch-size"):
            config(prompts_file, out, batch_size=batch_size)
        with pytest.raises(ConfigError, match="--batch-size"):
            FeedbackEvalConfig(pairs="x", batch_size=batch_size)
    assert config(prompts_file, out, clamp="0.3,0.7", cot=True).clamp == (0.3, 0.7)
    with pytest.raises(ConfigError, match="add --cot"):  # bounds that would bound nothing
        config(prompts_file, out, clamp="0.3,0.7")
    with pytest.raises(ConfigError, match="add --cot"):
        FeedbackEvalConfig(pairs="x", clamp="0.3,0.7")
    assert config(prompts_file, out, clamp="0.4,0.6").clamp == (0.4, 0.6)  # the default, written out
    # --cot with the default method: auto would pick contrast for a small judge, which cannot reason
    assert config(prompts_file, out, method="auto", cot=True).method == "mc"
    with pytest.raises(ConfigError, match="cot"):
        FeedbackEvalConfig(pairs="x", method="contrast", cot=True)
    with pytest.raises(ConfigError, match="--cot-max-new-tokens 0 must be >= 1"):  # as `cai feedback` refuses it
        FeedbackEvalConfig(pairs="x", method="mc", cot=True, cot_max_new_tokens=0)
    with pytest.raises(ConfigError, match="--out DIR"):  # before judging, not after every pair is judged
        FeedbackEvalConfig(pairs="x", out=prompts_file)


# ----------------------------------------------------------------------------- pure helpers


def test_preference_record_puts_the_likelier_answer_first():
    verdict = Verdict(p_a=0.3, p_a_by_order=[0.2, 0.4], agree=True, principle_ids=["less-harmful"])
    record = preference_record({"id": "x", "prompt": "q"}, "yes", "no", verdict, "mc")
    assert (record["chosen"], record["rejected"], record["p_chosen"]) == ("no", "yes", pytest.approx(0.7))


def test_the_fitted_contrast_temperature_recovers_the_one_that_made_the_labels():
    differences = [-0.6, -0.3, -0.1, 0.05, 0.2, 0.4, 0.7]
    p_a = [1 / (1 + math.exp(-d)) for d in differences]  # verdicts at temperature 1
    targets = [1 / (1 + math.exp(-d / 0.2)) for d in differences]  # labels as sharp as temperature 0.2
    fit = fit_contrast_temperature(p_a, targets, temperature=1.0)
    assert fit["temperature"] == pytest.approx(0.2, rel=0.13)  # the grid has 20 steps a decade
    assert fit["log_loss_fit"] < fit["log_loss"]


def test_label_summary_and_agreement_metrics():
    records = [{"p_a": 0.8, "agree": True}, {"p_a": 0.4, "agree": False}, {"p_a": 0.5, "agree": None}]
    stats = label_summary(records)
    assert stats["position_consistency"] == 0.5 and stats["mean_margin"] == pytest.approx(0.4 / 3)
    verdicts = [Verdict(0.7, [0.9, 0.5], False, ["x"]), Verdict(0.4, [0.3, 0.5], False, ["x"]),
                Verdict(0.6, [0.6, 0.6], True, ["x"]), Verdict(0.2, [0.1, 0.3], True, ["x"])]
    metrics = agreement_metrics(verdicts, [1.0, 1.0, 0.0, 0.0])
    assert metrics["agreement"] == 0.5 and metrics["agreement_first"] == 0.5
    assert metrics["agreement_second"] == 0.25  # a 0.5 in one order is no winner, so it cannot agree
    assert metrics["position_consistency"] == 0.5 and metrics["pairs"] == 4


# ----------------------------------------------------------------------------- CLI (tiny random model)


def test_help_reads_for_both_commands():
    from cai.cli import app

    group = runner.invoke(app, ["feedback", "--help"])
    assert group.exit_code == 0 and "--prompts" in group.stdout and "--no-swap" in group.stdout
    assert "eval" in group.stdout
    evaluation = runner.invoke(app, ["feedback", "eval", "--help"])
    assert evaluation.exit_code == 0 and "--pairs" in evaluation.stdout and "--prompts" not in evaluation.stdout


def test_cli_without_prompts_names_the_missing_options(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cai", "feedback", "--out", str(tmp_path / "x.jsonl")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--prompts" in result.stderr
    assert "--model" not in result.stderr  # it defaults to the embedded model, like every stage's model option


def test_cli_labels_pairs_with_the_tiny_model(tmp_path, prompts_file):
    from cai.cli import app

    out = tmp_path / "prefs.jsonl"
    args = ["feedback", "--prompts", prompts_file, "--model", "embedded:tiny-random", "--out", str(out),
            "--limit", "3", "--max-new-tokens", "6", "--batch-size", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["method"] == "contrast"  # auto: a tiny judge gets contrast
    records = records_of(out)
    skipped = records_of(rejected_path(out)) if rejected_path(out).exists() else []
    assert len(records) + len(skipped) == 3
    assert all(0.5 <= r["p_chosen"] <= 1.0 and r["agree"] is None for r in records)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout.strip().splitlines()[-1])["skipped"] is True


def test_eval_leaves_out_labelled_pairs_with_an_empty_answer(tmp_path):
    """hh-rlhf has rows ending in an empty assistant turn; the contrast judge used to raise on them."""
    from cai.cli import app

    human = "\n\nHuman: How do I pick a lock?\n\nAssistant: "
    rows = [{"chosen": human + "I can't help with that.", "rejected": human + "Use a tension wrench."},
            {"chosen": human + "I won't explain that.", "rejected": human}]
    pairs = tmp_path / "hh.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["feedback", "eval", "--pairs", str(pairs), "--judge", "embedded:tiny-random",
                                 "--method", "contrast", "--no-sanity", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "1 pair(s) of" in result.output and "empty answer" in result.output
    assert len(records_of(tmp_path / "eval" / "verdicts.jsonl")) == 1


def test_cli_eval_prints_a_table_per_method(tmp_path):
    from cai.cli import app

    result = runner.invoke(app, ["feedback", "eval", "--pairs", "data/helpful_prefs_example.jsonl", "--judge",
                                 "embedded:tiny-random", "--limit", "4", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "method mc (swap on" in result.stdout and "method contrast" in result.stdout
    for name in ("pairs: helpful_prefs_example.jsonl", "sanity: harmful-request", "sanity: benign-request"):
        assert result.stdout.count(name) == 2
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = saved["methods"]
    assert "best --judge-temperature on helpful_prefs_example.jsonl" in result.stdout
    assert saved["temperature_fit"]["contrast"]["log_loss_fit"] <= saved["temperature_fit"]["contrast"]["log_loss"]
    assert metrics["mc"]["sanity: harmful-request"]["pairs"] == 24
    assert metrics["mc"]["pairs: helpful_prefs_example.jsonl"]["position_consistency"] is not None
    assert metrics["contrast"]["pairs: helpful_prefs_example.jsonl"]["agreement_first"] is None
    assert len(records_of(tmp_path / "eval" / "verdicts.jsonl")) == 2 * (4 + 40)


def test_eval_judges_a_pair_in_two_sets_once(monkeypatch):
    """The sanity file given as --pairs is also the sanity set: each pair is one question, asked once."""
    from cai.judge import Judge
    from cai.paths import bundled
    from cai.stages.base import StageContext
    from cai.stages.feedback import FeedbackEvalConfig, run_eval

    asked = []
    real_compare = Judge.compare

    def counting(self, comparisons, progress=None):
        asked.append(len(comparisons))
        return real_compare(self, comparisons, progress)

    monkeypatch.setattr(Judge, "compare", counting)
    cfg = FeedbackEvalConfig(pairs=str(bundled("data/judge_sanity_pairs.jsonl")), judge="embedded:tiny-random",
                             method="contrast")
    result = run_eval(cfg, StageContext(device="cpu"))
    metrics = result.metrics["methods"]["contrast"]
    assert asked == [40]
    assert metrics["pairs: judge_sanity_pairs.jsonl"]["pairs"] == 40
    assert metrics["sanity: harmful-request"]["pairs"] + metrics["sanity: benign-request"]["pairs"] == 40
    # the same verdicts seen through both sets: the sets' agreements average to the whole file's
    whole = metrics["pairs: judge_sanity_pairs.jsonl"]["agreement"]
    parts = (24 * metrics["sanity: harmful-request"]["agreement"] + 16 * metrics["sanity: benign-request"]["agreement"])
    assert parts / 40 == pytest.approx(whole)
