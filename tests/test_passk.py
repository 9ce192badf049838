"""pass@k against a brute-force count over every k-subset, sampled scoring that resumes, and the
difficulty filter's choices on a stub policy (no model)."""

import itertools
import json

import pytest

from cai import passk
from cai.errors import ConfigError
from cai.records import RecordWriter, read_jsonl
from cai.stages import filter as filter_stage
from cai.stages.base import NullReporter, StageContext


def brute_force(outcomes: list[int], k: int, every: bool = False) -> float:
    """The share of k-subsets of the n answers with a correct one (`every`: all correct)."""
    subsets = list(itertools.combinations(outcomes, k))
    hits = [all(s) if every else any(s) for s in subsets]
    return sum(hits) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_the_count_over_all_k_subsets(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            assert passk.pass_at_k(n, c, k) == pytest.approx(brute_force(outcomes, k), abs=1e-12)
            assert passk.all_at_k(n, c, k) == pytest.approx(brute_force(outcomes, k, every=True), abs=1e-12)


def test_pass_at_k_edges_and_bad_arguments():
    assert passk.pass_at_k(10, 0, 5) == 0.0 and passk.pass_at_k(10, 6, 5) == 1.0  # 4 wrong < k: always a hit
    assert passk.pass_at_k(10, 5, 5) < 1.0
    assert passk.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)):
        with pytest.raises(ValueError):
            passk.pass_at_k(n, c, k)


def test_summarize_means_over_problems():
    figures = passk.summarize({"a": 1.0, "b": 0.0, "c": 0.0}, {"a": [1, 1, 1, 1], "b": [0, 0, 0, 0],
                                                               "c": [1, 0, 0, 1]}, k=2)
    assert figures["pass@1"] == pytest.approx(1 / 3)
    assert figures["pass@1_sampled"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert figures["pass@k"] == pytest.approx((1 + 0 + brute_force([1, 0, 0, 1], 2)) / 3)
    assert figures["all@k"] == pytest.approx((1 + 0 + brute_force([1, 0, 0, 1], 2, every=True)) / 3)
    assert (figures["never_solved"], figures["always_solved"], figures["n"]) == (1, 1, 4)


def test_answers_are_checked_with_the_maths_reward():
    records = [{"id": "a", "prompt": "2+2?", "answer": "4"}, {"id": "b", "prompt": "3*3?", "answer": "9"}]
    assert passk.score_answers(records, ["The answer is 4.", "It is 6."]) == [1.0, 0.0]


def test_code_answers_go_through_the_code_reward():
    class StubCode:
        def __call__(self, prompts, completions, tests=None, **kwargs):
            return [1.0 if "return a + b" in c else 0.0 for c in completions]

    records = [{"id": "c", "prompt": "add", "tests": ["assert add(1, 2) == 3"]}] * 2
    texts = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"]
    assert passk.score_answers(records, texts, code_reward=StubCode()) == [1.0, 0.0]


# ----------------------------------------------------------------------------- a stub policy

# Problem id -> which sample indices the stub answers correctly.
SOLVES = {"always": range(100), "never": (), "half": range(0, 100, 2), "once": (3,)}


def stub_records() -> list[dict]:
    records = [{"id": name, "prompt": f"question {name}", "answer": "7"} for name in SOLVES]
    return records + [{"id": "chat", "prompt": "hello"}]  # nothing to check it against


class StubSampler:
    """Answers "7" (correct) to problem p on sample i when i is in SOLVES[p], else "8"."""

    def __init__(self):
        self.asked = 0

    def __call__(self, conversations, index, ids):
        self.asked += len(conversations)
        return ["The answer is 7." if index in SOLVES[i] else "The answer is 8." for i in ids]


def test_sample_scores_resume_without_asking_again(tmp_path):
    sampler = StubSampler()
    records = stub_records()
    with RecordWriter(tmp_path / "s.jsonl") as writer:
        scores = passk.sample_scores(records, lambda: sampler, 4, 3, writer)
    assert scores == {"always": [1.0] * 4, "never": [0.0] * 4, "half": [1.0, 0.0, 1.0, 0.0], "once": [0, 0, 0, 1]}
    assert sampler.asked == 4 * 4  # the record without an answer is never sampled
    # Killed after the first 10 answers: the rerun draws only the 6 missing ones and agrees.
    lines = (tmp_path / "s.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "s.jsonl").write_text("".join(lines[:10]))
    again = StubSampler()
    with RecordWriter(tmp_path / "s.jsonl") as writer:
        assert passk.sample_scores(records, lambda: again, 4, 3, writer) == scores
    assert again.asked == 6
    with RecordWriter(tmp_path / "s.jsonl") as writer:
        passk.sample_scores(records, lambda: pytest.fail("a finished sampling loaded the sampler"), 4, 3, writer)


@pytest.mark.parametrize(("k", "samples", "kept"), [(1, 4, ["half", "once"]), (2, 4, ["half", "once"]),
                                                     (4, 4, ["half", "once"]), (2, 2, ["half"])])
def test_filter_keeps_what_the_policy_solves_sometimes(k, samples, kept):
    records = stub_records()
    scores = {r["id"]: [1.0 if i in SOLVES[r["id"]] else 0.0 for i in range(samples)]
              for r in records if "answer" in r}
    kept_records, dropped = filter_stage.choose(records, scores, k)
    assert [r["id"] for r in kept_records] == kept
    reasons = {r["id"]: r["dropped"] for r in dropped}
    assert reasons["always"] == "always-solved" and reasons["never"] == "never-solved"
    assert reasons["chat"] == "not-verifiable"


def test_filter_stage_on_a_stub_policy_writes_kept_dropped_and_resumes(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in stub_records()))
    sampler = StubSampler()
    monkeypatch.setattr(passk, "engine_sampler", lambda *args, **kwargs: sampler)
    import cai.engine

    monkeypatch.setattr(cai.engine.Engine, "from_reference", classmethod(lambda cls, *a, **kw: object()))
    cfg = filter_stage.FilterConfig(prompts=str(prompts), out=str(tmp_path / "f"), k=2, samples=6)
    result = filter_stage.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    kept = [r for _, r in read_jsonl(tmp_path / "f" / "prompts.jsonl")]
    dropped = {r["id"]: r for _, r in read_jsonl(tmp_path / "f" / "dropped.jsonl")}
    assert [r["id"] for r in kept] == ["half", "once"]
    assert kept[0]["answer"] == "7" and kept[0]["solved"] == 3
    assert kept[0]["pass_at_k"] == pytest.approx(brute_force([1, 0, 1, 0, 1, 0], 2), abs=1e-4)
    assert {i: r["dropped"] for i, r in dropped.items()} == {"always": "always-solved", "never": "never-solved",
                                                             "chat": "not-verifiable"}
    assert result.counts == {"prompts": 5, "kept": 2, "dropped/never-solved": 1, "dropped/always-solved": 1,
                             "dropped/not-verifiable": 1}
    assert sampler.asked == 4 * 6
    again = filter_stage.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
    assert again.skipped and sampler.asked == 4 * 6


def test_filter_config_needs_at_least_k_samples():
    with pytest.raises(ConfigError, match="--samples 2 is fewer than --k 4"):
        filter_stage.FilterConfig(prompts="p.jsonl", out="f", k=4, samples=2)


def test_an_answer_that_is_not_a_number_fails_in_one_line_before_sampling(tmp_path, monkeypatch):
    from cai.errors import RecordsError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "2+2?", "answer": "four"}) + "\n")
    monkeypatch.setattr(passk, "engine_sampler", lambda *a, **kw: pytest.fail("sampled before checking answers"))
    cfg = filter_stage.FilterConfig(prompts=str(prompts), out=str(tmp_path / "f"))
    with pytest.raises(RecordsError, match=r"p.jsonl: record 'x': answer 'four' is not one number"):
        filter_stage.run(cfg, StageContext(reporter=NullReporter(), device="cpu"))
