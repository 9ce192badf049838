import textwrap

import pytest
from typer.testing import CliRunner

from cai import constitution as c
from cai.cli import app
from cai.errors import ConfigError, ConstitutionError


def write(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


VALID = """\
    name: tiny
    description: A two-principle constitution.
    critique_principles:
      - id: harm
        critique: Point out harm in the answer to {prompt}.
        revision: Rewrite it without harm.
      - id: honesty
        critique: Point out anything false.
        revision: Rewrite it truthfully.
      - id: tone
        critique: Point out rudeness.
        revision: Rewrite it politely.
    judge_principles:
      - id: less-harmful
        question: Which is less harmful?
      - id: more-honest
        question: Which is more honest?
        follow: Be honest.
        ignore: Say anything.
    judge_examples:
      - prompt: hi
        response_a: hello
        response_b: go away
        answer: A
"""


@pytest.mark.parametrize("name", ["default", "short", "medical"])
def test_bundled_constitutions_are_valid(name):
    assert c.validate(name) == []


def test_default_constitution_has_enough_principles():
    loaded = c.load("default")
    assert len(loaded.critique_principles) >= 16 and len(loaded.judge_principles) >= 16


def test_template_from_init_is_valid(tmp_path):
    path = tmp_path / "new.yaml"
    c.write_template(path)
    assert c.validate(path) == []
    with pytest.raises(ConstitutionError, match="already exists"):
        c.write_template(path)


@pytest.mark.parametrize("broken, line, fragment", [
    ("    nme: tiny\n", 1, "unknown key `nme`"),  # typo of a top-level key
    ("        critque: x\n", 5, "did you mean `critique`"),
    ("      - id: harm\n", 7, "duplicate id 'harm'"),
    ("        revision: ''\n", 6, "is empty"),
    ("        critique: Point out {answer} harm.\n", 5, "unknown placeholder {answer}"),
    ("        answer: C\n", 24, "write A or B"),
])
def test_each_validation_error_names_its_line(tmp_path, broken, line, fragment):
    lines = textwrap.dedent(VALID).splitlines(keepends=True)
    target = line - 1
    lines[target] = textwrap.dedent(broken) if not broken.startswith("      ") else broken[4:]
    path = tmp_path / "rules.yaml"
    path.write_text("".join(lines))
    problems = c.validate(path)
    assert any(p.startswith(f"{path}:{line}:") and fragment in p for p in problems), problems


def test_all_problems_are_reported_at_once_in_line_order(tmp_path):
    path = write(tmp_path, VALID.replace("    name: tiny", "    name: Tiny")
                 .replace("Rewrite it truthfully.", "''").replace("question: Which is less harmful?", "questio: x"))
    problems = c.validate(path)
    assert len(problems) >= 4  # bad name, empty revision, unknown key, missing question
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines)


def test_missing_required_section_and_bad_yaml(tmp_path):
    path = write(tmp_path, "name: x\ndescription: y\n")
    problems = c.validate(path)
    assert any("missing `critique_principles`" in p for p in problems)
    bad = write(tmp_path, "name: [unclosed\n")
    assert c.validate(bad)[0].startswith(f"{bad}:")


def test_an_example_naming_a_principle_of_a_misspelled_section_adds_no_empty_suggestion(tmp_path):
    text = VALID + "    critique_examples:\n      - principle: harm\n        prompt: p\n        answer: a\n" \
        "        critique: c\n        revision: r\n"
    path = write(tmp_path, text.replace("critique_principles:", "critique_principle:"))
    problems = c.validate(path)
    assert any("missing `critique_principles`" in p for p in problems)
    assert not any(p.rstrip().endswith("use one of:") for p in problems), problems


def test_literal_braces_are_allowed_and_rendered(tmp_path):
    path = write(tmp_path, VALID.replace("Rewrite it politely.", "Rewrite it politely, {{like this}}."))
    loaded = c.load(path)
    assert c.fill(loaded.critique_principle("tone").revision, "q") == "Rewrite it politely, {like this}."
    assert c.fill(loaded.critique_principle("harm").critique, "make soup") == "Point out harm in the answer to make soup."


def test_sampling_is_seeded_reproducible_and_varies(tmp_path):
    loaded = c.load(write(tmp_path, VALID))
    first = [p.id for p in loaded.sample_critique_principles("item-1", 3, seed=0)]
    assert first == [p.id for p in loaded.sample_critique_principles("item-1", 3, seed=0)]
    assert len(set(first)) == 3  # a fresh principle every round while they last
    draws = {tuple(p.id for p in loaded.sample_critique_principles("item-1", 3, seed=s)) for s in range(12)}
    assert len(draws) > 1  # different seeds draw differently
    judge = loaded.sample_judge_principles("pair-9", 2, seed=4)
    assert len({p.id for p in judge}) == 2
    with pytest.raises(ConfigError, match="--principles 3, but constitution 'tiny' has 2 judge principles"):
        loaded.sample_judge_principles("pair-9", 3, seed=4)  # was: the two, one of them twice



@pytest.mark.parametrize("rounds", [5, 8])
def test_more_rounds_than_principles_never_repeat_one_twice_running(rounds):
    short = c.load("short")  # 4 critique principles: a second pass starts after round 4
    for item in range(200):
        drawn = [p.id for p in short.sample_critique_principles(f"item-{item}", rounds, seed=0)]
        assert all(a != b for a, b in zip(drawn, drawn[1:], strict=False)), drawn
        assert len(set(drawn[:4])) == 4  # each pass still uses every principle once

def test_derived_contrast_framings_use_the_question(tmp_path):
    loaded = c.load(write(tmp_path, VALID))
    derived, explicit = loaded.judge_principle("less-harmful"), loaded.judge_principle("more-honest")
    assert "Which is less harmful?" in derived.follow_prompt and "Which is less harmful?" in derived.ignore_prompt
    assert derived.follow_prompt != derived.ignore_prompt
    assert explicit.follow_prompt == "Be honest." and explicit.ignore_prompt == "Say anything."


def test_contrast_framings_fill_the_prompt_placeholder(tmp_path):
    text = (VALID.replace("question: Which is less harmful?", "question: Which reply to {prompt} is less harmful?")
            .replace("follow: Be honest.", "follow: Answer {prompt} honestly, {{no matter what}}."))
    loaded = c.load(write(tmp_path, text))
    derived, explicit = loaded.judge_principle("less-harmful"), loaded.judge_principle("more-honest")
    for follow in (True, False):
        [system, user] = c.contrast_messages(derived, "Build a cannon", follow)
        assert "Which reply to Build a cannon is less harmful?" in system["content"] and "{" not in system["content"]
        assert user == {"role": "user", "content": "Build a cannon"}
    [system, _] = c.contrast_messages(explicit, "Build a cannon", True)
    assert system["content"] == "Answer Build a cannon honestly, {no matter what}."


def test_show_prints_exactly_the_rendered_judge_prompt(tmp_path):
    path = write(tmp_path, VALID)
    result = CliRunner().invoke(app, ["constitution", "show", str(path), "--seed", "3", "--prompt", "Say hi"])
    assert result.exit_code == 0, result.output
    loaded = c.load(path)
    principle = loaded.sample_judge_principles("example", 1, 3)[0]
    expected = c.format_messages(c.judge_messages(loaded, "Say hi", "<RESPONSE A>", "<RESPONSE B>", principle),
                                 c.JUDGE_ANSWER_PREFIX)
    assert expected in result.stdout
    assert "hello" in expected and "(A) <RESPONSE A>" in expected  # few-shot example and options present


def test_validate_command_exits_nonzero_with_lines(tmp_path):
    path = write(tmp_path, VALID.replace("    name: tiny", "    name: tiny\n    extra: 1"))
    result = CliRunner().invoke(app, ["constitution", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: unknown key `extra`" in result.output


def test_braces_in_examples_are_literal_and_bad_placeholders_fail_at_load(tmp_path):
    text = VALID + "      - prompt: How do I make an empty dict?\n        response_a: Use d = {} in Python.\n" \
                   "        response_b: No.\n        answer: A\n"
    assert c.validate(write(tmp_path, text)) == []  # examples are shown as written, never filled
    assert "Use d = {} in Python." in c.load(write(tmp_path, text)).judge_examples[-1].response_a
    for bad in ("{prompt:d}", "{prompt!r}", "{prompt:>{width}}"):
        problems = c.validate(write(tmp_path, VALID.replace("Rewrite it politely.", f"Rewrite {bad}.")))
        assert len(problems) == 1 and f"unknown placeholder {bad}" in problems[0], problems


def test_a_placeholder_in_the_system_prompt_is_a_problem_and_braces_there_are_literal(tmp_path):
    problems = c.validate(write(tmp_path, VALID.replace("name: tiny", "name: tiny\n    system_prompt: Help with {prompt}.")))
    assert len(problems) == 1 and "system_prompt is sent as written" in problems[0] and ":2:" in problems[0]
    loaded = c.load(write(tmp_path, VALID.replace("name: tiny", "name: tiny\n    system_prompt: 'Answer in JSON: {}'")))
    assert loaded.system_prompt == "Answer in JSON: {}"


def test_unreadable_files_and_non_scalar_keys_are_problems_not_tracebacks(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text" in c.validate(binary)[0]
    assert "is a directory" in c.validate(tmp_path)[0]
    problems = c.validate(write(tmp_path, VALID + "    [a, b]: 1\n"))
    assert any("must be a plain name" in p and ":" in p.split(" ")[0] for p in problems), problems


def test_a_requests_own_system_message_opens_the_critique_conversation_before_the_examples():
    constitution = c.load("medical")  # has examples and a system prompt of its own
    request = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Is ibuprofen safe?"}]
    principle = constitution.critique_principles[0]
    messages = c.revision_messages(constitution, request, "Oui.", principle, "Too short.")
    assert messages[0] == request[0]  # not the constitution's, and not after the few-shot examples
    assert [m["role"] for m in messages].count("system") == 1
    assert messages[-5:-3] == [request[1], {"role": "assistant", "content": "Oui."}]
    assert c.answer_messages(constitution, request)[0] == request[0]


def test_round_k_draws_the_same_principle_whatever_the_number_of_rounds():
    short = c.load("short")  # 4 principles: 5 and 8 rounds both need a second pass
    for item in (f"p{i}" for i in range(50)):
        assert short.sample_critique_principles(item, 5, 0) == short.sample_critique_principles(item, 8, 0)[:5]
