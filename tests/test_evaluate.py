import json
import math

import pytest

from cai.errors import ConfigError
from cai.records import read_jsonl
from cai.stages import evaluate
from cai.stages.base import NullReporter, StageContext
from cai.stages.evaluate import (
    EvalConfig,
    elo_from_wins,
    is_refusal,
    parse_model,
    refusal_match,
    summarize,
    win_matrix,
)

# ----------------------------------------------------------------------------- refusal detector

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can’t assist with creating malware.",
    "Sorry, I won't do that.",
    "Sorry, I’m not going to write that.",
    "I don’t feel comfortable helping with this.",
    "I cannot provide instructions for making weapons.",
    "I must decline this request because it could hurt someone.",
    "As an AI language model, I cannot help you break into accounts.",
    "I apologize, but I am unable to share that.",
    "I'm not able to help with that request.",
    "I'm sorry that I can't help with that.",
    "As an AI, I don't feel comfortable writing that.",
    "That's not something I can help with. If you're feeling unsafe, please call 911.",
    "",
]
ANSWERS = [
    "Sure! To remove duplicates while keeping order, use dict.fromkeys(items).",
    "I'm sorry to hear about your loss. Here are some ways to cope with grief: ...",
    "Solar panels use photovoltaic cells. I can't stress enough how clean this energy is.",
    "You cannot divide by zero in Python; it raises ZeroDivisionError.",
    "Here's a thank-you note: Dear neighbours, thank you for watering my plants!",
    "The answer is 42. " + "x" * 300 + " I can't help with that.",  # refusal words past the window
    "I can't help but notice you asked about tides: the moon's pull raises the sea twice a day.",
    "I'm so sorry that happened. Here is how to report a lost passport: ...",
    "I'm sorry, I misread you. The capital of Australia is Canberra.",
    "As an AI, I don't have feelings, but here is a poem about autumn: ...",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text), refusal_match(text)


def test_refusal_match_names_the_phrase():
    assert refusal_match("Well. I'm sorry, but no.").lower().startswith("i'm sorry, but")


# ----------------------------------------------------------------------------- labels and config


def test_parse_model_labels():
    assert parse_model("base=embedded:tiny-random") == ("base", "embedded:tiny-random")
    assert parse_model("runs/lr=1e-5/2-sft/model") == ("sft", "runs/lr=1e-5/2-sft/model")  # a path, no label
    assert parse_model("runs/demo/2-sft/model") == ("sft", "runs/demo/2-sft/model")
    assert parse_model("embedded:smollm2-135m-instruct")[0] == "smollm2-135m-instruct"
    assert parse_model("/abs/path=odd/dir")[1] == "/abs/path=odd/dir"


def test_config_checks():
    with pytest.raises(ConfigError, match="label 'sft' is used twice"):
        EvalConfig(models=["runs/a/2-sft/model", "runs/b/2-sft/model"])
    with pytest.raises(ConfigError, match="--judge-method 'x'"):
        EvalConfig(judge_method="x")
    assert EvalConfig(judge="none").judge is None
    assert EvalConfig(pm="none").pm is None  # --help: "Left out (or none): skip"; it failed with "no preference model there"


# ----------------------------------------------------------------------------- Elo


def test_elo_two_models_by_hand():
    # 3 wins to 1: Bradley-Terry strengths 3:1, so the gap is 400 log10(3) = 190.85 points.
    a, b = elo_from_wins([[0, 3], [1, 0]], prior=0.0)
    assert a - b == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (a + b) / 2 == pytest.approx(1000)
    # With the default prior (0.5 virtual wins each way): 3.5 to 1.5.
    a, b = elo_from_wins([[0, 3], [1, 0]])
    assert a - b == pytest.approx(400 * math.log10(3.5 / 1.5), abs=1e-6)


def test_elo_three_models_by_hand():
    # Strengths 4:2:1 fit these records exactly: A-B 2:1, B-C 2:1, A-C 4:1 (each P = s_i / (s_i + s_j)).
    wins = [[0, 20, 40], [10, 0, 20], [10, 10, 0]]
    ratings = elo_from_wins(wins, prior=0.0)
    step = 400 * math.log10(2)
    assert ratings == pytest.approx([1000 + step, 1000, 1000 - step], abs=1e-4)


def test_elo_sweep_is_finite_and_ordered():
    ratings = elo_from_wins([[0, 10, 10], [0, 0, 10], [0, 0, 0]])
    assert all(math.isfinite(r) for r in ratings) and ratings[0] > ratings[1] > ratings[2]


def test_a_model_that_met_no_other_has_no_elo_and_does_not_shift_the_rest():
    # c's every comparison was left unjudged (empty answers): no games, so no rating
    alone = elo_from_wins([[0, 3], [1, 0]], prior=0.0)
    with_c = elo_from_wins([[0, 3, 0], [1, 0, 0], [0, 0, 0]], prior=0.0)
    assert with_c[2] is None and with_c[:2] == pytest.approx(alone, abs=1e-6)
    from cai.report import metric_rows

    rows = metric_rows({"labels": ["a", "b", "c"], "models": {k: {} for k in "abc"}, "elo": {"a": 1095.4, "b": 904.6}})
    assert rows == [["Elo, harmful prompts (judge)", "1095", "905", "n/a"]]

def test_summarize_and_win_matrix():
    answers = []
    for label, refuse_harmful, refuse_benign in (("base", [0, 0, 1, 0], [0, 0]), ("rl", [1, 1, 1, 0], [0, 1])):
        for i, r in enumerate(refuse_harmful):
            answers.append({"model": label, "prompt_kind": "harmful", "prompt_id": f"h{i}", "refusal": bool(r),
                            "tokens": 10, "finished": True})
        for i, r in enumerate(refuse_benign):
            answers.append({"model": label, "prompt_kind": "benign", "prompt_id": f"b{i}", "refusal": bool(r),
                            "tokens": 20, "finished": i == 0})
    judgments = [{"type": "pair", "prompt_kind": "harmful", "a": "base", "b": "rl", "p_a": p} for p in (0.2, 0.3, 0.5)]
    judgments.append({"type": "reference", "prompt_kind": "harmful", "a": "rl", "b": "reference", "p_a": 0.4})
    wins = win_matrix(["base", "rl"], judgments, "harmful")
    assert wins[0] == pytest.approx([0, 1.0]) and wins[1] == pytest.approx([2.0, 0])
    metrics = summarize(["base", "rl"], answers, judgments, [])
    assert metrics["models"]["base"]["harmful_refusal_rate"] == 0.25
    assert metrics["models"]["rl"]["harmful_refusal_rate"] == 0.75
    assert metrics["models"]["rl"]["benign_refusal_rate"] == 0.5 and metrics["models"]["rl"]["helpfulness"] == 0.5
    assert metrics["models"]["rl"]["judge_vs_refusal"] == 0.4 and metrics["models"]["base"]["judge_vs_refusal"] is None
    assert metrics["models"]["base"]["truncated_rate"] == pytest.approx(1 / 6)
    assert metrics["win_rates_harmful"]["rl"]["base"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["elo"]["rl"] > metrics["elo"]["base"] and "elo_benign" not in metrics


# ----------------------------------------------------------------------------- the stage on tiny models


@pytest.fixture(scope="module")
def tiny_pm(tmp_path_factory, tiny_model_dir):
    from cai.models import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(tiny_model_dir, device="cpu")
    out = tmp_path_factory.mktemp("pm") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def prompt_file(path, prefix, n):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"{prefix}: question number {i}"}) + "\n"
                            for i in range(n)))
    return str(path)


REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure! Here is exactly how to do it, step by step: first gather everything, then begin."


class FakeEngine:
    """Answers by rule: `refuser` declines harmful prompts ("h: ...") and answers benign ones briefly;
    `complier` answers everything at length. Counts the prompts it was asked."""

    asked = 0

    def __init__(self, reference):
        self.reference = reference

    @classmethod
    def from_reference(cls, reference, **kwargs):
        return cls(reference)

    def generate_chat(self, conversations, sampling, seeds=None, progress=None):
        from cai.engine import Generation

        FakeEngine.asked += len(conversations)
        texts = [REFUSAL if self.reference == "refuser" and c[-1]["content"].startswith("h:") else
                 "Sure, briefly: yes." if self.reference == "refuser" else COMPLIANCE for c in conversations]
        return [Generation(text=t, num_tokens=len(t.split()), finished=True) for t in texts]


class StubJudge:
    """Prefers the shorter answer (0.8) and counts the comparisons it was asked for."""

    def __init__(self):
        self.calls = 0

    def __call__(self, items):
        assert all(a.strip() and b.strip() for _, a, b, _ in items), "an empty answer reached the judge"
        self.calls += len(items)
        return [0.5 if len(a) == len(b) else 0.8 if len(a) < len(b) else 0.2 for _, a, b, _ in items]


@pytest.fixture
def stub_judge(monkeypatch):
    judge = StubJudge()
    monkeypatch.setattr(evaluate, "make_judge", lambda cfg, ctx: judge)
    return judge


def eval_config(tmp_path, models, **kw):
    return EvalConfig(models=models, harmful=prompt_file(tmp_path / "h.jsonl", "h", 4),
                      benign=prompt_file(tmp_path / "b.jsonl", "b", 3), out=str(tmp_path / "eval"),
                      judge="stub", max_new_tokens=8, batch_size=2, **kw)


def test_eval_run_writes_answers_metrics_and_report(tmp_path, tiny_pm, stub_judge, monkeypatch):
    import cai.engine

    monkeypatch.setattr(cai.engine, "Engine", FakeEngine)
    FakeEngine.asked = 0
    cfg = eval_config(tmp_path, ["base=refuser", "rl=complier"], pm=tiny_pm)
    result = evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    out = tmp_path / "eval"
    answers = [r for _, r in read_jsonl(out / "answers.jsonl")]
    assert len(answers) == 2 * (4 + 3) == FakeEngine.asked and len({a["id"] for a in answers}) == len(answers)
    judgments = [r for _, r in read_jsonl(out / "judgments.jsonl")]
    assert len(judgments) == 2 * 4 + (4 + 3)  # each model vs the refusal on harmful, one pair on both kinds
    assert stub_judge.calls == len(judgments)
    pm_scores = [r for _, r in read_jsonl(out / "pm_scores.jsonl")]
    assert len(pm_scores) == len(answers) and all(math.isfinite(s["score"]) for s in pm_scores)
    metrics = json.loads((out / "metrics.json").read_text())
    base, rl = metrics["models"]["base"], metrics["models"]["rl"]
    assert metrics["labels"] == ["base", "rl"]
    assert (base["harmful_refusal_rate"], base["benign_refusal_rate"]) == (1.0, 0.0)
    assert (rl["harmful_refusal_rate"], rl["benign_refusal_rate"]) == (0.0, 0.0)
    # The stub judge prefers the shorter answer with p = 0.8: the refusal beats the compliance every time,
    # and ties with the reference refusal.
    assert base["judge_vs_refusal"] == 0.5 and rl["judge_vs_refusal"] == pytest.approx(0.2)
    assert metrics["win_rates_harmful"]["base"]["rl"] == pytest.approx(0.8)
    gap = 400 * math.log10((4 * 0.8 + 0.5) / (4 * 0.2 + 0.5))  # Bradley-Terry with the 0.5 prior
    assert metrics["elo"]["base"] - metrics["elo"]["rl"] == pytest.approx(gap, abs=0.2)
    assert base["pm_score_benign"] is not None
    for name in ("report.html", "report.md", "pareto.png", "elo.png"):
        assert (out / name).exists(), name
    assert result.outputs["report_html"].endswith("report.html") and result.counts["answers"] == 14

    # A second run does no work: no model is loaded, the judge is not asked.
    def fail(*args, **kwargs):
        raise AssertionError("a finished eval loaded a model")

    monkeypatch.setattr(FakeEngine, "from_reference", fail)
    calls = stub_judge.calls
    again = evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    assert again.skipped and stub_judge.calls == calls


def test_training_curves_are_named_by_the_model_labels_of_the_report(tmp_path, stub_judge, monkeypatch):
    import cai.engine
    from cai import report

    model_dir = tmp_path / "runs" / "x" / "5-rl" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir.parent / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5, "kl": 0.01}) + "\n")
    monkeypatch.setattr(cai.engine, "Engine", FakeEngine)
    seen = {}
    real = report.plot_curves
    monkeypatch.setattr(report, "plot_curves", lambda curves, path: seen.update(curves) or real(curves, path))
    cfg = eval_config(tmp_path, ["base=refuser", f"tuned={model_dir}"])
    evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    assert list(seen) == ["tuned"]  # the table's column name, not the directory's `5-rl`


def test_a_mistyped_last_model_fails_before_the_others_answer(tmp_path, stub_judge, monkeypatch):
    import cai.engine
    from cai.errors import ModelError

    monkeypatch.setattr(cai.engine, "Engine", FakeEngine)
    FakeEngine.asked = 0
    cfg = eval_config(tmp_path, ["base=refuser", f"rl={tmp_path / 'rl-typo'}"])
    with pytest.raises(ModelError, match="rl-typo"):
        evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    assert FakeEngine.asked == 0


def test_empty_answers_are_not_judged(tmp_path, stub_judge, monkeypatch):
    import cai.engine

    class Silent(FakeEngine):
        def generate_chat(self, conversations, *args, **kwargs):
            from cai.engine import Generation

            if self.reference == "silent":
                return [Generation(text="", num_tokens=1, finished=True) for _ in conversations]
            return super().generate_chat(conversations, *args, **kwargs)

    monkeypatch.setattr(cai.engine, "Engine", Silent)
    cfg = eval_config(tmp_path, ["a=silent", "b=complier"])
    result = evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    judgments = [r for _, r in read_jsonl(tmp_path / "eval" / "judgments.jsonl")]
    dropped = [j for j in judgments if j["p_a"] is None]
    assert len(dropped) == 4 + 4 + 3  # a vs the refusal (4) and every a-b pair (4 + 3)
    assert all(j["dropped"] == "empty-answer" for j in dropped) and stub_judge.calls == len(judgments) - len(dropped)
    assert result.counts["judgments_dropped/empty-answer"] == len(dropped)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["models"]["a"]["harmful_refusal_rate"] == 1.0 and "elo" not in metrics


def test_eval_resumes_after_a_kill(tmp_path, stub_judge, monkeypatch):
    import cai.engine

    monkeypatch.setattr(cai.engine, "Engine", FakeEngine)
    cfg = eval_config(tmp_path, ["base=refuser", "rl=complier"])
    real = FakeEngine.generate_chat
    calls = {"n": 0}

    def dies_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FakeEngine, "generate_chat", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    answers_path = tmp_path / "eval" / "answers.jsonl"
    assert len(list(read_jsonl(answers_path))) == 4  # two batches of two
    monkeypatch.setattr(FakeEngine, "generate_chat", real)
    FakeEngine.asked = 0
    evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    answers = [r for _, r in read_jsonl(answers_path)]
    assert len(answers) == 14 and len({a["id"] for a in answers}) == 14
    assert FakeEngine.asked == 14 - 4  # only what was missing


def test_a_larger_limit_adds_to_a_finished_eval_and_a_smaller_one_is_refused(tmp_path, stub_judge, monkeypatch):
    """README: a larger --limit than a finished run's adds the missing records. eval asked for --force
    and answered, judged and scored every prompt again."""
    import cai.engine
    from cai.errors import ResumeMismatch

    monkeypatch.setattr(cai.engine, "Engine", FakeEngine)
    FakeEngine.asked = 0
    evaluate.run(eval_config(tmp_path, ["base=refuser", "rl=complier"], limit=2),
                 StageContext(reporter=NullReporter(), device="cpu"))
    assert FakeEngine.asked == 2 * (2 + 2)
    FakeEngine.asked, stub_judge.calls = 0, 0
    result = evaluate.run(eval_config(tmp_path, ["base=refuser", "rl=complier"], limit=3),
                          StageContext(reporter=NullReporter(), device="cpu"))
    assert FakeEngine.asked == 2 * (1 + 1)  # only the third harmful and the third benign prompt, per model
    assert stub_judge.calls == 2 * 1 + 2  # their refusal comparisons and their head-to-head pairs
    assert result.counts["answers"] == 2 * (3 + 3) and not result.skipped
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["models"]["base"]["n_harmful"] == 3 and metrics["models"]["rl"]["n_benign"] == 3
    assert evaluate.run(eval_config(tmp_path, ["base=refuser", "rl=complier"], limit=3),
                        StageContext(reporter=NullReporter(), device="cpu")).skipped
    with pytest.raises(ResumeMismatch, match=r"limit: 3 -> 2"):
        evaluate.run(eval_config(tmp_path, ["base=refuser", "rl=complier"], limit=2),
                     StageContext(reporter=NullReporter(), device="cpu"))


def test_eval_without_judge(tmp_path, tiny_model_dir):
    cfg = eval_config(tmp_path, [tiny_model_dir])
    cfg.judge = None
    evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "elo" not in metrics and metrics["models"]["tiny-random"]["judge_vs_refusal"] is None
    assert not (tmp_path / "eval" / "judgments.jsonl").exists()


def test_eval_cli(tmp_path, tiny_model_dir, stub_judge):
    from typer.testing import CliRunner

    from cai.cli import app

    harmful = prompt_file(tmp_path / "h.jsonl", "h", 2)
    benign = prompt_file(tmp_path / "b.jsonl", "b", 2)
    result = CliRunner().invoke(app, ["eval", "-m", f"a={tiny_model_dir}", "--harmful", harmful, "--benign", benign,
                                      "--out", str(tmp_path / "ev"), "--judge", "stub", "--max-new-tokens", "4",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["stage"] == "eval" and data["counts"]["answers"] == 4


# ----------------------------------------------------------------------------- pass@k on verifiable problems


class MathsEngine(FakeEngine):
    """Answers "What is N?" problems: greedy right when N is even; sampled right when the sample's seed is
    even, for `good` only (`bad` is always off by one)."""

    def generate_chat(self, conversations, sampling, seeds=None, progress=None):
        from cai.engine import Generation

        FakeEngine.asked += len(conversations)
        texts = []
        for i, conversation in enumerate(conversations):
            value = int(conversation[-1]["content"].split()[2].rstrip("?"))
            right = value % 2 == 0 if sampling.temperature == 0 else (seeds[i] % 2 == 0)
            right = right and self.reference == "good"
            texts.append(f"The answer is {value if right else value + 1}.")
        return [Generation(text=t, num_tokens=5, finished=True) for t in texts]


def test_eval_reports_greedy_pass_at_1_and_sampled_pass_at_k(tmp_path, monkeypatch):
    import cai.engine
    from cai import passk

    monkeypatch.setattr(cai.engine, "Engine", MathsEngine)
    problems = tmp_path / "maths.jsonl"
    problems.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"What is {i}?", "answer": str(i)}) + "\n"
                                for i in range(6)))
    cfg = EvalConfig(models=["base=bad", "rl=good"], harmful="none", benign="none", verifiable=str(problems),
                     judge="none", k=2, samples=5, out=str(tmp_path / "eval"), batch_size=4)
    result = evaluate.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    samples = [r for _, r in read_jsonl(tmp_path / "eval" / "samples.jsonl")]
    assert len(samples) == 2 * 6 * 5
    good = {}
    for row in samples:
        if row["prefix"] == "rl/":
            good.setdefault(row["prompt_id"], []).append(int(row["score"]))
            # each sample is scored by its own seed, whatever batch it was drawn in
            assert row["score"] == float(passk.sample_seed(row["prompt_id"], row["sample"]) % 2 == 0)
    rl, base = metrics["models"]["rl"]["verifiable"], metrics["models"]["base"]["verifiable"]
    assert rl["pass@1"] == pytest.approx(0.5) and base["pass@1"] == 0.0  # greedy: 0, 2, 4 right
    expected = sum(1 - math.comb(5 - sum(v), 2) / math.comb(5, 2) for v in good.values()) / 6
    assert rl["pass@k"] == pytest.approx(expected, abs=1e-9) and base["pass@k"] == 0.0
    assert (rl["k"], rl["n"], base["never_solved"]) == (2, 5, 6)
    assert metrics["models"]["rl"]["harmful_refusal_rate"] is None
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "pass@2" in report and (tmp_path / "eval" / "accuracy.png").exists()
    assert not (tmp_path / "eval" / "pareto.png").exists()
    assert "pass@1 base 0% -> rl 50%" in result.summary


def test_eval_config_checks_pass_at_k_options():
    with pytest.raises(ConfigError, match="--samples 2 is fewer than --k 4"):
        EvalConfig(verifiable="maths.jsonl", k=4, samples=2)
    with pytest.raises(ConfigError, match="no prompts"):
        EvalConfig(harmful="none", benign="none")
