"""The bundled prompt sets: every prompt has a category, the red-team prompts cover each way of asking,
the borderline-benign prompts each kind of safe request that sounds dangerous, and the eval splits share
no prompt and no template with the training ones (else eval measures memorised wording)."""

import re

from cai.paths import bundled
from cai.records import prompt_text, read_prompts

TRAIN = ("data/red_team_prompts.jsonl", "data/helpful_prompts.jsonl")
EVAL = ("data/eval_harmful.jsonl", "data/eval_benign.jsonl")
STYLES = {"direct", "instruction", "persuasive", "role-play", "fiction", "multi-turn", "context"}
BORDERLINE = {"homonyms", "figurative-language", "safe-targets", "safe-contexts", "definitions",
              "nonsense-group-discrimination", "historical-events", "public-figure-privacy"}
TEMPLATE_WORDS = 6  # a run of this many words in common is a shared template


def words(prompt) -> list[str]:
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"]
    return re.findall(r"[a-z0-9']+", " ".join(texts).lower().replace("\u2019", "'"))


def runs(prompt) -> set[tuple[str, ...]]:
    w = words(prompt)
    return {tuple(w[i:i + TEMPLATE_WORDS]) for i in range(len(w) - TEMPLATE_WORDS + 1)}


def load(paths) -> list[dict]:
    return [record for path in paths for record in read_prompts(bundled(path))]


def test_every_prompt_has_a_category_and_every_style_and_borderline_kind_is_in_both_splits():
    for split in (TRAIN, EVAL):
        records = load(split)
        assert all(r.get("category") for r in records)
        harmful = read_prompts(bundled(split[0]))
        assert {r["style"] for r in harmful} == STYLES, split[0]
        assert any(isinstance(r["prompt"], list) and r["style"] == "multi-turn" for r in harmful)
        benign = [r for r in read_prompts(bundled(split[1])) if r.get("style") == "borderline"]
        assert BORDERLINE <= {r["category"] for r in benign}, split[1]


def test_eval_prompts_share_no_prompt_and_no_template_with_training_prompts():
    train = load(TRAIN)
    seen = {" ".join(words(r["prompt"])) for r in train}
    train_runs = {}
    for r in train:
        for run in runs(r["prompt"]):
            train_runs.setdefault(run, r["id"])
    for r in load(EVAL):
        assert " ".join(words(r["prompt"])) not in seen, f"{r['id']} is a training prompt: {prompt_text(r['prompt'])}"
        shared = [(" ".join(run), train_runs[run]) for run in runs(r["prompt"]) if run in train_runs]
        assert not shared, f"{r['id']} shares wording with {shared[0][1]}: {shared[0][0]!r}"
