"""The `cai` command line: parses options, builds a stage config, calls the stage. No logic lives here.

Results go to stdout (paths, or JSON with --json); progress, status and errors go to stderr.
Errors a user can fix (`CaiError`) print one line, `error: ...`, and exit 1; `--debug` shows the traceback.
"""

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from cai import __version__
from cai.errors import CaiError

# Every option's help text and default come from its stage's config dataclass, the one place they live
# (STYLE.md 2). Stage modules import torch only inside functions, so these imports keep `cai --help` fast.
from cai.stages.base import help_of
from cai.stages.critique import CritiqueConfig
from cai.stages.dpo import DPOConfig
from cai.stages.evaluate import EvalConfig
from cai.stages.feedback import FeedbackConfig, FeedbackEvalConfig
from cai.stages.filter import FilterConfig
from cai.stages.pm import PMEvalConfig, PMScoreConfig, PMTrainConfig
from cai.stages.rl import RLConfig
from cai.stages.sft import SFTConfig


def _flags_show_no_type() -> None:
    """typer 0.29 writes a type after every flag in --help (`--force <bool>`, even `--help <bool>`), which
    reads as if the flag took a value. Show nothing there for flags, as click always did. typer has no
    setting for it, and a per-option metavar="" cannot reach the --help option typer adds itself, so this
    wraps the one method that renders the column; typer versions without it render flags bare already."""
    from typer.core import TyperOption

    render = getattr(TyperOption, "display_type_rich", None)
    if render is None or getattr(render, "cai_flags_bare", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else render(self, ctx)

    display_type_rich.cai_flags_bare = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()

app = typer.Typer(name="cai", help="Constitutional AI on your own model and constitution.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
models_app = typer.Typer(help="Resolve, convert and cache models.", no_args_is_help=True)
constitution_app = typer.Typer(help="Write, check and inspect constitutions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(constitution_app, name="constitution")

stderr = Console(stderr=True, soft_wrap=True)  # soft_wrap: never break a file:line message
_state = {"debug": False}


# ----------------------------------------------------------------------------- progress


def _rate(value: float) -> str:
    """A rate in at most four figures, so the throughput column keeps its width: 0.48, 8.49, 97.8, 1234,
    29.3k, 1.25M."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class _Throughput(ProgressColumn):
    """items/s and, when the task reports them, tokens/s."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        text = f"{_rate(task.completed / elapsed)} {task.fields.get('unit', 'items')}/s"
        tokens = task.fields.get("tokens", 0)
        if tokens:
            text += f"  {_rate(tokens / elapsed)} tok/s"
        return Text(text, style="cyan")


class _RichTask:
    def __init__(self, progress: Progress, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, items: int = 1, tokens: int = 0) -> None:
        task = self.progress.tasks[self.task_id]
        self.progress.update(self.task_id, advance=items, tokens=task.fields.get("tokens", 0) + tokens)

    def close(self) -> None:
        self.progress.stop_task(self.task_id)


class RichReporter:
    """Draws stage progress on stderr; status lines above the bars."""

    def __init__(self) -> None:
        # On a narrow terminal the description gives way (cut with an ellipsis) and then the bar, so
        # that the counts and the throughput stay on one line.
        self.progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=28)),
            BarColumn(bar_width=None, table_column=Column(min_width=4)), MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)), _Throughput(), console=stderr, transient=False)

    # The bars start with the first task: a stage that fails before one leaves no empty live area behind.
    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:  # Progress.stop prints a blank line off a terminal even unstarted
            self.progress.stop()

    def task(self, description: str, total: int | None, unit: str = "items") -> _RichTask:
        self.progress.start()  # does nothing once started
        return _RichTask(self.progress, self.progress.add_task(description, total=total, unit=unit, tokens=0))

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


def _context(**kwargs):
    from cai.stages.base import StageContext

    return StageContext(**kwargs)


def _run_stage(run_fn, cfg, json_output: bool = False):
    """Run a stage with a progress bar; print its outputs to stdout and its summary to stderr."""
    started = time.time()
    with RichReporter() as reporter:
        result = run_fn(cfg, _context(reporter=reporter))
    if json_output:
        print(json.dumps({"stage": result.stage, "outputs": result.outputs, "counts": result.counts,
                          "metrics": result.metrics, "skipped": result.skipped}))
    else:
        for path in result.outputs.values():
            print(path)
    stderr.print(f"{result.stage}: {result.summary} [{time.time() - started:.0f} s]", highlight=False)
    return result


# ----------------------------------------------------------------------------- top level


def _version(value: bool) -> None:
    if value:
        print(f"cai {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """Constitutional AI on your own model and constitution.

    Stages: critique -> sft -> feedback -> pm -> rl (or dpo) -> eval. Each runs alone on files you
    bring; `cai run RECIPE.yaml` runs them all. Start with `cai constitution init my.yaml`.
    """
    _state["debug"] = debug


# ----------------------------------------------------------------------------- models


@models_app.command("prepare")
def models_prepare(
    reference: Annotated[str, typer.Argument(help="Model: embedded:NAME, a hub id, or a local directory.")]
    = "embedded:smollm2-135m-instruct",
) -> None:
    """Resolve a model reference (converting and caching embedded models) and print its local directory.

    Example: cai models prepare embedded:smollm2-135m-instruct
    """
    from cai.models import resolve

    print(resolve(reference))


@models_app.command("list")
def models_list() -> None:
    """List the embedded models and whether each is converted yet.

    Example: cai models list
    """
    from cai.models import EMBEDDED_PREFIX, _is_complete, embedded_names, tiny_marker
    from cai.paths import cai_home

    for name in embedded_names():
        directory = cai_home() / "models" / name
        state = (str(directory) if _is_complete(directory, tiny_marker() if name == "tiny-random" else None)
                 else f"(not prepared yet: cai models prepare {EMBEDDED_PREFIX}{name}; first use does it too)")
        print(f"{EMBEDDED_PREFIX}{name}\t{state}")


# ----------------------------------------------------------------------------- constitution


@constitution_app.command("init")
def constitution_init(
    path: Annotated[Path, typer.Argument(help="Where to write the template (must not exist).")],
) -> None:
    """Write a commented constitution template to edit.

    Example: cai constitution init my-rules.yaml
    """
    from cai.constitution import write_template

    write_template(path)
    print(path)
    stderr.print(f"wrote a template; edit it, then run: cai constitution validate {path}")


@constitution_app.command("validate")
def constitution_validate(
    path: Annotated[str, typer.Argument(help="Constitution file, or a bundled name (default, short, medical).")],
) -> None:
    """Check a constitution; list every problem as file:line: problem -- fix.

    Example: cai constitution validate my-rules.yaml
    """
    from cai import constitution

    problems = constitution.validate(path)
    if problems:
        for problem in problems:
            stderr.print(problem, highlight=False, markup=False)
        stderr.print(f"error: {len(problems)} problem{'s' if len(problems) > 1 else ''} found", highlight=False)
        raise typer.Exit(1)
    loaded = constitution.load(path)
    parts = [(loaded.critique_principles, "critique principle"), (loaded.judge_principles, "judge principle"),
             (loaded.critique_examples, "critique example"), (loaded.judge_examples, "judge example")]
    print(f"{loaded.path}: ok ({', '.join(f'{len(items)} {name}' + 's' * (len(items) != 1) for items, name in parts)})")


EXAMPLE_REQUEST = "How can I get into my coworker's email account without them knowing?"


@constitution_app.command("show")
def constitution_show(
    path: Annotated[str, typer.Argument(help="Constitution file, or a bundled name.")] = "default",
    seed: Annotated[int, typer.Option(help="Seed for drawing principles, as the stages use it.")] = 0,
    prompt: Annotated[str, typer.Option(help="The request to render the prompts for.")] = EXAMPLE_REQUEST,
    item_id: Annotated[str, typer.Option("--id", help="Record id the principles are drawn for.")] = "example",
    # min=0: 0 leaves that part out; a negative count printed nothing for it, silently
    rounds: Annotated[int, typer.Option(min=0, help="Critique/revision rounds to show (0: none).")] = 1,
    principles: Annotated[int, typer.Option(min=0, help="Judge principles to show (feedback --principles; "
                                                        "0: none).")] = 1,
    no_few_shot: Annotated[bool, typer.Option("--no-few-shot", help="Leave the few-shot examples out.")] = False,
) -> None:
    """Print the exact prompts the stages send (initial answer, critique, revision, judge) before GPU hours go.

    Placeholders stand for what the model writes: <ANSWER>, <CRITIQUE>, <RESPONSE A/B>.

    Example: cai constitution show constitutions/default.yaml --seed 1 --rounds 2
    """
    from cai import constitution as c

    loaded = c.load(path)
    few_shot = not no_few_shot
    sections = []
    if rounds:  # what the initial answer is generated from: the request, after the system prompt if any
        sections.append(("initial answer", c.format_messages(c.answer_messages(loaded, prompt), "<ANSWER>")))
    for number, principle in enumerate(loaded.sample_critique_principles(item_id, rounds, seed), start=1):
        answer = "<ANSWER>" if number == 1 else f"<REVISION {number - 1}>"
        sections.append((f"critique round {number}: principle {principle.id}",
                         c.format_messages(c.critique_messages(loaded, prompt, answer, principle, few_shot))))
        sections.append((f"revision round {number}: principle {principle.id}",
                         c.format_messages(c.revision_messages(loaded, prompt, answer, principle, "<CRITIQUE>",
                                                               few_shot))))
    for principle in loaded.sample_judge_principles(item_id, principles, seed):
        sections.append((f"judge (multiple choice): principle {principle.id}; scored continuations "
                         f"{' / '.join(repr(v) for v in c.OPTION_CONTINUATIONS.values())}",
                         c.format_messages(c.judge_messages(loaded, prompt, "<RESPONSE A>", "<RESPONSE B>",
                                                            principle, few_shot), c.JUDGE_ANSWER_PREFIX)))
        for follow in (True, False):
            sections.append((f"judge (contrast, {'follow' if follow else 'ignore'}): principle {principle.id}; "
                             "scores <RESPONSE> as the assistant's reply",
                             c.format_messages(c.contrast_messages(principle, prompt, follow), "<RESPONSE>")))
    for title, body in sections:
        print(f"===== {title} =====\n{body}\n")


# ----------------------------------------------------------------------------- stage 1: critique, sft (issue 3)




_IO, _GEN, _RUN, _TRAIN = "Inputs and outputs", "Generation", "Running", "Training"


@app.command("critique")
def critique(
    prompts: Annotated[str, typer.Option("--prompts", help=help_of(CritiqueConfig, "prompts"), rich_help_panel=_IO)],
    out: Annotated[str, typer.Option("--out", help=help_of(CritiqueConfig, "out"), rich_help_panel=_IO)],
    model: Annotated[str, typer.Option("--model", "-m", help=help_of(CritiqueConfig, "model"), rich_help_panel=_IO)]
    = CritiqueConfig.model,
    constitution: Annotated[str, typer.Option(help=help_of(CritiqueConfig, "constitution"), rich_help_panel=_IO)]
    = CritiqueConfig.constitution,
    revisions: Annotated[int, typer.Option(help=help_of(CritiqueConfig, "revisions"), rich_help_panel=_GEN)]
    = CritiqueConfig.revisions,
    limit: Annotated[int | None, typer.Option(help=help_of(CritiqueConfig, "limit"), rich_help_panel=_IO)] = None,
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help=help_of(CritiqueConfig, "few_shot"),
                                           rich_help_panel=_GEN)]
    = CritiqueConfig.few_shot,
    revision_prefix: Annotated[str | None, typer.Option(help=help_of(CritiqueConfig, "revision_prefix"),
                                                        rich_help_panel=_GEN)] = None,
    max_new_tokens: Annotated[int, typer.Option(help=help_of(CritiqueConfig, "max_new_tokens"), rich_help_panel=_GEN)]
    = CritiqueConfig.max_new_tokens,
    temperature: Annotated[float, typer.Option(help=help_of(CritiqueConfig, "temperature"), rich_help_panel=_GEN)]
    = CritiqueConfig.temperature,
    top_p: Annotated[float, typer.Option(help=help_of(CritiqueConfig, "top_p"), rich_help_panel=_GEN)]
    = CritiqueConfig.top_p,
    seed: Annotated[int, typer.Option(help=help_of(CritiqueConfig, "seed"), rich_help_panel=_GEN)]
    = CritiqueConfig.seed,
    precision: Annotated[str, typer.Option(help=help_of(CritiqueConfig, "precision"), rich_help_panel=_RUN)]
    = CritiqueConfig.precision,
    batch_size: Annotated[int, typer.Option(help=help_of(CritiqueConfig, "batch_size"), rich_help_panel=_RUN)]
    = CritiqueConfig.batch_size,
    chunk_size: Annotated[int, typer.Option(help=help_of(CritiqueConfig, "chunk_size"), rich_help_panel=_RUN)]
    = CritiqueConfig.chunk_size,
    force: Annotated[bool, typer.Option("--force", help=help_of(CritiqueConfig, "force"),
                                        rich_help_panel=_RUN)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Answer prompts, then critique and revise each answer under constitution principles (SL-CAI data).

    Writes one record per prompt: the initial answer, every round's principle, critique and revision,
    and the final revision. Interrupt it any time: re-running the same command resumes.

    Example: cai critique --prompts data/red_team_prompts.jsonl --out critique.jsonl --limit 16 --revisions 2
    """
    from cai.stages import critique as stage

    cfg = CritiqueConfig(prompts=prompts, out=out, model=model, constitution=constitution, revisions=revisions,
                         limit=limit, few_shot=few_shot, revision_prefix=revision_prefix,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         precision=precision, batch_size=batch_size, chunk_size=chunk_size, force=force)
    _run_stage(stage.run, cfg, json_output)


@app.command("sft")
def sft(
    data: Annotated[str, typer.Option("--data", help=help_of(SFTConfig, "data"), rich_help_panel=_IO)],
    out: Annotated[str, typer.Option("--out", help=help_of(SFTConfig, "out"), rich_help_panel=_IO)],
    model: Annotated[str, typer.Option("--model", "-m", help=help_of(SFTConfig, "model"), rich_help_panel=_IO)]
    = SFTConfig.model,
    helpful: Annotated[str | None, typer.Option(help=help_of(SFTConfig, "helpful"), rich_help_panel=_IO)] = None,
    helpful_fraction: Annotated[float, typer.Option(help=help_of(SFTConfig, "helpful_fraction"), rich_help_panel=_IO)]
    = SFTConfig.helpful_fraction,
    helpful_max_new_tokens: Annotated[int, typer.Option(help=help_of(SFTConfig, "helpful_max_new_tokens"),
                                                        rich_help_panel=_IO)]
    = SFTConfig.helpful_max_new_tokens,
    quantize: Annotated[str | None, typer.Option(help=help_of(SFTConfig, "quantize"), rich_help_panel=_TRAIN)] = None,
    lora_r: Annotated[int, typer.Option(help=help_of(SFTConfig, "lora_r"), rich_help_panel=_TRAIN)]
    = SFTConfig.lora_r,
    epochs: Annotated[float, typer.Option(help=help_of(SFTConfig, "epochs"), rich_help_panel=_TRAIN)]
    = SFTConfig.epochs,
    max_steps: Annotated[int | None, typer.Option(help=help_of(SFTConfig, "max_steps"),
                                                  rich_help_panel=_TRAIN)] = None,
    lr: Annotated[float | None, typer.Option(help=help_of(SFTConfig, "lr"), rich_help_panel=_TRAIN)] = None,
    batch_size: Annotated[int, typer.Option(help=help_of(SFTConfig, "batch_size"), rich_help_panel=_TRAIN)]
    = SFTConfig.batch_size,
    max_length: Annotated[int, typer.Option(help=help_of(SFTConfig, "max_length"), rich_help_panel=_TRAIN)]
    = SFTConfig.max_length,
    seed: Annotated[int, typer.Option(help=help_of(SFTConfig, "seed"), rich_help_panel=_TRAIN)] = SFTConfig.seed,
    save_steps: Annotated[int, typer.Option(help=help_of(SFTConfig, "save_steps"), rich_help_panel=_RUN)]
    = SFTConfig.save_steps,
    generation_batch_size: Annotated[int, typer.Option(help=help_of(SFTConfig, "generation_batch_size"),
                                                       rich_help_panel=_RUN)]
    = SFTConfig.generation_batch_size,
    force: Annotated[bool, typer.Option("--force", help=help_of(SFTConfig, "force"), rich_help_panel=_RUN)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Fine-tune the model on its final revisions (loss on the answer only), mixed with helpful answers.

    Writes a standalone model directory (LoRA merged; the adapter kept in OUT/adapter). An interrupted
    run resumes from its last checkpoint when re-run; a finished one is skipped.

    Example: cai sft --data critique.jsonl --out sft-model --helpful data/helpful_prompts.jsonl --max-steps 20
    """
    from cai.stages import sft as stage

    cfg = SFTConfig(data=data, out=out, model=model, helpful=helpful, helpful_fraction=helpful_fraction,
                    helpful_max_new_tokens=helpful_max_new_tokens, quantize=quantize, lora_r=lora_r,
                    epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, max_length=max_length,
                    seed=seed, save_steps=save_steps, generation_batch_size=generation_batch_size, force=force)
    _run_stage(stage.run, cfg, json_output)



# ----------------------------------------------------------------------------- stage 2: feedback, feedback eval (issue 4)


feedback_app = typer.Typer(no_args_is_help=False)
app.add_typer(feedback_app, name="feedback")
_IO, _JUDGE, _SAMPLING, _RUN = "Inputs and outputs", "Judge", "Answer sampling", "Run"


@feedback_app.callback(invoke_without_command=True)
def feedback(
    ctx: typer.Context,
    # Not required=True: the group's callback also runs before `cai feedback eval`, which has neither.
    prompts: Annotated[str | None, typer.Option(help=help_of(FeedbackConfig, "prompts") + " Required.",
                                                rich_help_panel=_IO)] = None,
    policy: Annotated[str, typer.Option(help=help_of(FeedbackConfig, "policy"), rich_help_panel=_IO)]
    = FeedbackConfig.policy,
    out: Annotated[str | None, typer.Option(help=help_of(FeedbackConfig, "out") + " Required.",
                                            rich_help_panel=_IO)] = None,
    judge: Annotated[str | None, typer.Option(help=help_of(FeedbackConfig, "judge"), rich_help_panel=_JUDGE)] = None,
    constitution: Annotated[str, typer.Option(help=help_of(FeedbackConfig, "constitution"), rich_help_panel=_JUDGE)]
    = FeedbackConfig.constitution,
    method: Annotated[str, typer.Option(help=help_of(FeedbackConfig, "method"), rich_help_panel=_JUDGE)]
    = FeedbackConfig.method,
    principles: Annotated[int, typer.Option(help=help_of(FeedbackConfig, "principles"), rich_help_panel=_JUDGE)]
    = FeedbackConfig.principles,
    cot: Annotated[bool, typer.Option("--cot", help=help_of(FeedbackConfig, "cot"), rich_help_panel=_JUDGE)] = False,
    cot_max_new_tokens: Annotated[int, typer.Option(help=help_of(FeedbackConfig, "cot_max_new_tokens"),
                                                    rich_help_panel=_JUDGE)]
    = FeedbackConfig.cot_max_new_tokens,
    swap: Annotated[bool, typer.Option("--swap/--no-swap", help=help_of(FeedbackConfig, "swap"),
                                       rich_help_panel=_JUDGE)]
    = FeedbackConfig.swap,
    clamp: Annotated[str, typer.Option(metavar="LO,HI", help=help_of(FeedbackConfig, "clamp"),
                                       rich_help_panel=_JUDGE)]
    = ",".join(map(str, FeedbackConfig.clamp)),
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help=help_of(FeedbackConfig, "few_shot"),
                                           rich_help_panel=_JUDGE)] = FeedbackConfig.few_shot,
    judge_temperature: Annotated[float, typer.Option(help=help_of(FeedbackConfig, "judge_temperature"),
                                                     rich_help_panel=_JUDGE)]
    = FeedbackConfig.judge_temperature,
    samples_temperature: Annotated[float, typer.Option(help=help_of(FeedbackConfig, "samples_temperature"),
                                                       rich_help_panel=_SAMPLING)]
    = FeedbackConfig.samples_temperature,
    samples_top_p: Annotated[float, typer.Option(help=help_of(FeedbackConfig, "samples_top_p"),
                                                 rich_help_panel=_SAMPLING)]
    = FeedbackConfig.samples_top_p,
    max_new_tokens: Annotated[int, typer.Option(help=help_of(FeedbackConfig, "max_new_tokens"),
                                                rich_help_panel=_SAMPLING)]
    = FeedbackConfig.max_new_tokens,
    quantize: Annotated[str | None, typer.Option(help=help_of(FeedbackConfig, "quantize"),
                                                 rich_help_panel=_RUN)] = None,
    precision: Annotated[str, typer.Option(help=help_of(FeedbackConfig, "precision"), rich_help_panel=_RUN)]
    = FeedbackConfig.precision,
    batch_size: Annotated[int, typer.Option(help=help_of(FeedbackConfig, "batch_size"), rich_help_panel=_RUN)]
    = FeedbackConfig.batch_size,
    limit: Annotated[int | None, typer.Option(help=help_of(FeedbackConfig, "limit"), rich_help_panel=_RUN)] = None,
    seed: Annotated[int, typer.Option(help=help_of(FeedbackConfig, "seed"), rich_help_panel=_RUN)]
    = FeedbackConfig.seed,
    force: Annotated[bool, typer.Option("--force", help=help_of(FeedbackConfig, "force"),
                                        rich_help_panel=_RUN)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON result instead of paths.",
                                              rich_help_panel=_RUN)] = False,
) -> None:
    """Sample two answers per prompt from the policy and label which is less harmful with the judge.

    Writes one preference record per pair (chosen, rejected, soft label p_chosen, P(A) in each order) for `cai pm train` or `cai dpo`; pairs set aside go to OUT.rejected.jsonl. A killed run resumes where it stopped; a finished one is skipped. Check a judge first with `cai feedback eval`.

    Example: cai feedback --prompts data/red_team_prompts.jsonl --policy runs/demo/2-sft/model --out prefs.jsonl --limit 16
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [flag for flag, value in (("--prompts", prompts), ("--out", out)) if not value]
    if missing:
        raise typer.BadParameter(f"missing {', '.join(missing)} (see `cai feedback --help`; to check a judge "
                                 "instead, run `cai feedback eval --pairs FILE`)")
    from cai.stages import feedback as stage

    cfg = FeedbackConfig(prompts=prompts, policy=policy, out=out, judge=judge, constitution=constitution,
                         method=method, principles=principles, cot=cot, cot_max_new_tokens=cot_max_new_tokens,
                         swap=swap, clamp=clamp, few_shot=few_shot, judge_temperature=judge_temperature,
                         samples_temperature=samples_temperature, samples_top_p=samples_top_p,
                         max_new_tokens=max_new_tokens, quantize=quantize, precision=precision,
                         batch_size=batch_size, limit=limit, seed=seed, force=force)
    _run_stage(stage.run, cfg, json_output)


@feedback_app.command("eval")
def feedback_eval(
    pairs: Annotated[str, typer.Option(help=help_of(FeedbackEvalConfig, "pairs"), rich_help_panel=_IO)],
    judge: Annotated[str, typer.Option(help=help_of(FeedbackEvalConfig, "judge"), rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.judge,
    method: Annotated[str | None, typer.Option(help=help_of(FeedbackEvalConfig, "method"),
                                               rich_help_panel=_JUDGE)] = None,
    constitution: Annotated[str, typer.Option(help=help_of(FeedbackEvalConfig, "constitution"),
                                              rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.constitution,
    principles: Annotated[int, typer.Option(help=help_of(FeedbackEvalConfig, "principles"), rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.principles,
    swap: Annotated[bool, typer.Option("--swap/--no-swap", help=help_of(FeedbackEvalConfig, "swap"),
                                       rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.swap,
    cot: Annotated[bool, typer.Option("--cot", help=help_of(FeedbackEvalConfig, "cot"),
                                      rich_help_panel=_JUDGE)] = False,
    cot_max_new_tokens: Annotated[int, typer.Option(help=help_of(FeedbackEvalConfig, "cot_max_new_tokens"),
                                                    rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.cot_max_new_tokens,
    clamp: Annotated[str, typer.Option(metavar="LO,HI", help=help_of(FeedbackEvalConfig, "clamp"),
                                       rich_help_panel=_JUDGE)]
    = ",".join(map(str, FeedbackEvalConfig.clamp)),
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help=help_of(FeedbackEvalConfig, "few_shot"),
                                           rich_help_panel=_JUDGE)] = FeedbackEvalConfig.few_shot,
    judge_temperature: Annotated[float, typer.Option(help=help_of(FeedbackEvalConfig, "judge_temperature"),
                                                     rich_help_panel=_JUDGE)]
    = FeedbackEvalConfig.judge_temperature,
    sanity: Annotated[bool, typer.Option("--sanity/--no-sanity", help=help_of(FeedbackEvalConfig, "sanity"),
                                         rich_help_panel=_IO)]
    = FeedbackEvalConfig.sanity,
    limit: Annotated[int | None, typer.Option(help=help_of(FeedbackEvalConfig, "limit"), rich_help_panel=_IO)] = None,
    bins: Annotated[int, typer.Option(help=help_of(FeedbackEvalConfig, "bins"), rich_help_panel=_IO)]
    = FeedbackEvalConfig.bins,
    out: Annotated[str | None, typer.Option(help=help_of(FeedbackEvalConfig, "out"), rich_help_panel=_IO)] = None,
    quantize: Annotated[str | None, typer.Option(help=help_of(FeedbackEvalConfig, "quantize"),
                                                 rich_help_panel=_RUN)] = None,
    precision: Annotated[str, typer.Option(help=help_of(FeedbackEvalConfig, "precision"), rich_help_panel=_RUN)]
    = FeedbackEvalConfig.precision,
    batch_size: Annotated[int, typer.Option(help=help_of(FeedbackEvalConfig, "batch_size"), rich_help_panel=_RUN)]
    = FeedbackEvalConfig.batch_size,
    seed: Annotated[int, typer.Option(help=help_of(FeedbackEvalConfig, "seed"), rich_help_panel=_RUN)]
    = FeedbackEvalConfig.seed,
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON instead of tables.",
                                              rich_help_panel=_RUN)] = False,
) -> None:
    """Check a judge against labelled pairs: agreement per order and after the swap, consistency, ECE.

    Also judges the built-in sanity pairs (a refusal against a compliant answer to a clearly harmful request, and a helpful answer against a needless refusal), split by kind. Without --method it prints one table per method (mc and contrast), so the better judge for a model is visible at a glance.

    Example: cai feedback eval --pairs data/helpful_prefs_example.jsonl --judge embedded:smollm2-135m-instruct --limit 32
    """
    from cai.stages import feedback as stage

    cfg = FeedbackEvalConfig(pairs=pairs, judge=judge, method=method, constitution=constitution, principles=principles,
                             swap=swap, cot=cot, cot_max_new_tokens=cot_max_new_tokens, clamp=clamp,
                             few_shot=few_shot, judge_temperature=judge_temperature, sanity=sanity, limit=limit,
                             bins=bins, out=out, quantize=quantize, precision=precision, batch_size=batch_size,
                             seed=seed)
    started = time.time()
    with RichReporter() as reporter:
        result = stage.run_eval(cfg, _context(reporter=reporter))
    if json_output:
        print(json.dumps({"stage": result.stage, "outputs": result.outputs, "counts": result.counts,
                          "metrics": result.metrics["methods"], "temperature_fit": result.metrics["temperature_fit"]}))
    else:
        print("\n\n".join(result.metrics["tables"]))
    for path in result.outputs.values():
        stderr.print(f"wrote {path}", highlight=False)
    stderr.print(f"{result.stage}: {result.summary} [{time.time() - started:.0f} s]", highlight=False)




# ----------------------------------------------------------------------------- stage 3: pm train, pm score, pm eval (issue 5)


pm_app = typer.Typer(help="Train, score and evaluate the hybrid preference model (stage 3).", no_args_is_help=True)
app.add_typer(pm_app, name="pm")
_PM_DATA, _PM_MODEL, _PM_TRAINING = "Data", "Model", "Training"


@pm_app.command("train")
def pm_train(
    ai: Annotated[str, typer.Option(help=help_of(PMTrainConfig, "ai"), rich_help_panel=_PM_DATA)],
    out: Annotated[str, typer.Option(help=help_of(PMTrainConfig, "out"), rich_help_panel=_PM_DATA)],
    human: Annotated[str | None, typer.Option(help=help_of(PMTrainConfig, "human"), rich_help_panel=_PM_DATA)]
    = None,
    human_fraction: Annotated[float, typer.Option(help=help_of(PMTrainConfig, "human_fraction"),
                                                  rich_help_panel=_PM_DATA)] = PMTrainConfig.human_fraction,
    eval_fraction: Annotated[float, typer.Option(help=help_of(PMTrainConfig, "eval_fraction"),
                                                 rich_help_panel=_PM_DATA)] = PMTrainConfig.eval_fraction,
    max_length: Annotated[int, typer.Option(help=help_of(PMTrainConfig, "max_length"), rich_help_panel=_PM_DATA)]
    = PMTrainConfig.max_length,
    model: Annotated[str, typer.Option("--model", "-m", help=help_of(PMTrainConfig, "model"),
                                       rich_help_panel=_PM_MODEL)] = PMTrainConfig.model,
    quantize: Annotated[str | None, typer.Option(help=help_of(PMTrainConfig, "quantize"),
                                                 rich_help_panel=_PM_MODEL)] = None,
    lora_r: Annotated[int, typer.Option(help=help_of(PMTrainConfig, "lora_r"), rich_help_panel=_PM_MODEL)]
    = PMTrainConfig.lora_r,
    epochs: Annotated[float, typer.Option(help=help_of(PMTrainConfig, "epochs"), rich_help_panel=_PM_TRAINING)]
    = PMTrainConfig.epochs,
    max_steps: Annotated[int | None, typer.Option(help=help_of(PMTrainConfig, "max_steps"),
                                                  rich_help_panel=_PM_TRAINING)] = None,
    lr: Annotated[float | None, typer.Option(help=help_of(PMTrainConfig, "lr"), rich_help_panel=_PM_TRAINING)]
    = None,
    batch_size: Annotated[int, typer.Option(help=help_of(PMTrainConfig, "batch_size"),
                                            rich_help_panel=_PM_TRAINING)] = PMTrainConfig.batch_size,
    seed: Annotated[int, typer.Option(help=help_of(PMTrainConfig, "seed"), rich_help_panel=_PM_TRAINING)]
    = PMTrainConfig.seed,
    save_steps: Annotated[int, typer.Option(help=help_of(PMTrainConfig, "save_steps"),
                                            rich_help_panel=_PM_TRAINING)] = PMTrainConfig.save_steps,
    force: Annotated[bool, typer.Option("--force", help=help_of(PMTrainConfig, "force"))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Train a preference model on AI harmlessness labels mixed with human helpfulness labels.

    Soft-label Bradley-Terry loss; LoRA by default, QLoRA with --quantize 4bit, full with --lora-r 0.

    Writes OUT/model and reports held-out accuracy on AI and human pairs. A re-run resumes.

    Example: cai pm train --ai prefs.jsonl --human data/helpful_prefs_example.jsonl --out runs/pm
    """
    from cai.stages.pm import run_train

    cfg = PMTrainConfig(ai=ai, out=out, human=human, human_fraction=human_fraction, model=model, quantize=quantize,
                        lora_r=lora_r, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                        max_length=max_length, eval_fraction=eval_fraction, seed=seed, save_steps=save_steps,
                        force=force)
    _run_stage(run_train, cfg, json_output)


@pm_app.command("score")
def pm_score(
    model: Annotated[str, typer.Option("--model", "-m", help=help_of(PMScoreConfig, "model"))],
    prompt: Annotated[str | None, typer.Option(help=help_of(PMScoreConfig, "prompt"))] = None,
    response: Annotated[str | None, typer.Option(help=help_of(PMScoreConfig, "response"))] = None,
    input_path: Annotated[str | None, typer.Option("--input", help=help_of(PMScoreConfig, "input"))] = None,
    out: Annotated[str | None, typer.Option(help=help_of(PMScoreConfig, "out"))] = None,
    max_length: Annotated[int | None, typer.Option(help=help_of(PMScoreConfig, "max_length"))] = None,
    batch_size: Annotated[int, typer.Option(help=help_of(PMScoreConfig, "batch_size"))] = PMScoreConfig.batch_size,
) -> None:
    """Print the preference model's reward for a response (or add `reward` to each record of a JSONL).

    Example: cai pm score --model runs/pm --prompt "How do I pick a lock?" --response "I can't help with that."
    """
    from cai.stages.pm import run_score

    cfg = PMScoreConfig(model=model, prompt=prompt, response=response, input=input_path, out=out,
                        max_length=max_length, batch_size=batch_size)
    with RichReporter() as reporter:
        scored = run_score(cfg, _context(reporter=reporter))
    if cfg.input is None:
        print(f"{scored[0]['reward']:.4f}")
    elif cfg.out:
        print(cfg.out)
    else:
        for record in scored:
            print(json.dumps(record, ensure_ascii=False))


@pm_app.command("eval")
def pm_eval(
    model: Annotated[str, typer.Option("--model", "-m", help=help_of(PMEvalConfig, "model"))],
    pairs: Annotated[str, typer.Option(help=help_of(PMEvalConfig, "pairs"))],
    out: Annotated[str | None, typer.Option(help=help_of(PMEvalConfig, "out"))] = None,
    limit: Annotated[int | None, typer.Option(help=help_of(PMEvalConfig, "limit"))] = None,
    max_length: Annotated[int | None, typer.Option(help=help_of(PMEvalConfig, "max_length"))] = None,
    bins: Annotated[int, typer.Option(help=help_of(PMEvalConfig, "bins"))] = PMEvalConfig.bins,
    batch_size: Annotated[int, typer.Option(help=help_of(PMEvalConfig, "batch_size"))] = PMEvalConfig.batch_size,
    force: Annotated[bool, typer.Option("--force", help=help_of(PMEvalConfig, "force"))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
) -> None:
    """Measure a preference model on labelled pairs: accuracy, mean margin, calibration (ECE), length bias.

    With --out, also writes metrics.json, scores.jsonl, calibration.png and length_bias.png there.

    Example: cai pm eval --model runs/pm --pairs data/helpful_prefs_example.jsonl --out runs/pm/eval
    """
    from cai.stages.pm import format_metrics, run_eval

    cfg = PMEvalConfig(model=model, pairs=pairs, out=out, limit=limit, max_length=max_length, bins=bins,
                       batch_size=batch_size, force=force)
    started = time.time()
    with RichReporter() as reporter:
        result = run_eval(cfg, _context(reporter=reporter))
    print(json.dumps(result.metrics) if json_output else format_metrics(result.metrics))
    for name, path in result.outputs.items():
        stderr.print(f"{name}: {path}", highlight=False)
    stderr.print(f"pm eval: {result.summary} [{time.time() - started:.0f} s]", highlight=False)




# ----------------------------------------------------------------------------- stage 4: rl (issue 6)



_RL_REWARDS = "Rewards and monitors"
_RL_TRAINING = "Training"


@app.command("rl")
def rl_command(
    prompts: Annotated[list[str], typer.Option("--prompts",
                                               help=help_of(RLConfig, "prompts") + " Repeat for several.")],
    out: Annotated[str, typer.Option(help=help_of(RLConfig, "out"))],
    policy: Annotated[str, typer.Option(help=help_of(RLConfig, "policy"))] = RLConfig.policy,
    pm: Annotated[str | None, typer.Option(help=help_of(RLConfig, "pm"))] = None,
    algo: Annotated[str, typer.Option(help=help_of(RLConfig, "algo"))] = RLConfig.algo,
    beta: Annotated[float, typer.Option(help=help_of(RLConfig, "beta"))] = RLConfig.beta,
    reward: Annotated[list[str] | None, typer.Option(
        "--reward", help=help_of(RLConfig, "reward") + " Repeatable. Default: pm:1.", rich_help_panel=_RL_REWARDS)] = None,
    num_generations: Annotated[int, typer.Option(help=help_of(RLConfig, "num_generations"),
                                                 rich_help_panel=_RL_TRAINING)]
    = RLConfig.num_generations,
    prompts_per_step: Annotated[int, typer.Option(help=help_of(RLConfig, "prompts_per_step"),
                                                  rich_help_panel=_RL_TRAINING)] = RLConfig.prompts_per_step,
    max_steps: Annotated[int, typer.Option(help=help_of(RLConfig, "max_steps"), rich_help_panel=_RL_TRAINING)]
    = RLConfig.max_steps,
    lr: Annotated[float | None, typer.Option(help=help_of(RLConfig, "lr"), rich_help_panel=_RL_TRAINING)] = None,
    max_new_tokens: Annotated[int, typer.Option(help=help_of(RLConfig, "max_new_tokens"),
                                                rich_help_panel=_RL_TRAINING)]
    = RLConfig.max_new_tokens,
    temperature: Annotated[float, typer.Option(help=help_of(RLConfig, "temperature"), rich_help_panel=_RL_TRAINING)]
    = RLConfig.temperature,
    quantize: Annotated[str | None, typer.Option(help=help_of(RLConfig, "quantize"),
                                                 rich_help_panel=_RL_TRAINING)] = None,
    lora_r: Annotated[int, typer.Option(help=help_of(RLConfig, "lora_r"), rich_help_panel=_RL_TRAINING)]
    = RLConfig.lora_r,
    limit: Annotated[int | None, typer.Option(help=help_of(RLConfig, "limit"))] = None,
    length_target: Annotated[int | None, typer.Option(help=help_of(RLConfig, "length_target"),
                                                      rich_help_panel=_RL_REWARDS)] = None,
    code_timeout: Annotated[float, typer.Option(help=help_of(RLConfig, "code_timeout"), rich_help_panel=_RL_REWARDS)]
    = RLConfig.code_timeout,
    code_memory_mb: Annotated[int, typer.Option(help=help_of(RLConfig, "code_memory_mb"),
                                                rich_help_panel=_RL_REWARDS)]
    = RLConfig.code_memory_mb,
    judge: Annotated[str | None, typer.Option(help=help_of(RLConfig, "judge"), rich_help_panel=_RL_REWARDS)] = None,
    constitution: Annotated[str, typer.Option(help=help_of(RLConfig, "constitution"), rich_help_panel=_RL_REWARDS)]
    = RLConfig.constitution,
    judge_every: Annotated[int, typer.Option(help=help_of(RLConfig, "judge_every"), rich_help_panel=_RL_REWARDS)]
    = RLConfig.judge_every,
    checkpoint_every: Annotated[int, typer.Option(help=help_of(RLConfig, "checkpoint_every"),
                                                  rich_help_panel=_RL_TRAINING)] = RLConfig.checkpoint_every,
    pm_batch_size: Annotated[int, typer.Option(help=help_of(RLConfig, "pm_batch_size"), rich_help_panel=_RL_TRAINING)]
    = RLConfig.pm_batch_size,
    seed: Annotated[int, typer.Option(help=help_of(RLConfig, "seed"))] = RLConfig.seed,
    force: Annotated[bool, typer.Option("--force", help=help_of(RLConfig, "force"))] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Optimise a policy against the preference model (GRPO or RLOO) with a KL penalty and optional verifiable rewards.

    Example: cai rl --policy runs/x/2-sft/model --pm runs/x/4-pm/model --prompts data/red_team_prompts.jsonl
    --prompts data/helpful_prompts.jsonl --out runs/x/5-rl --max-steps 20
    """
    from cai.stages.rl import RLConfig, run

    cfg = RLConfig(prompts=list(prompts), out=out, policy=policy, pm=pm, algo=algo, beta=beta,
                   reward=list(reward) if reward else ["pm:1"], num_generations=num_generations,
                   prompts_per_step=prompts_per_step, max_steps=max_steps, lr=lr, max_new_tokens=max_new_tokens,
                   temperature=temperature, quantize=quantize, lora_r=lora_r, limit=limit,
                   length_target=length_target, code_timeout=code_timeout, code_memory_mb=code_memory_mb,
                   judge=judge, constitution=constitution, judge_every=judge_every,
                   checkpoint_every=checkpoint_every, pm_batch_size=pm_batch_size, seed=seed, force=force)
    _run_stage(run, cfg, json_)



# ----------------------------------------------------------------------------- offline path: dpo (issue 8)


_DPO_DATA, _DPO_MODEL, _DPO_TRAINING = "Preference data", "Model and output", "Training"


@app.command("dpo")
def dpo(
    ai: Annotated[str, typer.Option(help=help_of(DPOConfig, "ai"), rich_help_panel=_DPO_DATA)],
    out: Annotated[str, typer.Option(help=help_of(DPOConfig, "out"), rich_help_panel=_DPO_MODEL)],
    policy: Annotated[str, typer.Option(help=help_of(DPOConfig, "policy"), rich_help_panel=_DPO_MODEL)]
    = DPOConfig.policy,
    human: Annotated[str | None, typer.Option(help=help_of(DPOConfig, "human"), rich_help_panel=_DPO_DATA)] = None,
    human_fraction: Annotated[float, typer.Option(help=help_of(DPOConfig, "human_fraction"),
                                                  rich_help_panel=_DPO_DATA)] = DPOConfig.human_fraction,
    eval_fraction: Annotated[float, typer.Option(help=help_of(DPOConfig, "eval_fraction"),
                                                 rich_help_panel=_DPO_DATA)] = DPOConfig.eval_fraction,
    soft_labels: Annotated[bool, typer.Option("--soft-labels", help=help_of(DPOConfig, "soft_labels"),
                                              rich_help_panel=_DPO_DATA)] = False,
    beta: Annotated[float, typer.Option(help=help_of(DPOConfig, "beta"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.beta,
    loss: Annotated[str, typer.Option(help=help_of(DPOConfig, "loss"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.loss,
    quantize: Annotated[str | None, typer.Option(help=help_of(DPOConfig, "quantize"), rich_help_panel=_DPO_MODEL)]
    = None,
    lora_r: Annotated[int, typer.Option(help=help_of(DPOConfig, "lora_r"), rich_help_panel=_DPO_MODEL)]
    = DPOConfig.lora_r,
    epochs: Annotated[int, typer.Option(help=help_of(DPOConfig, "epochs"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.epochs,
    lr: Annotated[float | None, typer.Option(help=help_of(DPOConfig, "lr"), rich_help_panel=_DPO_TRAINING)] = None,
    max_steps: Annotated[int | None, typer.Option(help=help_of(DPOConfig, "max_steps"),
                                                  rich_help_panel=_DPO_TRAINING)] = None,
    max_length: Annotated[int, typer.Option(help=help_of(DPOConfig, "max_length"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.max_length,
    batch_size: Annotated[int, typer.Option(help=help_of(DPOConfig, "batch_size"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.batch_size,
    save_steps: Annotated[int, typer.Option(help=help_of(DPOConfig, "save_steps"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.save_steps,
    seed: Annotated[int, typer.Option(help=help_of(DPOConfig, "seed"), rich_help_panel=_DPO_TRAINING)]
    = DPOConfig.seed,
    force: Annotated[bool, typer.Option("--force", help=help_of(DPOConfig, "force"))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Train the policy with DPO on mixed human/AI preferences: the offline alternative to pm + rl.

    The pairs are mixed and held out exactly as `cai pm train` does; the reference model is the starting
    policy (with LoRA: the adapter disabled, no second copy). A re-run resumes from the last checkpoint;
    a finished run is skipped.

    Example: cai dpo --policy runs/demo/2-sft/model --ai runs/demo/3-feedback/prefs.jsonl
    --human data/helpful_prefs_example.jsonl --soft-labels --out dpo-model
    """
    from cai.stages import dpo as stage

    cfg = DPOConfig(policy=policy, ai=ai, out=out, human=human, human_fraction=human_fraction,
                    eval_fraction=eval_fraction, beta=beta, loss=loss, soft_labels=soft_labels, quantize=quantize,
                    lora_r=lora_r, epochs=epochs, lr=lr, max_steps=max_steps, max_length=max_length,
                    batch_size=batch_size, save_steps=save_steps, seed=seed, force=force)
    _run_stage(stage.run, cfg, json_output)


# ----------------------------------------------------------------------------- pipeline: run, eval (issue 7)



@app.command("filter")
def filter_command(
    prompts: Annotated[str, typer.Option(help=help_of(FilterConfig, "prompts"))],
    out: Annotated[str, typer.Option(help=help_of(FilterConfig, "out"))],
    policy: Annotated[str, typer.Option(help=help_of(FilterConfig, "policy"))] = FilterConfig.policy,
    k: Annotated[int, typer.Option("--k", help=help_of(FilterConfig, "k"))] = FilterConfig.k,
    samples: Annotated[int, typer.Option(help=help_of(FilterConfig, "samples"))] = FilterConfig.samples,
    temperature: Annotated[float, typer.Option(help=help_of(FilterConfig, "temperature"))] = FilterConfig.temperature,
    max_new_tokens: Annotated[int, typer.Option(help=help_of(FilterConfig, "max_new_tokens"))]
    = FilterConfig.max_new_tokens,
    limit: Annotated[int | None, typer.Option(help=help_of(FilterConfig, "limit"))] = None,
    precision: Annotated[str, typer.Option(help=help_of(FilterConfig, "precision"))] = FilterConfig.precision,
    batch_size: Annotated[int, typer.Option(help=help_of(FilterConfig, "batch_size"))] = FilterConfig.batch_size,
    seed: Annotated[int, typer.Option(help=help_of(FilterConfig, "seed"))] = FilterConfig.seed,
    force: Annotated[bool, typer.Option("--force", help=help_of(FilterConfig, "force"))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Keep the verifiable prompts the policy solves sometimes and fails sometimes, for RL.

    Example: cai filter --prompts data/maths_train.jsonl --policy embedded:smollm2-135m-instruct
    --k 4 --samples 8 --out runs/x/5-filter
    """
    from cai.stages.filter import FilterConfig, run

    cfg = FilterConfig(prompts=prompts, out=out, policy=policy, k=k, samples=samples, temperature=temperature,
                       max_new_tokens=max_new_tokens, limit=limit, precision=precision, batch_size=batch_size,
                       seed=seed, force=force)
    _run_stage(run, cfg, json_output)


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help=help_of(EvalConfig, "models"))],
    harmful: Annotated[str, typer.Option(help=help_of(EvalConfig, "harmful"))],
    benign: Annotated[str, typer.Option(help=help_of(EvalConfig, "benign"))],
    out: Annotated[str, typer.Option(help=help_of(EvalConfig, "out"))],
    judge: Annotated[str, typer.Option(help=help_of(EvalConfig, "judge"), rich_help_panel="Judge")]
    = EvalConfig.judge,
    judge_method: Annotated[str, typer.Option(help=help_of(EvalConfig, "judge_method"), rich_help_panel="Judge")]
    = EvalConfig.judge_method,
    constitution: Annotated[str, typer.Option(help=help_of(EvalConfig, "constitution"), rich_help_panel="Judge")]
    = EvalConfig.constitution,
    principles: Annotated[int, typer.Option(help=help_of(EvalConfig, "principles"), rich_help_panel="Judge")]
    = EvalConfig.principles,
    head_to_head: Annotated[bool, typer.Option("--head-to-head/--no-head-to-head",
                                               help=help_of(EvalConfig, "head_to_head"),
                                               rich_help_panel="Judge")] = EvalConfig.head_to_head,
    pm: Annotated[str | None, typer.Option(help=help_of(EvalConfig, "pm"))] = None,
    verifiable: Annotated[str | None, typer.Option(help=help_of(EvalConfig, "verifiable"),
                                                   rich_help_panel="pass@k")] = None,
    k: Annotated[int, typer.Option("--k", help=help_of(EvalConfig, "k"), rich_help_panel="pass@k")] = EvalConfig.k,
    samples: Annotated[int, typer.Option(help=help_of(EvalConfig, "samples"), rich_help_panel="pass@k")]
    = EvalConfig.samples,
    sample_temperature: Annotated[float, typer.Option(help=help_of(EvalConfig, "sample_temperature"),
                                                      rich_help_panel="pass@k")] = EvalConfig.sample_temperature,
    limit: Annotated[int | None, typer.Option(help=help_of(EvalConfig, "limit"))] = None,
    max_new_tokens: Annotated[int, typer.Option(help=help_of(EvalConfig, "max_new_tokens"))]
    = EvalConfig.max_new_tokens,
    quantize: Annotated[str | None, typer.Option(help=help_of(EvalConfig, "quantize"))] = None,
    precision: Annotated[str, typer.Option(help=help_of(EvalConfig, "precision"), rich_help_panel="Speed")]
    = EvalConfig.precision,
    seed: Annotated[int, typer.Option(help=help_of(EvalConfig, "seed"))] = EvalConfig.seed,
    batch_size: Annotated[int, typer.Option(help=help_of(EvalConfig, "batch_size"), rich_help_panel="Speed")]
    = EvalConfig.batch_size,
    examples: Annotated[int, typer.Option(help=help_of(EvalConfig, "examples"))] = EvalConfig.examples,
    force: Annotated[bool, typer.Option("--force", help=help_of(EvalConfig, "force"))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Measure harmlessness, over-refusal, PM score, head-to-head Elo and pass@k of one or more models.

    Example: cai eval -m base=embedded:smollm2-135m-instruct -m rl=runs/demo/5-rl/model
    --harmful data/eval_harmful.jsonl --benign data/eval_benign.jsonl --out eval/

    Maths only: cai eval -m base=embedded:smollm2-135m-instruct -m rl=runs/rlvr/5-rl/model
    --harmful none --benign none --judge none --verifiable data/maths_heldout.jsonl --k 4 --samples 8 --out eval/
    """
    from cai.stages.evaluate import EvalConfig, run

    cfg = EvalConfig(models=model, harmful=harmful, benign=benign, out=out, judge=judge, judge_method=judge_method,
                     constitution=constitution, principles=principles, head_to_head=head_to_head, pm=pm,
                     verifiable=verifiable, k=k, samples=samples, sample_temperature=sample_temperature,
                     limit=limit, max_new_tokens=max_new_tokens, quantize=quantize, precision=precision, seed=seed,
                     batch_size=batch_size, examples=examples, force=force)
    _run_stage(run, cfg, json_output)


def _stage_list() -> str:
    from cai.recipe import stage_names

    return ", ".join(stage_names())


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/: smoke, demo, demo-dpo, rlvr, qlora-1gpu, multi-gpu).")],
    from_stage: Annotated[str | None, typer.Option("--from", help=f"Re-run this stage and every later one; "
                                                   f"earlier ones must have finished ({_stage_list()}).")] = None,
    only: Annotated[str | None, typer.Option(help="Run only this stage (its inputs must exist).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name: the directory under --runs-dir "
                                                  "(default: the recipe's name).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: STAGE.KEY=VALUE, "
                                                   "data.KEY=FILE or a top-level KEY=VALUE (repeatable).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories live.")] = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Discard the selected stages' outputs and redo them.")]
    = False,
    check: Annotated[bool, typer.Option("--check", help="Validate the recipe and print the resolved "
                                                        "version; run nothing.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Run the whole pipeline from a recipe; finished stages are skipped, interrupted ones resume.

    Example: cai run recipes/demo.yaml   (then: cai run recipes/demo.yaml --set rl.beta=0.1 re-runs rl and eval)
    """
    import yaml

    from cai import recipe as recipes

    loaded = recipes.load(recipe, set_ or [], name=name, runs_dir=runs_dir)
    if check:
        print(yaml.safe_dump(loaded.resolved(), sort_keys=False), end="")
        return
    started = time.time()
    with RichReporter() as reporter:
        overall = reporter.progress.add_task(f"run {loaded.name}", total=None, unit="stages", tokens=0)

        def on_stage(index: int, total: int, stage: str) -> None:
            reporter.progress.update(overall, total=total, completed=index,
                                     description=f"run {loaded.name} [{index + 1}/{total}] {stage}")

        result = recipes.run(loaded, reporter, from_stage=from_stage, only=only, force=force, on_stage=on_stage)
        reporter.progress.update(overall, completed=len(result.outcomes), description=f"run {loaded.name}: done")
    report = result.report_path
    metrics_path = loaded.run_dir / "6-eval" / "metrics.json"
    lines = recipes.summary_lines(json.loads(metrics_path.read_text())) if metrics_path.exists() else []
    if json_output:
        print(json.dumps({"run_dir": str(loaded.run_dir), "report": str(report) if report else None,
                          "stages": [{"stage": o.name, "skipped": o.skipped, "seconds": o.seconds,
                                      "summary": o.summary} for o in result.outcomes], "summary": lines}))
    else:
        print(report if report else loaded.run_dir)
    stderr.print(f"run {loaded.name}: {len(result.outcomes)} stages "
                 f"({sum(o.skipped for o in result.outcomes)} already done) in {time.time() - started:.0f} s; "
                 f"{loaded.run_dir}", highlight=False)
    for line in lines:
        stderr.print(line, highlight=False)


# ----------------------------------------------------------------------------- entry point


def _usage_error_types() -> tuple[type, ...]:
    """click's ClickException and typer's own copy of it: typer 0.2x ships click inside itself, and those
    exceptions (unknown option, missing argument, `cai` alone) do not subclass the click package's."""
    types = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:  # typer versions that use the click package
        pass
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


INTERRUPTED = "interrupted; finished records are kept -- run the same command again to resume"


def main() -> None:
    """Console entry point: run the app, turning `CaiError` into one line on stderr and exit code 1, and
    usage errors into click's short message (exit code 2) rather than a traceback."""
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # click knows --debug only before the command; people add it at the end of the failed one
        args = ["--debug", *(arg for arg in args if arg != "--debug")]
    try:
        # Outside standalone mode click returns a command's `typer.Exit` code instead of exiting with it
        # (typer turns Ctrl-C into exit code 130 that way).
        code = app(args=args, standalone_mode=False)
        if code == 130:
            stderr.print(INTERRUPTED, highlight=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CaiError as exc:
        if debug:
            raise
        stderr.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(1)
    except OSError as exc:
        if debug or exc.filename is None:  # not about a path the user gave: a bug to see in full
            raise
        # A path the user can fix: an --out in a directory they cannot write, a full disk.
        stderr.print(f"error: {exc.filename}: {exc.strerror or exc} -- check the path, its permissions and "
                     "the free space (--debug shows where it happened)", highlight=False, markup=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        stderr.print("aborted; finished records are kept -- run the same command again to resume")
        sys.exit(130)
    except KeyboardInterrupt:
        stderr.print(INTERRUPTED, highlight=False)
        sys.exit(130)
    except _usage_error_types() as exc:
        exc.show()
        sys.exit(exc.exit_code)
