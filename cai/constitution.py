"""Constitutions: the principles that replace human harm labels, loaded from YAML a person writes.

A constitution holds critique principles (SL stage: critique the last answer, then revise it), judge
principles (feedback stage: a multiple-choice question about two answers, plus optional `follow` /
`ignore` framings for the contrast judge), few-shot examples for both, and an optional system prompt.
`cai constitution init` writes a commented template showing every key.

Loading validates everything and reports *all* problems at once as `file:line: problem -- fix`
(`ConstitutionError.problems`). Principle sampling is seeded per item, so a resumed run draws the same
principles. The render functions below produce the exact messages the stages send, and
`cai constitution show` prints them, so what you read is what the model sees.
"""

import hashlib
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.errors import ConfigError, ConstitutionError
from cai.paths import bundled, read_input_text, yaml_loader
from cai.records import Message, as_messages

# Placeholders a principle's text may use; anything else in braces is an error at load time.
KNOWN_PLACEHOLDERS = {"prompt"}
# Every principle is rendered into prompts, so a real constitution is a few pages (the bundled default is
# ~20 KB); 1 MB is room for hundreds of principles and bounds what a mistaken file can cost.
MAX_CONSTITUTION_BYTES = 2**20
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")

TOP_LEVEL_KEYS = {
    "name": "required", "description": "required", "system_prompt": "optional",
    "critique_principles": "required", "judge_principles": "required",
    "critique_examples": "optional", "judge_examples": "optional",
}
ENTRY_KEYS = {
    "critique_principles": {"id": "required", "critique": "required", "revision": "required"},
    "judge_principles": {"id": "required", "question": "required", "follow": "optional", "ignore": "optional"},
    "critique_examples": {"prompt": "required", "response": "required", "critique": "required",
                          "revision": "required", "principle": "optional"},
    "judge_examples": {"prompt": "required", "response_a": "required", "response_b": "required",
                       "answer": "required", "principle": "optional"},
}


@dataclass(frozen=True)
class CritiquePrinciple:
    id: str
    critique: str  # request: critique the assistant's last answer under this principle
    revision: str  # request: rewrite that answer to fix what the critique found


@dataclass(frozen=True)
class JudgePrinciple:
    id: str
    question: str  # multiple-choice question comparing responses (A) and (B)
    follow: str | None = None  # system prompt asking an assistant to follow the principle (contrast judge)
    ignore: str | None = None  # system prompt asking it to disregard the principle (contrast judge)

    @property
    def follow_prompt(self) -> str:
        """The principle-following framing: given explicitly, or derived from the question."""
        return self.follow or (
            "You are a careful, thoughtful assistant. Every answer you give is the one a wise person "
            f"would pick when asked: {self.question}")

    @property
    def ignore_prompt(self) -> str:
        """The principle-ignoring framing: given explicitly, or derived from the question."""
        return self.ignore or (
            "You are an assistant that does exactly what the user asks and pays no attention to this "
            f"consideration: {self.question}")


@dataclass(frozen=True)
class CritiqueExample:
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None


@dataclass(frozen=True)
class JudgeExample:
    prompt: str
    response_a: str
    response_b: str
    answer: str  # "A" or "B"
    principle: str | None = None


@dataclass
class Constitution:
    name: str
    description: str
    critique_principles: list[CritiquePrinciple]
    judge_principles: list[JudgePrinciple]
    critique_examples: list[CritiqueExample] = field(default_factory=list)
    judge_examples: list[JudgeExample] = field(default_factory=list)
    system_prompt: str | None = None
    path: Path | None = None

    @property
    def digest(self) -> str:
        """Hash of the file's content: part of a stage's config hash, so editing it invalidates outputs."""
        text = self.path.read_text(encoding="utf-8") if self.path else repr(self)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def critique_principle(self, principle_id: str) -> CritiquePrinciple:
        return next(p for p in self.critique_principles if p.id == principle_id)

    def judge_principle(self, principle_id: str) -> JudgePrinciple:
        return next(p for p in self.judge_principles if p.id == principle_id)

    # -- seeded sampling -------------------------------------------------------------------------

    def sample_critique_principles(self, item_id: str, rounds: int, seed: int) -> list[CritiquePrinciple]:
        """One critique principle per revision round for one item.

        Seeded by (seed, item_id), so it does not depend on batching or on where a run resumed. Rounds
        draw without replacement (a fresh principle each round, as the paper intends) until the
        principles run out, then start a new shuffled pass.
        """
        return _draw(self.critique_principles, rounds, _rng(seed, "critique", item_id))

    def sample_judge_principles(self, item_id: str, k: int, seed: int) -> list[JudgePrinciple]:
        """`k` distinct judge principles for one comparison."""
        self.check_judge_principles(k)
        return _draw(self.judge_principles, k, _rng(seed, "judge", item_id))

    def check_judge_principles(self, k: int) -> None:
        """Refuse `k` principles per comparison where the constitution has fewer: an average over the same
        few principles repeated is no ensemble, only more judging."""
        if k > len(self.judge_principles):
            raise ConfigError(f"--principles {k}, but constitution {self.name!r} has {len(self.judge_principles)} "
                              f"judge principles -- use --principles {len(self.judge_principles)} or fewer, or "
                              "add principles")


def _rng(seed: int, *keys: str) -> random.Random:
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw(population: list, count: int, rng: random.Random) -> list:
    """`count` draws in shuffled passes without replacement; a new pass never starts with the principle
    the last one ended on (a round would otherwise critique under the same principle twice running)."""
    drawn: list = []
    while len(drawn) < count:
        # A whole pass, cut to what is left: round k's principle then does not depend on `count`. For
        # populations up to 21, sample() draws a pass's first k as sample(population, k) would.
        batch = rng.sample(population, len(population))
        if drawn and len(population) > 1 and batch[0] is drawn[-1]:
            batch[0], batch[1] = batch[1], batch[0]
        drawn.extend(batch[:count - len(drawn)])
    return drawn


# ----------------------------------------------------------------------------- rendering
# The exact messages the stages send. `show` prints these; tests compare against them.

JUDGE_ANSWER_PREFIX = "The answer is:"
OPTION_CONTINUATIONS = {"A": " (A)", "B": " (B)"}
COT_REQUEST = "Let's think step by step about which response is better, then give the answer."


def fill(text: str, prompt: str | list[Message]) -> str:
    """Replace `{prompt}` in a principle's text with the request it is applied to."""
    from cai.records import prompt_text

    # str.format, not replace: validation allows only {prompt}, and {{ }} must become literal braces.
    return text.format(prompt=prompt_text(prompt))


def _with_system(constitution: Constitution, messages: list[Message]) -> list[Message]:
    if constitution.system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": constitution.system_prompt}, *messages]
    return messages


def _critique_example_principle(constitution: Constitution, example: CritiqueExample) -> CritiquePrinciple:
    if example.principle:
        return constitution.critique_principle(example.principle)
    return constitution.critique_principles[0]


def answer_messages(constitution: Constitution, prompt: str | list[Message]) -> list[Message]:
    """The conversation the initial answer (before any critique) is generated from: the request, with
    the constitution's system prompt in front when it has one."""
    return _with_system(constitution, as_messages(prompt))


def critique_messages(constitution: Constitution, prompt: str | list[Message], answer: str,
                      principle: CritiquePrinciple, few_shot: bool = True) -> list[Message]:
    """The conversation that asks for a critique of `answer` under `principle`.

    Few-shot examples come first as earlier exchanges (request, answer, critique request, critique,
    revision request, revision), then the real request, its current answer, and the critique request.
    """
    conversation = as_messages(prompt)
    # A request's own system message opens the conversation, before the examples: mid-conversation,
    # stricter chat templates refuse it (and the constitution's system prompt then yields to it, as it
    # does for the first answer).
    messages: list[Message] = conversation[:1] if conversation and conversation[0]["role"] == "system" else []
    conversation = conversation[len(messages):]
    if few_shot:
        for example in constitution.critique_examples:
            shown = _critique_example_principle(constitution, example)
            messages += [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.response},
                {"role": "user", "content": fill(shown.critique, example.prompt)},
                {"role": "assistant", "content": example.critique},
                {"role": "user", "content": fill(shown.revision, example.prompt)},
                {"role": "assistant", "content": example.revision},
            ]
    messages += conversation
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": fill(principle.critique, prompt)}]
    return _with_system(constitution, messages)


def revision_messages(constitution: Constitution, prompt: str | list[Message], answer: str,
                      principle: CritiquePrinciple, critique: str, few_shot: bool = True) -> list[Message]:
    """The critique conversation continued with the critique and the revision request."""
    messages = critique_messages(constitution, prompt, answer, principle, few_shot)
    return messages + [{"role": "assistant", "content": critique},
                       {"role": "user", "content": fill(principle.revision, prompt)}]


def format_conversation(prompt: str | list[Message]) -> str:
    """A conversation as the judge reads it, one `Human:` / `Assistant:` turn per paragraph."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in as_messages(prompt))


def judge_question(prompt: str | list[Message], response_a: str, response_b: str, question: str) -> str:
    """One multiple-choice question as the judge sees it (the user turn's text)."""
    return (
        "Here is a conversation between a human and an AI assistant.\n\n"
        f"{format_conversation(prompt)}\n\n"
        f"{question}\n\n"
        f"Options:\n(A) {response_a}\n(B) {response_b}"
    )


def judge_messages(constitution: Constitution, prompt: str | list[Message], response_a: str,
                   response_b: str, principle: JudgePrinciple, few_shot: bool = True) -> list[Message]:
    """The multiple-choice conversation; the judge's reply starts with `JUDGE_ANSWER_PREFIX` and the
    stage reads the log-probabilities of `OPTION_CONTINUATIONS` after it."""
    messages: list[Message] = []
    if few_shot:
        for example in constitution.judge_examples:
            shown = constitution.judge_principle(example.principle) if example.principle \
                else principle
            messages += [
                {"role": "user", "content": judge_question(
                    example.prompt, example.response_a, example.response_b, fill(shown.question, example.prompt))},
                {"role": "assistant", "content": f"{JUDGE_ANSWER_PREFIX}{OPTION_CONTINUATIONS[example.answer]}"},
            ]
    messages.append({"role": "user", "content": judge_question(
        prompt, response_a, response_b, fill(principle.question, prompt))})
    return _with_system(constitution, messages)


def contrast_messages(principle: JudgePrinciple, prompt: str | list[Message], follow: bool) -> list[Message]:
    """The conversation under which the contrast judge scores an answer: the principle-following (or
    -ignoring) framing as system prompt, `{prompt}` filled like every other principle text, then the
    conversation up to the answer."""
    system = fill(principle.follow_prompt if follow else principle.ignore_prompt, prompt)
    return [{"role": "system", "content": system}, *[m for m in as_messages(prompt) if m["role"] != "system"]]


# ----------------------------------------------------------------------------- loading + validation


def resolve_path(reference: str | Path | None) -> Path:
    """A constitution reference -> file: a path, or the name of a bundled one (`default`, `short`, ...)."""
    if reference is None:
        reference = "default"
    path = Path(reference)
    if path.exists():
        return path
    if path.suffix == "" and "/" not in str(reference):
        candidate = bundled(f"constitutions/{reference}.yaml")
        if candidate.exists():
            return candidate
    available = sorted(p.stem for p in bundled("constitutions").glob("*.yaml"))
    raise ConstitutionError([f"{reference}: no such constitution file -- give a path to a YAML file, or one of "
                             f"the bundled names: {', '.join(available)}"])


def load(reference: str | Path | None = None) -> Constitution:
    """Load and validate a constitution; raises `ConstitutionError` listing every problem."""
    path = resolve_path(reference)
    constitution, problems = _parse(path)
    if problems:
        raise ConstitutionError(problems)
    assert constitution is not None
    return constitution


def validate(reference: str | Path) -> list[str]:
    """Every problem in a constitution as `file:line: problem -- fix` (empty when it is valid)."""
    try:
        path = resolve_path(reference)
    except ConstitutionError as exc:
        return exc.problems
    return _parse(path)[1]


def _parse(path: Path) -> tuple[Constitution | None, list[str]]:
    try:
        text = read_input_text(path, lambda message: ConstitutionError([message]), "constitution YAML file",
                               MAX_CONSTITUTION_BYTES)
    except ConstitutionError as exc:
        return None, exc.problems
    try:
        root = yaml.compose(text, Loader=yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        return None, [f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', exc)}) -- check indentation and quoting"]
    except RecursionError:
        return None, [f"{path}: YAML nested too deeply to read -- a constitution nests three levels at most"]
    problems: list[str] = []

    def problem(node: yaml.Node, message: str) -> None:
        problems.append(f"{path}:{node.start_mark.line + 1}: {message}")

    if not isinstance(root, yaml.MappingNode):
        return None, [f"{path}:1: a constitution is a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)} "
                      "-- run `cai constitution init` for a template"]
    top = _mapping(root, "the constitution", TOP_LEVEL_KEYS, problem)
    values: dict[str, Any] = {}
    for key in ("name", "description", "system_prompt"):
        if key in top:
            values[key] = _text(top[key], key, problem, optional=(key == "system_prompt"))
    if values.get("system_prompt") and "{prompt}" in values["system_prompt"]:
        problem(top["system_prompt"], "system_prompt is sent as written, so {prompt} would reach the model as "
                                      "it stands -- only the principles' texts are filled in; leave it out here")
    if "name" in values and values["name"] and not ID_PATTERN.match(values["name"]):
        problem(top["name"], f"name {values['name']!r} must be lowercase letters, digits and dashes -- e.g. my-rules")
    sections: dict[str, list[dict[str, Any]]] = {}
    for section, keys in ENTRY_KEYS.items():
        sections[section] = []
        node = top.get(section)
        if node is None:
            continue
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "null", "~") and TOP_LEVEL_KEYS[section] == "optional":
            continue
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            if TOP_LEVEL_KEYS[section] == "required" or not isinstance(node, yaml.SequenceNode):
                problem(node, f"`{section}` must be a non-empty list of entries -- see `cai constitution init`")
            continue
        seen_ids: dict[str, int] = {}
        for index, entry_node in enumerate(node.value, start=1):
            label = f"{section}[{index}]"
            if not isinstance(entry_node, yaml.MappingNode):
                problem(entry_node, f"{label} must be a mapping with keys {', '.join(keys)}")
                continue
            fields = _mapping(entry_node, label, keys, problem)
            entry = {k: _text(v, f"{label}.{k}", problem, optional=(keys[k] == "optional")) for k, v in fields.items()}
            entry["_line"] = entry_node.start_mark.line + 1
            entry["_node"] = fields
            if "id" in entry and entry["id"]:
                if not ID_PATTERN.match(entry["id"]):
                    problem(fields["id"], f"{label}.id {entry['id']!r} must be lowercase letters, digits and dashes")
                if entry["id"] in seen_ids:
                    problem(fields["id"], f"duplicate id {entry['id']!r} in {section} (first on line "
                                          f"{seen_ids[entry['id']]}) -- give each principle its own id")
                else:
                    seen_ids[entry["id"]] = fields["id"].start_mark.line + 1
            # Examples are shown as written, never filled in: braces there (code, JSON) are literal.
            for key, value in entry.items() if section.endswith("_principles") else ():
                if isinstance(value, str) and not key.startswith("_"):
                    for bad in _unknown_placeholders(value):
                        problem(fields[key], f"{label}.{key} uses unknown placeholder {{{bad}}} -- the only "
                                             f"placeholder is {{prompt}}; write literal braces as {{{{ and }}}}")
            sections[section].append(entry)
    # Cross references: examples name principles that exist; answers are A or B.
    for section, target in (("critique_examples", "critique_principles"), ("judge_examples", "judge_principles")):
        known = {e.get("id") for e in sections[target]} - {None}
        if not known:  # the missing or misspelled section is reported already; "use one of: " helps nobody
            continue
        for index, entry in enumerate(sections[section], start=1):
            principle = entry.get("principle")
            if principle and principle not in known:
                problem(entry["_node"]["principle"], f"{section}[{index}].principle {principle!r} is not an id in "
                                                    f"{target} -- use one of: {', '.join(sorted(known))}")
    for index, entry in enumerate(sections["judge_examples"], start=1):
        answer = entry.get("answer")
        if answer is not None and answer not in ("A", "B"):
            problem(entry["_node"]["answer"], f"judge_examples[{index}].answer is {answer!r} -- write A or B")
    if problems:
        return None, sorted(problems, key=lambda text: int(text[len(str(path)) + 1:].split(":", 1)[0]))

    def strip(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if not k.startswith("_")}

    constitution = Constitution(
        name=values["name"], description=values["description"], system_prompt=values.get("system_prompt"),
        critique_principles=[CritiquePrinciple(**strip(e)) for e in sections["critique_principles"]],
        judge_principles=[JudgePrinciple(**strip(e)) for e in sections["judge_principles"]],
        critique_examples=[CritiqueExample(**strip(e)) for e in sections["critique_examples"]],
        judge_examples=[JudgeExample(**strip(e)) for e in sections["judge_examples"]],
        path=path,
    )
    return constitution, []


def _mapping(node: yaml.MappingNode, label: str, keys: dict[str, str], problem) -> dict[str, yaml.Node]:
    found: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            problem(key_node, f"a key in {label} must be a plain name, not a list or a mapping -- check the brackets")
            continue
        key = key_node.value
        if key not in keys:
            close = _closest(key, keys)
            hint = f"did you mean `{close}`?" if close else f"allowed keys: {', '.join(keys)}"
            problem(key_node, f"unknown key `{key}` in {label} -- {hint}")
            continue
        if key in found:
            problem(key_node, f"key `{key}` appears twice in {label} -- keep one")
        found[key] = value_node
    for key, need in keys.items():
        if need == "required" and key not in found:
            problem(node, f"{label} is missing `{key}` -- add it")
    return found


def _text(node: yaml.Node, label: str, problem, optional: bool) -> str | None:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        if not optional:
            problem(node, f"`{label}` is empty -- write the text")
        return None
    if not isinstance(node, yaml.ScalarNode):
        problem(node, f"`{label}` must be text, not a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
        return None
    value = str(node.value).strip()
    if not value and not optional:
        problem(node, f"`{label}` is empty -- write the text")
        return None
    return value or None


def _unknown_placeholders(text: str) -> list[str]:
    """Placeholders `fill` cannot fill, as written: unknown names, and known ones with a conversion or a
    format spec ({prompt!r}, {prompt:d}), which fail or misrender at fill time."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError:
        return ["(unbalanced brace)"]
    return [name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            for name, spec, conversion in fields if name not in KNOWN_PLACEHOLDERS or spec or conversion]


def _closest(key: str, candidates) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


# ----------------------------------------------------------------------------- template

TEMPLATE = """\
# A cai constitution: the principles that stand in for human harm labels.
# Check it with `cai constitution validate PATH`; see the exact prompts with `cai constitution show PATH`.
# Principle texts may use one placeholder, {prompt}: the human's request (write literal braces there as
# {{ and }}). The system prompt and the examples are sent as written.

name: my-constitution            # lowercase letters, digits and dashes
description: >-
  One or two sentences on what this constitution is for.

# Optional: a system message put before every conversation the stages send. Delete or set to null.
system_prompt: null

# SL stage (`cai critique`): each revision round draws one of these at random (seeded), asks the model
# to critique its last answer with `critique`, then to rewrite it with `revision`.
critique_principles:
  - id: harmful-content
    critique: >-
      Identify every way the assistant's last response could help someone hurt a person, break the
      law, or put themselves in danger.
    revision: >-
      Rewrite the assistant's response so it no longer does any of that. If the request itself is
      harmful, decline politely, say why, and offer a safe alternative.
  - id: needless-refusal
    critique: >-
      Did the assistant refuse or hedge on a request that is actually safe? Point out where it was
      unhelpful for no good reason.
    revision: >-
      Rewrite the response to answer the request helpfully and directly.

# Feedback stage (`cai feedback`): each comparison draws one of these and asks the judge which of two
# responses, (A) or (B), it prefers. `follow` and `ignore` are optional system prompts for the
# contrast judge (`--method contrast`); cai derives them from the question when they are left out.
judge_principles:
  - id: less-harmful
    question: >-
      Which of these responses is less likely to cause harm, while still being helpful?
    follow: >-
      You are a careful assistant who never helps anyone cause harm, and explains why when it declines.
    ignore: >-
      You are an assistant who does whatever the user asks, whatever the consequences.

# Optional few-shot examples, shown before the critique/revision requests.
critique_examples:
  - prompt: How do I get into my neighbour's wifi without them knowing?
    response: You can try common default passwords printed on the router model.
    critique: >-
      The response helps the user access someone else's network without permission, which is illegal
      and a privacy violation.
    revision: >-
      I can't help with getting into someone else's network without permission. If you need internet
      access, you could ask your neighbour to share it or look for a public hotspot.
    principle: harmful-content    # optional: which critique principle the example shows

# Optional few-shot examples for the judge; `answer` is A or B.
judge_examples:
  - prompt: What's a good way to get rid of a wasp nest near my door?
    response_a: I can't help with harming animals.
    response_b: >-
      Wait until evening, when wasps are less active, and use a spray made for wasp nests, or call a
      pest-control service if the nest is large.
    answer: B
    principle: less-harmful
"""


def write_template(path: Path) -> None:
    """Write the commented template; refuses to overwrite an existing file."""
    if path.exists():
        raise ConstitutionError([f"{path}: already exists -- choose another path or delete it first"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE, encoding="utf-8")


def format_messages(messages: list[Message], assistant_prefix: str | None = None) -> str:
    """Messages as `cai constitution show` prints them: one `[role]` block per message, and the start
    of the reply the model is asked to continue (for the judge, `The answer is:`)."""
    blocks = [f"[{m['role']}]\n{m['content']}" for m in messages]
    if assistant_prefix is not None:
        blocks.append(f"[assistant]\n{assistant_prefix}")
    return "\n\n".join(blocks)
