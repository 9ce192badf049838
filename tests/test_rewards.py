"""Rewards (cai/rewards/): mixing, maths parsing, format/length, the PM wrapper, monitors. The code
sandbox has tests/test_sandbox.py."""

from fractions import Fraction

import pytest

from cai import rewards
from cai.errors import ConfigError, ModelError
from cai.paths import bundled
from cai.records import read_prompts
from cai.rewards import (
    CombinedReward,
    FormatReward,
    LengthPenalty,
    PreferenceModelReward,
    Thresholds,
    boilerplate_share,
    final_number,
    format_score,
    hacking_warnings,
    length_penalty,
    math_reward,
    math_score,
    parse_number,
    parse_reward_spec,
    slope,
    weighted_sum,
)


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]

# ----------------------------------------------------------------------------- specs and mixing


def test_parse_reward_spec():
    assert parse_reward_spec("pm:1") == ("pm", 1.0)
    assert parse_reward_spec("format:0.25") == ("format", 0.25)
    assert parse_reward_spec("math") == ("math", 1.0)
    assert parse_reward_spec("length:-0.5") == ("length", -0.5)
    for bad in ("helpfulness:1", "pm:x", "pm:0", "pm:nan"):
        with pytest.raises(ConfigError):
            parse_reward_spec(bad)


def test_weighted_sum_applies_the_weights_and_skips_parts_that_do_not_apply():
    values = [[1.0, 0.0, None], [0.5, None, None]]  # (K=2 parts, N=3 completions)
    assert weighted_sum(values, [2.0, -1.0]) == [1.5, 0.0, 0.0]
    assert weighted_sum([[1.0, 2.0]], [0.5]) == [0.5, 1.0]
    with pytest.raises(ValueError):
        weighted_sum(values, [1.0])


def test_combined_reward_weights_each_part_and_reports_it():
    def ones(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    def by_length(prompts, completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    logged, seen = [], []
    combined = CombinedReward([("a", ones, 0.5), ("b", by_length, 2.0)], observers=[seen.append])
    totals = combined([PROMPT, PROMPT], [answer("xy"), answer("xyz")],
                      log_metric=lambda name, value: logged.append((name, value)))
    assert totals == [0.5 + 2 * 2, 0.5 + 2 * 3]
    assert ("reward_a", 1.0) in logged and ("reward_b", 2.5) in logged
    assert seen[0].parts == {"a": [1.0, 1.0], "b": [2.0, 3.0]} and seen[0].completions == ["xy", "xyz"]
    with pytest.raises(ConfigError):
        CombinedReward([("a", ones, 1.0), ("a", ones, 2.0)])


# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize("text, expected", [
    ("42", "42"),
    ("42.0", "42"),
    ("$1,234", "1234"),
    ("It comes to 1,234.5 in total", "1234.5"),
    ("so the result is \\boxed{42}", "42"),
    ("The answer is 42.", "42"),
    ("The answer is -5.", "-5"),
    ("She ends up with -12 degrees", "-12"),
    ("3/4", "0.75"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("**Answer:** 17 apples", "17"),
    ("Total: 25%", "25"),
    ("First 12, then 7 more. The answer is 19. Check: 12 + 7 = 19", "19"),
    ("x = \\boxed{-\\frac{1}{2}}", "-1/2"),  # the sign before the fraction
    ("so x = -\\frac{3}{4}", "-3/4"),
    ("\\boxed{1{,}234}", "1234"),  # LaTeX's thousands separator
    ("So the area is 90 m^2.", "90"),  # an exponent is not the answer
])
def test_math_reads_the_final_number_in_several_written_forms(text, expected):
    assert final_number(text) == Fraction(expected)
    assert math_score(text, expected) == 1.0


def test_math_prefers_a_stated_answer_over_the_last_number():
    text = "The answer is 19. We had 12 and 7 more, and 7 is less than 12."
    assert math_score(text, "19") == 1.0
    assert math_score(text, "12") == 0.0


def test_math_scores_wrong_and_missing_answers_zero_and_skips_records_without_answer():
    assert math_score("The answer is 41.", "42") == 0.0
    assert math_score("The answer is 1000001", "1000000") == 0.0  # whole numbers compare exactly
    assert math_score("The answer is 2500000.5", 2500000) == 0.0
    assert math_score("It is about 0.333333", "1/3") == 1.0  # a rounded decimal for a fraction passes
    assert math_score("It is about 0.33", "1/3") == 0.0
    assert math_score("I am not sure.", "42") == 0.0
    assert math_score("The value is \\boxed{-\\frac{1}{2}}", "1/2") == 0.0  # a wrong sign is wrong
    assert math_score("The answer is 12", "1/2") == 0.0
    assert parse_number("1, 2") is None  # two numbers, not 12
    assert [parse_number(t) for t in (".5", "1e-3", "3.", "5 %", "$-5", "12,345,678")] == [
        Fraction(1, 2), Fraction(1, 1000), 3, 5, -5, 12345678]  # read as before
    assert final_number("so the total is 3 - \\frac{1}{2}") == Fraction(1, 2)  # a minus that subtracts
    scores = math_reward([PROMPT] * 3, [answer("42"), answer("42"), answer("7")], answer=["42", None, "8"])
    assert scores == [1.0, None, 0.0]


def test_every_bundled_math_answer_is_recognised_when_stated():
    records = [r for r in read_prompts(bundled("data/verifiable_prompts.jsonl")) if r.get("answer") is not None]
    assert len(records) >= 20
    for record in records:
        assert math_score(f"Working it out step by step, the answer is {record['answer']}.", record["answer"]) == 1.0


# ----------------------------------------------------------------------------- format and length


def test_format_score():
    assert format_score("Paris is the capital of France.") == 1.0
    assert format_score("```python\nprint(1)\n```") == 1.0
    assert format_score("") == 0.0
    assert format_score("   ") == 0.0
    assert format_score("Paris is the capital of") == 0.0  # stops mid-sentence
    assert format_score("```python\nprint(1)\n") == 0.0  # unclosed fence
    assert format_score("A complete sentence.", truncated=True) == 0.0


def test_format_reward_reads_truncation_from_the_token_ids():
    reward = FormatReward(stop_ids=[2])
    completions = [answer("Done."), answer("Done.")]
    assert reward([PROMPT] * 2, completions, completion_ids=[[5, 6, 2], [5, 6, 7]]) == [1.0, 0.0]


def test_length_penalty():
    assert length_penalty(10, 20) == 0.0
    assert length_penalty(20, 20) == 0.0
    assert length_penalty(30, 20) == -0.5
    assert length_penalty(100, 20) == -1.0
    reward = LengthPenalty(target_tokens=2)
    assert reward([PROMPT] * 2, [answer("a"), answer("b")], completion_ids=[[1, 2], [1, 2, 3]]) == [0.0, -0.5]


# ----------------------------------------------------------------------------- monitors


def test_boilerplate_share_finds_the_repeated_sentence():
    stock = "I'm sorry, but I can't help with that."
    texts = [f"{stock} Try a library.", f"Well. {stock}", "Paris is the capital of France.", f"{stock}"]
    share, sentence = boilerplate_share(texts)
    assert share == 0.75 and sentence == "i'm sorry, but i can't help with that"
    assert boilerplate_share(["Sure!", "Yes."]) == (0.0, None)
    assert boilerplate_share(["One answer here.", "Another answer there."]) == (0.0, None)  # nothing repeats


def test_boilerplate_is_a_sentence_shared_across_prompts_not_within_one_group():
    same = "Paris is the capital of France."
    texts = [same, same, "Rome is in Italy, of course.", "Berlin is in Germany, of course."]
    assert boilerplate_share(texts, ["q1", "q1", "q2", "q2"]) == (0.0, None)  # one prompt's group agreeing
    stock = "I cannot help with that."
    share, sentence = boilerplate_share([stock, stock, stock, same], ["q1", "q1", "q2", "q2"])
    assert share == 0.75 and sentence == "i cannot help with that"


def test_slope():
    assert slope([1, 2, 3, 4]) == pytest.approx(1.0)
    assert slope([5, 5, 5]) == 0.0
    assert slope([3]) == 0.0


def steps(**series):
    count = len(next(iter(series.values())))
    return [{"step": i + 1, **{key: values[i] for key, values in series.items()}} for i in range(count)]


def test_hacking_warnings_quiet_on_a_healthy_run():
    history = steps(mean_length=[40, 42, 41, 43, 40, 42], kl=[0, .01, .02, .02, .03, .03], clipped_ratio=[.1] * 6,
                    boilerplate_share=[.1, .1, .2, .1, .1, .2], reward_pm=[0, .1, .2, .3, .4, .5],
                    judge_score=[0, .01, .02, .03, .04, .05])
    assert hacking_warnings(history) == []


def test_hacking_warnings_flag_each_signal():
    history = steps(mean_length=[20, 22, 30, 40, 50, 60], kl=[0, .2, .4, .6, .8, .9],
                    boilerplate_share=[.1, .3, .6, .8, .9, .9], boilerplate_sentence=["x"] * 6,
                    reward_pm=[0, .2, .4, .6, .8, 1.0], judge_score=[.05, .04, .03, .02, .01, 0])
    history[-1]["clipped_ratio"] = history[-2]["clipped_ratio"] = 0.9
    found = hacking_warnings(history, Thresholds())
    assert len(found) == 5 and any("token limit" in w for w in found)
    assert any("length" in w for w in found) and any("KL" in w for w in found)
    assert any("repeat one sentence" in w for w in found) and any("held-back judge" in w for w in found)


def test_contrast_judge_scores_each_answer(tiny_engine):
    from cai import constitution

    judge = rewards.ContrastJudgeScore(tiny_engine, constitution.load("default"))
    prompts = [PROMPT, PROMPT, PROMPT]
    scores = judge(prompts, ["Five.", "", "Five."])
    assert scores[1] is None and isinstance(scores[0], float)
    # Same prompt, principle and answer at two batch positions: equal up to kernel rounding (fp32 kernels
    # differ by ~3e-6 relative between positions on CPUs without AVX512-BF16).
    assert scores[0] == pytest.approx(scores[2], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- preference model

OTHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}### ASSISTANT:\n{% endif %}")


@pytest.fixture(scope="module")
def other_pm_dir(tmp_path_factory):
    """A PM whose tokenizer (another vocabulary) and chat template both differ from the tiny policy's."""
    from transformers import AutoTokenizer

    from cai.models import TinyModelSpec, build_tiny_random, load_sequence_classifier

    base = build_tiny_random(tmp_path_factory.mktemp("other-base") / "model", TinyModelSpec(vocab_size=384, seed=3))
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(base)
    model, tokenizer = load_sequence_classifier(str(base), device="cpu")
    out = tmp_path_factory.mktemp("other-pm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_pm_scores_text_rendered_with_its_own_template(other_pm_dir, tiny_engine):
    reward = PreferenceModelReward(other_pm_dir, device="cpu")
    assert len(reward.tokenizer) != len(tiny_engine.tokenizer)
    seen = []
    forward = reward.model.forward

    def spy(*args, **kwargs):
        seen.extend(reward.tokenizer.decode(row[mask.bool()]) for row, mask in
                    zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True))
        return forward(*args, **kwargs)

    reward.model.forward = spy
    completions = [answer("Five."), answer("It is 5, because two and three make five.")]
    scores = reward([PROMPT, PROMPT], completions)

    expected = [reward.tokenizer.apply_chat_template(PROMPT + c, tokenize=False) for c in completions]
    assert sorted(seen) == sorted(expected)  # the PM received exactly its own rendering
    assert all(text.startswith("### USER:") and "<|im_start|>" not in text for text in seen)
    reward.model.forward = forward
    assert scores == pytest.approx(reward.score_texts(expected), rel=1e-4, abs=1e-5)
    policy_rendered = [tiny_engine.tokenizer.apply_chat_template(PROMPT + c, tokenize=False) for c in completions]
    assert scores != pytest.approx(reward.score_texts(policy_rendered), rel=1e-4, abs=1e-5)


def test_pm_directory_accepts_a_pm_train_output_directory(other_pm_dir, tmp_path):
    import shutil

    shutil.copytree(other_pm_dir, tmp_path / "model")
    assert rewards.pm_directory(tmp_path) == tmp_path / "model"
    with pytest.raises(Exception, match="no preference model"):
        rewards.pm_directory(tmp_path / "nothing")


def test_pm_directory_refuses_a_language_model(tiny_model_dir):
    """`--pm sl/model` for `--pm pm/model` loaded the policy with a random score head and scored with it."""
    with pytest.raises(ModelError, match="a language model .*ForCausalLM.*, not a preference model"):
        rewards.pm_directory(tiny_model_dir)


def test_pm_reads_the_max_length_it_was_trained_with(other_pm_dir, tmp_path):
    import json
    import shutil

    from cai.stages import pm

    assert rewards.PM_INFO == pm.PM_INFO
    shutil.copytree(other_pm_dir, tmp_path / "pm")
    (tmp_path / "pm" / rewards.PM_INFO).write_text(json.dumps({"max_length": 8}))
    reward = PreferenceModelReward(tmp_path / "pm", device="cpu")
    seen = []
    forward = reward.model.forward
    reward.model.forward = lambda *args, **kwargs: seen.append(kwargs["input_ids"]) or forward(*args, **kwargs)
    long_answer = "word " * 50 + "END"
    reward([PROMPT], [answer(long_answer)])
    full = reward.tokenizer(reward.render(PROMPT, answer(long_answer)), add_special_tokens=False)["input_ids"]
    assert seen[0][0].tolist() == full[-8:]  # the last 8 tokens: the end of the answer, where the reward is read


def test_pm_reward_agrees_with_cai_pm_scoring(other_pm_dir):
    from cai.stages.pm import RewardScorer

    reward = PreferenceModelReward(other_pm_dir, device="cpu")
    scorer = RewardScorer.from_directory(other_pm_dir, device="cpu", max_length=reward.max_length)
    answers = ["Five.", "It is 5, because two and three make five."]
    assert reward([PROMPT, PROMPT], [answer(a) for a in answers]) == pytest.approx(
        scorer.rewards([PROMPT, PROMPT], answers), abs=1e-5)
