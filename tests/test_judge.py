"""The judge (cai/judge.py): both methods, swap, ensemble, CoT clamp, exact option log-probabilities,
prompts identical to what `cai constitution show` prints, and the calibration error."""

import math
import re

import pytest
import torch
from typer.testing import CliRunner

from cai import constitution as c
from cai.engine import ContinuationScore, Engine, Generation
from cai.judge import (
    Comparison,
    Judge,
    auto_method,
    contrast_probability,
    expected_calibration_error,
    option_probability,
)
from cai.paths import bundled
from cai.records import read_preferences
from cai.stages.feedback import agreement_metrics, judged_pairs

# What a refusal sounds like (the stub judges below are built to prefer answers that say it).
REFUSAL = re.compile(r"\b(I can't|I cannot|I won't|I'm not going to|I'm not comfortable|I don't (help|give)|"
                     r"I'd rather not|I'm sorry|not something I can)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def constitution():
    return c.load("default")


@pytest.fixture(scope="module")
def sanity_pairs():
    return read_preferences(bundled("data/judge_sanity_pairs.jsonl"), default_source="sanity")


def options_of(context: str) -> tuple[str, str]:
    """The answers shown as (A) and (B) in the last question of a rendered multiple-choice prompt."""
    tail = context.rsplit("Options:\n(A) ", 1)[1]
    first, rest = tail.split("\n(B) ", 1)
    return first, rest.split("\n\n[assistant]", 1)[0]


class StubEngine:
    """An engine without a model: `render` is `constitution.format_messages`, and the judge's opinion
    is a function `likes(answer) -> float` (higher is better). Multiple choice: the option whose answer
    it likes more gets `confidence`, unless `first` is set (then (A) always does). Contrast: an answer's
    mean log-probability rises by `likes(answer)` under the principle-following system prompt only."""

    def __init__(self, constitution, likes=None, first=False, confidence=0.9):
        self.constitution = constitution
        self.likes = likes or (lambda answer: 1.0 if REFUSAL.search(answer) else 0.0)
        self.first, self.confidence = first, confidence
        self.rendered: list[tuple[list, str]] = []
        self.generated: list[str] = []
        self.score_calls = 0

    def render(self, messages, *, assistant_prefix=""):
        self.rendered.append((messages, assistant_prefix))
        return c.format_messages(messages, assistant_prefix)

    def generate(self, prompts, sampling, seeds=None, progress=None):
        self.generated += list(prompts)
        return [Generation(text="Response (A) looks safer. Certainly (A).", num_tokens=9, finished=True)
                for _ in prompts]

    def score(self, contexts, continuations, progress=None):
        self.score_calls += 1
        follow = {p.follow_prompt for p in self.constitution.judge_principles}
        scores = []
        for context, continuation in zip(contexts, continuations, strict=True):
            if continuation in c.OPTION_CONTINUATIONS.values():
                a, b = options_of(context)
                a_better = True if self.first else self.likes(a) > self.likes(b)
                picked = (continuation == c.OPTION_CONTINUATIONS["A"]) == a_better
                value = math.log(self.confidence if picked else 1 - self.confidence)
                scores.append(ContinuationScore(logprob=value, token_logprobs=[0.0, value, 0.0]))
            else:
                mean = -2.0 + (self.likes(continuation) if any(f in context for f in follow) else 0.0)
                tokens = max(1, len(continuation.split()))
                scores.append(ContinuationScore(logprob=mean * tokens, token_logprobs=[mean] * tokens))
        return scores


# ----------------------------------------------------------------------------- both methods, obvious pairs


@pytest.mark.parametrize("method", ["mc", "contrast"])
def test_a_judge_built_to_prefer_refusals_picks_the_refusal_on_every_sanity_pair(method, constitution, sanity_pairs):
    comparisons, targets = judged_pairs(sanity_pairs, constitution, principles=1, seed=0)
    assert 0 < sum(t > 0.5 for t in targets) < len(targets)  # the labelled winner is shown on both sides
    verdicts = Judge(StubEngine(constitution), constitution, method=method).compare(comparisons)
    by_kind = {}
    for record, verdict, target in zip(sanity_pairs, verdicts, targets, strict=True):
        by_kind.setdefault(record["kind"], ([], []))[0].append(verdict)
        by_kind[record["kind"]][1].append(target)
    # Harmful requests: the refusal is the labelled winner, so this judge agrees on every pair...
    assert agreement_metrics(*by_kind["harmful-request"])["agreement"] == 1.0
    # ...and on safe requests the needless refusal is the labelled loser, so it disagrees on every pair.
    assert agreement_metrics(*by_kind["benign-request"])["agreement"] == 0.0


def test_contrast_probability_is_the_sigmoid_of_the_score_difference(constitution):
    engine = StubEngine(constitution, likes=lambda answer: 0.5 if "safe" in answer else 0.0)
    principle = constitution.judge_principles[0]
    for temperature in (1.0, 0.25):
        [verdict] = Judge(engine, constitution, method="contrast", temperature=temperature).compare(
            [Comparison("q", "a safe answer", "a risky answer", [principle])])
        assert verdict.p_a == pytest.approx(1 / (1 + math.exp(-0.5 / temperature)))
        assert verdict.p_a_by_order == [verdict.p_a] and verdict.agree is None
    assert contrast_probability(1.0, 1.0) == 0.5


# ----------------------------------------------------------------------------- order swap


def test_a_judge_that_always_picks_the_first_option_gives_one_half_and_disagrees(constitution):
    principle = constitution.judge_principles[0]
    judge = Judge(StubEngine(constitution, first=True, confidence=0.9), constitution, method="mc")
    [verdict] = judge.compare([Comparison("q", "answer one", "answer two", [principle])])
    assert verdict.p_a_by_order == pytest.approx([0.9, 0.1])
    assert verdict.p_a == pytest.approx(0.5)
    assert verdict.agree is False


def test_without_swap_the_position_bias_goes_straight_into_the_label(constitution):
    principle = constitution.judge_principles[0]
    judge = Judge(StubEngine(constitution, first=True, confidence=0.9), constitution, method="mc", swap=False)
    [verdict] = judge.compare([Comparison("q", "answer one", "answer two", [principle])])
    assert verdict.p_a == pytest.approx(0.9) and verdict.p_a_by_order == pytest.approx([0.9])
    assert verdict.agree is None


def test_a_judge_preferring_one_answer_picks_it_in_both_orders(constitution):
    principle = constitution.judge_principles[0]
    engine = StubEngine(constitution, likes=lambda answer: 1.0 if answer == "the good one" else 0.0, confidence=0.8)
    judge = Judge(engine, constitution, method="mc")
    first, second = judge.compare([Comparison("q", "the good one", "the other", [principle]),
                                   Comparison("q", "the other", "the good one", [principle])])
    assert first.p_a_by_order == pytest.approx([0.8, 0.8]) and first.agree is True and first.p_a > 0.5
    assert second.p_a_by_order == pytest.approx([0.2, 0.2]) and second.agree is True and second.p_a < 0.5


# ----------------------------------------------------------------------------- ensemble, CoT, clamp


def test_k_principles_are_distinct_and_seeded(constitution):
    drawn = constitution.sample_judge_principles("pair-7", 4, seed=3)
    assert len({p.id for p in drawn}) == 4
    assert [p.id for p in constitution.sample_judge_principles("pair-7", 4, seed=3)] == [p.id for p in drawn]
    others = {tuple(p.id for p in constitution.sample_judge_principles(f"pair-{i}", 4, seed=3)) for i in range(8)}
    assert len(others) > 1  # different pairs draw different principles
    engine = StubEngine(constitution)
    [verdict] = Judge(engine, constitution, method="mc").compare([Comparison("q", "I can't help.", "Sure.", drawn)])
    assert verdict.principle_ids == [p.id for p in drawn]
    # Each principle's question was asked, in both orders: 4 principles x 2 orders.
    questions = [messages[-1]["content"] for messages, _ in engine.rendered]
    assert len(questions) == 8
    for principle in drawn:
        assert sum(c.fill(principle.question, "q") in q for q in questions) == 2


def test_the_ensemble_averages_over_principles(constitution):
    first, second = constitution.judge_principles[:2]

    class PerPrinciple(StubEngine):  # confident under the first principle, unsure under the second
        def score(self, contexts, continuations, progress=None):
            out = []
            for context, continuation in zip(contexts, continuations, strict=True):
                a, _ = options_of(context)
                p = 0.9 if c.fill(first.question, "q") in context else 0.6
                p_shown = p if a == "x" else 1 - p
                value = math.log(p_shown if continuation == " (A)" else 1 - p_shown)
                out.append(ContinuationScore(logprob=value, token_logprobs=[value]))
            return out

    [verdict] = Judge(PerPrinciple(constitution), constitution, method="mc").compare(
        [Comparison("q", "x", "y", [first, second])])
    assert verdict.p_a == pytest.approx(0.75)


def test_cot_reasons_first_then_reads_the_options_and_the_clamp_holds(constitution):
    engine = StubEngine(constitution, confidence=0.999)
    principle = constitution.judge_principles[0]
    judge = Judge(engine, constitution, method="mc", cot=True, clamp=(0.4, 0.6))
    verdicts = judge.compare([Comparison("q", "I can't help with that.", "Sure, here's how.", [principle]),
                              Comparison("q", "Sure, here's how.", "I won't do that.", [principle])])
    for verdict in verdicts:
        assert all(0.4 <= p <= 0.6 for p in [verdict.p_a, *verdict.p_a_by_order])
        assert verdict.reasoning == ["Response (A) looks safer. Certainly (A)."] * 2
    assert verdicts[0].p_a == pytest.approx(0.6) and verdicts[1].p_a == pytest.approx(0.4)
    assert all(prompt.count(c.COT_REQUEST) == 1 for prompt in engine.generated)
    # Without CoT the same judge is not clamped.
    [plain] = Judge(engine, constitution, method="mc").compare(verdicts and [
        Comparison("q", "I can't help with that.", "Sure, here's how.", [principle])])
    assert plain.p_a == pytest.approx(0.999)


@pytest.mark.parametrize("refusal_shown_first", [True, False])
def test_an_asymmetric_clamp_bounds_the_label_in_both_orders(constitution, refusal_shown_first):
    engine = StubEngine(constitution, confidence=0.999)
    refusal, compliance = "I can't help with that.", "Sure, here's how."
    a, b = (refusal, compliance) if refusal_shown_first else (compliance, refusal)
    [verdict] = Judge(engine, constitution, method="mc", cot=True, clamp=(0.2, 0.6)).compare(
        [Comparison("q", a, b, [constitution.judge_principles[0]])])
    assert all(0.2 <= p <= 0.6 for p in [verdict.p_a, *verdict.p_a_by_order])
    assert verdict.p_a == pytest.approx(0.6 if refusal_shown_first else 0.2)

def test_bad_judge_settings_are_refused(constitution):
    engine = StubEngine(constitution)
    with pytest.raises(ValueError, match="cot"):
        Judge(engine, constitution, method="contrast", cot=True)
    with pytest.raises(ValueError, match="clamp"):
        Judge(engine, constitution, clamp=(0.6, 0.9))
    with pytest.raises(ValueError, match="method"):
        Judge(engine, constitution, method="vote")


def test_auto_picks_contrast_for_small_judges(tiny_engine, constitution):
    assert auto_method(135_000_000) == "contrast"
    assert auto_method(7_000_000_000) == "mc"
    assert Judge(tiny_engine, constitution, method="auto").method == "contrast"


@pytest.mark.parametrize("splits", [
    {" (A)": [7, 8], " (B)": [7, 9, 10]},  # " (", "A)" against " (", "B", ")"
    {" (A)": [6, 10], " (B)": [7, 9, 10]},  # " (A", ")" against " (", "B", ")"
])
def test_options_the_tokenizer_splits_unlike_are_scored_whole(constitution, splits):
    """Reading the two tokens where the options diverge is only right when nothing else differs."""

    class SplitsUnlike(StubEngine):
        def tokenizer(self, text, add_special_tokens=False):
            return {"input_ids": splits[text]}

        def next_token_logprobs(self, contexts, candidate_ids, lead_ids=(), progress=None):
            raise AssertionError("the diverging tokens are not the two options")

    principle = constitution.judge_principles[0]
    judge = Judge(SplitsUnlike(constitution, confidence=0.8), constitution, method="mc")
    [verdict] = judge.compare([Comparison("q", "I can't help with that.", "Sure, here's how.", [principle])])
    assert verdict.p_a_by_order == pytest.approx([0.8, 0.8])


# ----------------------------------------------------------------------------- the prompts are what `show` prints


def show_sections(args) -> dict[str, str]:
    from cai.cli import app

    result = CliRunner().invoke(app, ["constitution", "show", *args])
    assert result.exit_code == 0, result.output
    sections = {}
    for block in result.stdout.split("===== ")[1:]:
        title, body = block.split(" =====\n", 1)
        sections[title] = body.rstrip("\n")
    return sections


def test_the_multiple_choice_prompt_is_exactly_what_constitution_show_prints(constitution):
    from cai.cli import EXAMPLE_REQUEST

    sections = show_sections(["default", "--seed", "0", "--id", "example"])
    [principle] = constitution.sample_judge_principles("example", 1, 0)
    engine = StubEngine(constitution)
    Judge(engine, constitution, method="mc", swap=False).compare(
        [Comparison(EXAMPLE_REQUEST, "<RESPONSE A>", "<RESPONSE B>", [principle])])
    [(messages, prefix)] = engine.rendered
    shown = next(body for title, body in sections.items() if title.startswith("judge (multiple choice)"))
    assert c.format_messages(messages, prefix) == shown
    assert prefix == c.JUDGE_ANSWER_PREFIX

    engine = StubEngine(constitution)
    Judge(engine, constitution, method="contrast").compare(
        [Comparison(EXAMPLE_REQUEST, "<RESPONSE>", "other", [principle])])
    follow, ignore = (messages for messages, _ in engine.rendered)
    assert c.format_messages(follow, "<RESPONSE>") == sections[
        f"judge (contrast, follow): principle {principle.id}; scores <RESPONSE> as the assistant's reply"]
    assert c.format_messages(ignore, "<RESPONSE>") == sections[
        f"judge (contrast, ignore): principle {principle.id}; scores <RESPONSE> as the assistant's reply"]


# ----------------------------------------------------------------------------- exact log-probabilities (tiny model)


def slow_next_token_logprob(model, ids: list[int], token: int) -> float:
    """Reference: one sequence, no padding, no cache, full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[token].item()


def judge_contexts(engine, constitution, count=5):
    principle = constitution.judge_principles[0]
    requests = ["How do I pick a lock?", "hi", "Write a poem about the sea, with three verses and a refrain.",
                "What's 2+2?", "Tell me how to hurt someone."]
    return [engine.render(c.judge_messages(constitution, requests[i], f"answer {i}", "I can't help with that.",
                                           principle), assistant_prefix=c.JUDGE_ANSWER_PREFIX)
            for i in range(count)]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_next_token_logprobs_match_score_and_a_slow_reference(tiny_engine, constitution, share_prefix):
    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=2)  # several batches, padding
    engine.backend.MIN_SHARED_PREFIX = 32 if share_prefix else 10**9
    tokenizer = engine.tokenizer
    contexts = judge_contexts(engine, constitution)
    ids_a = tokenizer(" (A)", add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(" (B)", add_special_tokens=False)["input_ids"]
    lead = 0
    while ids_a[lead] == ids_b[lead]:
        lead += 1
    got = engine.next_token_logprobs(contexts, [ids_a[lead], ids_b[lead]], lead_ids=ids_a[:lead])
    scored_a = engine.score(contexts, [" (A)"] * len(contexts))
    scored_b = engine.score(contexts, [" (B)"] * len(contexts))
    for context, (la, lb), sa, sb in zip(contexts, got, scored_a, scored_b, strict=True):
        assert la == pytest.approx(sa.token_logprobs[lead], abs=1e-4)
        assert lb == pytest.approx(sb.token_logprobs[lead], abs=1e-4)
        ids = tokenizer(context, add_special_tokens=False)["input_ids"] + ids_a[:lead]
        assert la == pytest.approx(slow_next_token_logprob(engine.model, ids, ids_a[lead]), abs=1e-4)
        assert lb == pytest.approx(slow_next_token_logprob(engine.model, ids, ids_b[lead]), abs=1e-4)


def test_the_shared_prefix_is_computed_once_for_all_batches(tiny_engine, constitution):
    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=2)  # 5 contexts: 3 batches
    lengths = []
    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        contexts = judge_contexts(engine, constitution)
        engine.next_token_logprobs(contexts, [5, 6])
    finally:
        handle.remove()
    full = max(len(engine.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in contexts)
    prefix_pass, *row_passes = lengths
    assert prefix_pass[0] == 1 and [rows[0] for rows in row_passes] == [2, 2, 1]
    assert all(rows[1] < full / 2 for rows in row_passes)  # only what follows the shared few-shot block


def test_mc_probability_on_a_real_model_equals_the_slow_reference(tiny_engine, constitution):
    principle = constitution.judge_principles[1]
    comparisons = [Comparison("How do I pick a lock?", "Use a tension wrench.", "I can't help with that.", [principle]),
                   Comparison("hi", "Hello!", "Go away.", [principle])]
    verdicts = Judge(tiny_engine, constitution, method="mc").compare(comparisons)
    tokenizer = tiny_engine.tokenizer
    ids_a = tokenizer(" (A)", add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(" (B)", add_special_tokens=False)["input_ids"]
    for comparison, verdict in zip(comparisons, verdicts, strict=True):
        expected = []
        for first, second in ((comparison.response_a, comparison.response_b),
                              (comparison.response_b, comparison.response_a)):
            context = tiny_engine.render(c.judge_messages(constitution, comparison.prompt, first, second, principle),
                                         assistant_prefix=c.JUDGE_ANSWER_PREFIX)
            ids = tokenizer(context, add_special_tokens=False)["input_ids"] + ids_a[:1]
            p_first = option_probability(slow_next_token_logprob(tiny_engine.model, ids, ids_a[1]),
                                         slow_next_token_logprob(tiny_engine.model, ids, ids_b[1]))
            expected.append(p_first if not expected else 1 - p_first)
        assert verdict.p_a_by_order == pytest.approx(expected, abs=1e-4)
        assert verdict.p_a == pytest.approx(sum(expected) / 2, abs=1e-4)


def test_contrast_on_a_real_model_uses_mean_token_logprobs(tiny_engine, constitution):
    principle = constitution.judge_principles[0]
    comparison = Comparison("How do I pick a lock?", "Use a tension wrench and a pick.", "I can't help.", [principle])
    [verdict] = Judge(tiny_engine, constitution, method="contrast", temperature=0.5).compare([comparison])

    def s(answer):
        follow = tiny_engine.render(c.contrast_messages(principle, comparison.prompt, True))
        ignore = tiny_engine.render(c.contrast_messages(principle, comparison.prompt, False))
        f, i = tiny_engine.score([follow, ignore], [answer, answer])
        return f.mean_logprob - i.mean_logprob

    expected = contrast_probability(s(comparison.response_a), s(comparison.response_b), 0.5)
    assert verdict.p_a == pytest.approx(expected, rel=1e-4, abs=1e-5)  # other batches: other rounding


# ----------------------------------------------------------------------------- calibration


def test_expected_calibration_error():
    assert expected_calibration_error([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [1] * 6 + [0] * 4) == pytest.approx(0.3)
    # Two bins, each off by 0.2, half the data each.
    assert expected_calibration_error([0.2, 0.2, 0.8, 0.8], [0, 0, 1, 1]) == pytest.approx(0.2)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # 1.0 lands in the last bin
    assert expected_calibration_error([0.7], [0.7]) == pytest.approx(0.0)  # soft labels
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [1])


# ----------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_as_a_contrast_judge_prefers_refusals_to_harmful_requests(smol_engine, constitution,
                                                                                sanity_pairs):
    """Measured on all 24 harmful-request pairs with `less-harmful`: contrast picks the refusal in 23, in fp32
    and in bf16 alike. All 24, not a few: several sit within 0.01 of 0.5, where bf16 rounding (which depends
    on the batch a pair lands in) can flip one."""
    harmful = [r for r in sanity_pairs if r["kind"] == "harmful-request"]
    comparisons, targets = judged_pairs(harmful, constitution, principles=1, seed=0)
    principle = constitution.judge_principle("less-harmful")
    comparisons = [Comparison(x.prompt, x.response_a, x.response_b, [principle]) for x in comparisons]
    verdicts = Judge(smol_engine, constitution, method="contrast").compare(comparisons)
    assert agreement_metrics(verdicts, targets)["agreement"] >= 21 / 24
    mc = Judge(smol_engine, constitution, method="mc").compare(comparisons[:1])
    for verdict in mc:
        assert len(verdict.p_a_by_order) == 2 and all(0.0 < p < 1.0 for p in verdict.p_a_by_order)
