"""Stage 1a (SL-CAI data): answer red-team prompts, then critique and revise each answer N times.

For each prompt the model writes an initial answer. Each round draws a critique principle from the
constitution (seeded per prompt, a fresh one each round), asks the model to critique its current
answer under that principle (`constitution.critique_messages`, few-shot examples in front), then to
revise it (`constitution.revision_messages`). The revision becomes the answer the next round critiques,
so the context stays one answer long however many rounds run (CPU-friendly), and `cai constitution
show --rounds N` prints exactly these conversations.

    cai critique --prompts data/red_team_prompts.jsonl --out runs/x/critique.jsonl --revisions 4

Speed: generation is batched across every pending prompt of a chunk, step by step (all initial
answers, then all round-1 critiques, then all round-1 revisions, ...), through the engine. Each item
samples with its own seed (`item_seed(seed, id, "round2-revision")`), so its text does not depend on
batching, chunking or resuming.

Resume: prompts go through all rounds in chunks of `chunk_size`; a chunk's records are appended
(fsynced) as soon as it finishes, so a kill loses at most the chunk in flight, and a re-run skips ids
already written. Running a finished stage again loads no model.

Clean text: echoed labels ("Revision:", "Critique:", ...) are stripped, text is cut where the model
starts a new "Human:"/"User:" turn, and an answer cut off by `max_new_tokens` loses its unfinished last
sentence. A revision that is empty, only a label, heavily repetitive or an echo of the request keeps
the previous answer for that round; the round is marked `"kept_previous": true` with a `"reason"`,
and these are counted in the summary and the manifest.
"""

import difflib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.engine import EngineOptions
from cai.errors import ConfigError
from cai.manifest import Manifest, StageResult
from cai.models import DEFAULT_MODEL, PRECISION_CHOICES, PRECISION_HELP, check_precision
from cai.stages.base import (
    StageContext,
    check_at_least_one,
    check_jsonl_out,
    check_limit,
    item_seed,
)


@dataclass
class CritiqueConfig(EngineOptions):
    """`cai critique`: initial answer -> N x (critique, revision) records.

    NOTE: `temperature` defaults to 0.7 (the paper sampled its critiques and revisions). Sampling is
    still reproducible: every item draws from its own seeded generator, whatever its batch.
    """

    # Inputs and outputs
    prompts: str = field(default="data/red_team_prompts.jsonl", metadata={
        "help": "Prompt set to critique (JSONL or CSV with a prompt-like column, chat `messages`, hh-rlhf "
                "transcripts (the conversation before the last answer), or .txt, one per line)."})
    out: str = field(default="critique.jsonl", metadata={
        "hash": False, "help": "Output JSONL of critique records; the manifest goes beside it (NAME.manifest.json)."})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Model that answers, critiques and revises: embedded:NAME, a hub id, or a local directory."})
    constitution: str = field(default="default", metadata={
        "help": "Constitution file, or a bundled name (default, short, medical)."})
    # What to generate
    revisions: int = field(default=4, metadata={
        "help": "Critique/revision rounds per prompt (the paper used 4); each round draws a fresh principle."})
    limit: int | None = field(default=None, metadata={
        "hash": False, "scope": True,  # each record depends on its prompt only: a larger limit adds records
        "help": "Use only the first N prompts of the file (left out: all of them). Raising it later adds to "
                "the records already written."})
    few_shot: bool = field(default=True, metadata={
        "help": "Show the constitution's critique examples before each critique and revision request."})
    revision_prefix: str | None = field(default=None, metadata={
        "help": "Text every revision starts with, written into the model's reply before it continues "
                "(e.g. \"I can't help with\"). For models too small to follow a revision request on "
                "their own. Left out: the model writes the whole revision."})
    max_new_tokens: int = field(default=256, metadata={
        "help": "Tokens generated at most per answer, critique and revision."})
    temperature: float = field(default=0.7, metadata={
        "help": "Sampling temperature; 0 = greedy (argmax). Seeded per item either way."})
    top_p: float = field(default=0.9, metadata={
        "help": "Nucleus sampling mass in (0, 1]; unused when temperature is 0."})
    seed: int = field(default=0, metadata={
        "help": "Seed for principle draws and sampling (each prompt and step derives its own from it)."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP, "choices": PRECISION_CHOICES})
    # How to run it (does not change the records)
    batch_size: int = field(default=32, metadata={
        "hash": False, "help": "Sequences generated together per engine batch (lower it if memory runs out)."})
    chunk_size: int = field(default=32, metadata={
        "hash": False, "help": "Prompts taken through all rounds before their records are written; a kill "
                               "loses at most one chunk. Larger chunks batch better."})
    force: bool = field(default=False, metadata={
        "hash": False, "help": "Discard earlier output made with a different configuration and start over."})

    def __post_init__(self):
        self.check_engine_options()
        check_precision(self.precision)
        check_jsonl_out(self.out, "critique")
        check_at_least_one(self, "revisions", "max_new_tokens", "batch_size", "chunk_size")
        check_limit(self.limit)
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1] -- use 1.0 to turn nucleus sampling off")
        if self.revision_prefix is not None and not self.revision_prefix.strip():
            raise ConfigError("--revision-prefix is blank -- give the opening words (e.g. \"I can't help with\") "
                              "or leave it out")


# ----------------------------------------------------------------------------- clean text

# Labels a model echoes at the start of its reply ("Revision: ...", "**Critique:** ...").
_LABELS = ("revised response", "revision request", "critique request", "revision", "rewrite", "rewritten response",
           "critique", "response", "answer", "assistant")
_LEADING_LABEL = re.compile(r"^\s*(?:[*_#>\s]*)(?:" + "|".join(re.escape(x) for x in _LABELS) + r")\s*[*_]*\s*:\s*[*_]*\s*",
                            re.IGNORECASE)
# A new turn or a new section the model starts writing on its own; everything from there on is cut:
# "Human:" / "User:" / "Critique Request:" lines (also as markdown: "**Human:**", "### Human:"), and a
# line that is only a chat role, which is what a ChatML turn header ("<|im_start|>user") leaves once its
# special token is decoded away.
_TURN_BREAK = re.compile(r"(?:^|\n)\s*[*_#]*\s*(?:human|user|critique request|revision request)\s*[*_]*\s*:"
                         r"|\n\s*(?:user|system|assistant)\s*(?:\n|$)", re.IGNORECASE)
_SECTION_BREAK = {
    "answer": re.compile(r"(?:^|\n)\s*[*_]*(?:critique|revision)\s*[*_]*\s*:", re.IGNORECASE),
    "critique": re.compile(r"(?:^|\n)\s*[*_]*(?:revision|revised response|rewrite)\s*[*_]*\s*:", re.IGNORECASE),
}
_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)|\n")


def strip_labels(text: str) -> str:
    """Remove echoed labels at the start ("Revision:", "**Critique:**", "Assistant: Revision: ...")."""
    previous = None
    while previous != text:
        previous = text
        text = _LEADING_LABEL.sub("", text, count=1)
    return text.strip()


def trim_unfinished(text: str) -> str:
    """Drop a sentence cut off by the token limit, when at least half of the text remains."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[:ends[-1]].strip()
    return text.strip()


def clean_text(text: str, kind: str = "answer", finished: bool = True) -> str:
    """Model output -> the text kept in a record. `kind` is "answer" (initial answers and revisions)
    or "critique": each cuts where the model starts writing the other's section on its own."""
    text = strip_labels(text)
    for pattern in (_TURN_BREAK, _SECTION_BREAK[kind]):
        match = pattern.search(text)
        if match:
            text = text[:match.start()]
            finished = True  # what follows the cut was the unfinished part
    text = text.strip()
    return text if finished else trim_unfinished(text)


def _normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# What is left of a reply that is only a label without its colon ("Revision.", "**Revised response**").
_LABEL_WORDS = {_normalized(label) for label in _LABELS}


def repetition_share(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, near 1 = one phrase over and over)."""
    words = _normalized(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def degenerate_reason(text: str, raw: str, requests: Sequence[str] = (), critique: str = "") -> str | None:
    """Why a cleaned revision cannot replace the answer, or None when it is usable.

    `raw` is the text before cleaning (to tell "empty" from "only a label"); `requests` are the
    critique and revision requests the model was shown (a revision that only echoes one is useless);
    `critique` is the critique the model just wrote (a revision that copies it is a critique, not an
    answer: "The response is not helpful in assisting with...").
    """
    if not text.strip():
        return "only-label" if raw.strip() else "empty"
    normalized = _normalized(text)
    if not normalized:
        return "no-words"
    if normalized in _LABEL_WORDS:
        return "only-label"
    if any(normalized == _normalized(request) for request in requests if request):
        return "echoed-request"
    if critique and _normalized(critique):
        words, critique_words = normalized.split(), _normalized(critique).split()
        if difflib.SequenceMatcher(None, words, critique_words, autojunk=False).ratio() >= 0.9:
            return "copied-critique"
    sentences = [_normalized(s) for s in re.split(r"(?<=[.!?])\s+|\n+", text) if _normalized(s)]
    if len(sentences) >= 3 and Counter(sentences).most_common(1)[0][1] >= 3:
        return "repetition"
    if repetition_share(text) > 0.5:
        return "repetition"
    return None


# ----------------------------------------------------------------------------- generation


def build_engine(cfg: CritiqueConfig, device: str | None):
    """The engine the stage generates with (tests replace this function with a stub)."""
    from cai.engine import Engine

    return Engine.from_reference(cfg.model, batch_size=cfg.batch_size, device=device, precision=cfg.precision,
                                 options=cfg)


def _sampling(cfg: CritiqueConfig):
    from cai.engine import Sampling

    return Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=0)


def join_prefix(prefix: str, continuation: str) -> str:
    """A primed reply: the prefix, then the model's continuation (the engine strips leading space, so a
    word gets its space back and punctuation does not)."""
    if not continuation:
        return prefix
    glue = " " if continuation[0].isalnum() and not prefix[-1].isspace() else ""
    return prefix + glue + continuation


def critique_chunk(engine, cons, prompts: list[dict[str, Any]], cfg: CritiqueConfig,
                   on_tokens: Callable[[int], None] = lambda n: None) -> list[dict[str, Any]]:
    """Take a chunk of prompt records through the initial answer and every round; return their records.

    Each step is one batched engine call over the whole chunk (the engine sorts by length and batches).
    """
    from cai import constitution as c

    sampling = _sampling(cfg)

    def generate(conversations: list, step: str, prefix: str = "", keep_cache: bool = False) -> list:
        seeds = [item_seed(cfg.seed, p["id"], step) for p in prompts]
        rendered = [engine.render(conversation, assistant_prefix=prefix) for conversation in conversations]
        return engine.generate(rendered, sampling, seeds=seeds, progress=lambda items, tokens: on_tokens(tokens),
                               keep_cache=keep_cache)

    initial = generate([c.answer_messages(cons, p["prompt"]) for p in prompts], "initial")
    initial_texts = [clean_text(g.text, "answer", g.finished) for g in initial]
    current = list(initial_texts)
    principles = [cons.sample_critique_principles(p["id"], cfg.revisions, cfg.seed) for p in prompts]
    rounds: list[list[dict[str, Any]]] = [[] for _ in prompts]
    for k in range(cfg.revisions):
        chosen = [drawn[k] for drawn in principles]
        critiques = generate([c.critique_messages(cons, p["prompt"], answer, principle, cfg.few_shot)
                              for p, answer, principle in zip(prompts, current, chosen, strict=True)],
                             f"round{k + 1}-critique", keep_cache=True)  # the revision continues each conversation
        critique_texts = [clean_text(g.text, "critique", g.finished) for g in critiques]
        revisions = generate([c.revision_messages(cons, p["prompt"], answer, principle, critique, cfg.few_shot)
                              for p, answer, principle, critique
                              in zip(prompts, current, chosen, critique_texts, strict=True)],
                             f"round{k + 1}-revision", cfg.revision_prefix or "")
        for i, (p, principle, generation) in enumerate(zip(prompts, chosen, revisions, strict=True)):
            written = clean_text(generation.text, "answer", generation.finished)
            text = join_prefix(cfg.revision_prefix, written) if cfg.revision_prefix else written
            requests = (c.fill(principle.critique, p["prompt"]), c.fill(principle.revision, p["prompt"]))
            round_record: dict[str, Any] = {"principle": principle.id, "critique": critique_texts[i], "revision": text}
            # Judged on what the model wrote: a primed revision that adds nothing is as empty as none.
            reason = degenerate_reason(written, generation.text, requests, critique_texts[i])
            if reason is None:
                current[i] = text
            else:
                round_record.update(kept_previous=True, reason=reason)
            rounds[i].append(round_record)
    records = []
    for i, p in enumerate(prompts):
        record = {"id": p["id"], "prompt": p["prompt"]}
        if "category" in p:
            record["category"] = p["category"]
        record.update(initial=initial_texts[i], rounds=rounds[i], final=current[i], model=cfg.model)
        records.append(record)
    return records


def count_kept_previous(records: list[dict[str, Any]]) -> Counter:
    """Rounds that kept the previous answer, by reason."""
    return Counter(r["reason"] for record in records for r in record["rounds"] if r.get("kept_previous"))


# ----------------------------------------------------------------------------- stage


def run(cfg: CritiqueConfig, ctx: StageContext | None = None) -> StageResult:
    from cai import constitution as c
    from cai.models import check_prompts_fit
    from cai.records import Resume, read_prompts

    ctx = ctx or StageContext()
    out = Path(cfg.out)
    manifest = Manifest("critique", cfg, ctx.manifest_for(out), outputs=[out], force=cfg.force,
                        inputs={"prompts": cfg.prompts, "constitution": c.resolve_path(cfg.constitution),
                                "model": cfg.model})
    if (done := manifest.previous()) is not None:
        return done
    cons = c.load(cfg.constitution)
    prompts = read_prompts(cfg.prompts, limit=cfg.limit)
    manifest.start()

    tokens = 0

    def on_tokens(n: int) -> None:
        nonlocal tokens
        tokens += n
        task.advance(0, n)

    with Resume(out, prompts, cfg.chunk_size) as resume:
        if resume.done:
            ctx.reporter.log(f"resuming: {resume.done} records already in {out}, {len(resume.todo)} prompts to go")
        task = ctx.reporter.task("critique", total=len(resume.todo), unit="prompts")
        if resume.todo:
            engine = build_engine(cfg, ctx.device)
            check_prompts_fit(engine, resume.todo, cfg.prompts, cfg.max_new_tokens, lambda p: c.answer_messages(cons, p))
        for chunk in resume:
            resume.write(critique_chunk(engine, cons, chunk, cfg, on_tokens))
            task.advance(len(chunk))
        task.close()
    records, written, resumed = resume.records(), resume.writer.written, resume.done
    kept = count_kept_previous(records)
    total_rounds = sum(len(r["rounds"]) for r in records)
    counts = {"records": len(records), "written": written, "resumed": resumed, "rounds": total_rounds,
              "kept_previous": sum(kept.values()), **{f"kept_previous/{k}": v for k, v in sorted(kept.items())}}
    kept_text = ", ".join(f"{v} {k}" for k, v in sorted(kept.items()))
    summary = (f"{len(records)} records ({written} new, {resumed} resumed), {cfg.revisions} round{'s' if cfg.revisions != 1 else ''} each; "
               f"{sum(kept.values())} of {total_rounds} revisions kept the previous answer"
               + (f" ({kept_text})" if kept_text else "") + f"; {tokens} tokens generated")
    return manifest.complete(outputs={"records": out}, counts=counts, summary=summary,
                             metrics={"tokens_generated": tokens})
