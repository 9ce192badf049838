"""The `cai` command line: parses options, builds a stage config, calls the stage. No logic lives here.

Each stage command is generated from its config dataclass by `stage_command`: one option per field, its
flag, help, default and choices taken from the field, so an option and its recipe key cannot drift apart.

Results go to stdout (paths, or JSON with --json); progress, status and errors go to stderr.
Errors a user can fix (`CaiError`) print one line, `error: ...`, and exit 1; `--debug` shows the traceback.
"""

import dataclasses
import inspect
import json
import logging
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

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
from typer.core import TyperCommand, TyperGroup

from cai import __version__
from cai.errors import CaiError

# Every stage option is generated from its config dataclass (`stage_command`). Stage modules import torch
# only inside functions, so importing the configs keeps `cai --help` fast.
from cai.stages.base import option_flag
from cai.stages.critique import CritiqueConfig
from cai.stages.dpo import DPOConfig
from cai.stages.evaluate import EvalConfig
from cai.stages.feedback import FeedbackConfig, FeedbackEvalConfig
from cai.stages.filter import FilterConfig
from cai.stages.pm import PMEvalConfig, PMScoreConfig, PMTrainConfig
from cai.stages.rl import RLConfig
from cai.stages.sft import SFTConfig

# `cai --help` lists the commands in the order a run goes through them.
COMMAND_ORDER = ("models", "constitution", "critique", "sft", "feedback", "pm", "filter", "rl", "dpo", "eval", "run")


class _Options:
    """What every cai command and group adds to typer's: flags shown bare in --help (`--force`, not
    `--force <bool>`, which reads as if it took a value), through an empty metavar on every flag, --help
    included; and an option given under its old name (recipe.RENAMED) is refused naming the new one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # click's NoSuchOption, typer's own copy of it, or anything else to re-raise
            old = getattr(exc, "option_name", None) or ""
            from cai.recipe import RENAMED

            stage = (ctx.command_path.split() + [""])[1]
            new = RENAMED.get(stage, {}).get(old.removeprefix("--").replace("-", "_"), "").replace("_", "-")
            if new and any(f"--{new}" in param.opts for param in self.params):
                exc.message, exc.possibilities = f"{old} is renamed to --{new}", None
            raise


class _Command(_Options, TyperCommand):
    pass


class _Group(_Options, TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)  # in the order they were added
        return sorted(names, key=lambda name: COMMAND_ORDER.index(name) if name in COMMAND_ORDER else len(COMMAND_ORDER))


app = typer.Typer(name="cai", help="Constitutional AI on your own model and constitution.", cls=_Group,
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
models_app = typer.Typer(help="Resolve, convert and cache models.", no_args_is_help=True, cls=_Group)
constitution_app = typer.Typer(help="Write, check and inspect constitutions.", no_args_is_help=True, cls=_Group)
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
        # Warnings of the layers below the stages (records' skipped rows) print as status lines too.
        self._handler = logging.Handler(logging.WARNING)
        self._handler.emit = lambda record: self.log(record.getMessage())
        logging.getLogger("cai").addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("cai").removeHandler(self._handler)
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


@models_app.command("prepare", cls=_Command)
def models_prepare(
    reference: Annotated[str, typer.Argument(help="Model: embedded:NAME, a hub id, or a local directory.")]
    = "embedded:smollm2-135m-instruct",
) -> None:
    """Resolve a model reference (converting and caching embedded models) and print its local directory.

    Example: cai models prepare embedded:smollm2-135m-instruct
    """
    from cai.models import resolve

    print(resolve(reference))


@models_app.command("list", cls=_Command)
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


@constitution_app.command("init", cls=_Command)
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


@constitution_app.command("validate", cls=_Command)
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


@constitution_app.command("show", cls=_Command)
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


# ----------------------------------------------------------------------------- stage commands


def _option(f: dataclasses.Field, hint, required: bool, panel: str | None) -> inspect.Parameter:
    """One command option from one config field: the flag (`option_flag`, plus -m for --model), the help
    and choices from the field's metadata, the type and default from its annotation and default.

    A bool is a flag: `--cot` when it defaults to off, `--swap/--no-swap` when on. A list is repeated
    (`--reward pm:1 --reward math:1`); a tuple is typed comma-separated (`--clamp 0.4,0.6`). The default
    shown is the config's own; an option left out (None) is not passed, so the config's default applies."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    flag = option_flag(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    names = [f"--{flag}/--no-{flag}" if hint is bool and default else f"--{flag}", *(["-m"] if flag == "model" else [])]
    settings = {"help": f.metadata["help"], "rich_help_panel": panel}
    if typing.get_origin(hint) is list:
        hint, default = hint | None, default or None
    elif typing.get_origin(hint) is tuple:
        hint, default = str, ",".join(map(str, default))
        settings["metavar"] = f.metadata.get("metavar")
    if f.metadata.get("choices"):
        hint = Literal[tuple(f.metadata["choices"])]
    if optional or default in ("", None):
        hint, default = hint | None, (None if default == "" else default)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hint, typer.Option(
        *names, **settings)], default=inspect.Parameter.empty if required else default)


def stage_command(parent: typer.Typer, name: str | None, config: type, *, required: tuple[str, ...] = (),
                  panels: dict[str, str] | None = None, json_help: str | None = "Print the result as one JSON object."):
    """Register `action(cfg, json_output)` as the command `name` of `parent`, with one option per field of
    `config` (a stage config dataclass) and the action's docstring as its help. `name=None` makes it the
    group callback of `parent` (`cai feedback` beside `cai feedback eval`). `panels` maps a help panel to the
    space-separated fields shown in it; the rest go under Options. `required` fields have no default on the
    command line (a recipe wires them in)."""
    hints = typing.get_type_hints(config)
    panel_of = {field: panel for panel, fields in (panels or {}).items() for field in fields.split()}
    unknown = (set(panel_of) | set(required)) - set(hints)
    if unknown:
        raise TypeError(f"{config.__name__} has no field {', '.join(sorted(unknown))}")
    parameters = [_option(f, hints[f.name], f.name in required, panel_of.get(f.name)) for f in dataclasses.fields(config)]
    if json_help:
        parameters.append(inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False,
                                            annotation=Annotated[bool, typer.Option("--json", help=json_help)]))
    if name is None:
        parameters.insert(0, inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))

    def register(action: Callable) -> Callable:
        def command(ctx: typer.Context | None = None, json_output: bool = False, **values) -> None:
            if ctx is not None and ctx.invoked_subcommand is not None:
                return  # the group's own options run before each of its commands; this one is not wanted
            cfg = config(**{key: value for key, value in values.items() if value is not None and value != []})
            action(cfg, json_output) if json_help else action(cfg)

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {}
        command.__doc__, command.__name__ = action.__doc__, action.__name__
        if name is None:
            parent.callback(invoke_without_command=True)(command)
        else:
            parent.command(name, cls=_Command)(command)
        return action

    return register


@stage_command(app, "critique", CritiqueConfig, required=("prompts", "out"), panels={
    "Inputs and outputs": "prompts out model constitution limit",
    "Generation": "revisions few_shot revision_prefix max_new_tokens temperature top_p seed precision",
    "Running": "batch_size chunk_size force"})
def critique(cfg: CritiqueConfig, json_output: bool) -> None:
    """Answer prompts, then critique and revise each answer under constitution principles (SL-CAI data).

    Writes one record per prompt: the initial answer, every round's principle, critique and revision,
    and the final revision. Interrupt it any time: re-running the same command resumes.

    Example: cai critique --prompts data/red_team_prompts.jsonl --out critique.jsonl --limit 16 --revisions 2
    """
    from cai.stages import critique as stage

    _run_stage(stage.run, cfg, json_output)


@stage_command(app, "sft", SFTConfig, required=("data", "out"), panels={
    "Inputs and outputs": "data out model helpful helpful_fraction helpful_max_new_tokens",
    "Training": "quantize lora_r epochs max_steps lr per_device_train_batch_size max_length seed",
    "Running": "save_steps generation_batch_size force"})
def sft(cfg: SFTConfig, json_output: bool) -> None:
    """Fine-tune the model on its final revisions (loss on the answer only), mixed with helpful answers.

    Writes a standalone model directory (LoRA merged; the adapter kept in OUT/adapter). An interrupted
    run resumes from its last checkpoint when re-run; a finished one is skipped.

    Example: cai sft --data critique.jsonl --out sft-model --helpful data/helpful_prompts.jsonl --max-steps 20
    """
    from cai.stages import sft as stage

    _run_stage(stage.run, cfg, json_output)


feedback_app = typer.Typer(cls=_Group)
app.add_typer(feedback_app, name="feedback")
_JUDGE_PANEL = "judge constitution method principles cot cot_max_new_tokens swap clamp few_shot judge_temperature"


# A group callback: its options are not required on the command line, since `cai feedback eval` has none of
# them; FeedbackConfig names what is missing.
@stage_command(feedback_app, None, FeedbackConfig, panels={
    "Inputs and outputs": "prompts model out", "Judge": _JUDGE_PANEL,
    "Answer sampling": "temperature top_p max_new_tokens",
    "Running": "quantize precision batch_size limit seed force"})
def feedback(cfg: FeedbackConfig, json_output: bool) -> None:
    """Sample two answers per prompt from the policy and label which is less harmful with the judge.

    Writes one preference record per pair (chosen, rejected, soft label p_chosen, P(A) in each order) for `cai pm train` or `cai dpo`; pairs set aside go to OUT.rejected.jsonl. A killed run resumes where it stopped; a finished one is skipped. Check a judge first with `cai feedback eval`.

    Example: cai feedback --prompts data/red_team_prompts.jsonl --model runs/demo/2-sft/model --out prefs.jsonl --limit 16
    """
    from cai.stages import feedback as stage

    _run_stage(stage.run, cfg, json_output)


@stage_command(feedback_app, "eval", FeedbackEvalConfig, required=("pairs",),
               json_help="Print the metrics as JSON instead of tables.", panels={
    "Inputs and outputs": "pairs sanity limit bins out", "Judge": _JUDGE_PANEL,
    "Running": "quantize precision batch_size seed"})
def feedback_eval(cfg: FeedbackEvalConfig, json_output: bool) -> None:
    """Check a judge against labelled pairs: agreement per order and after the swap, consistency, ECE.

    Also judges the built-in sanity pairs (a refusal against a compliant answer to a clearly harmful request, and a helpful answer against a needless refusal), split by kind. Without --method it prints one table per method (mc and contrast), so the better judge for a model is visible at a glance.

    Example: cai feedback eval --pairs data/helpful_prefs_example.jsonl --judge embedded:smollm2-135m-instruct --limit 32
    """
    from cai.stages import feedback as stage

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


pm_app = typer.Typer(help="Train, score and evaluate the hybrid preference model.", no_args_is_help=True, cls=_Group)
app.add_typer(pm_app, name="pm")


@stage_command(pm_app, "train", PMTrainConfig, required=("ai", "out"), panels={
    "Data": "ai out human human_fraction eval_fraction max_length", "Model": "model quantize lora_r",
    "Training": "epochs max_steps lr per_device_train_batch_size seed save_steps eval_batch_size"})
def pm_train(cfg: PMTrainConfig, json_output: bool) -> None:
    """Train a preference model on AI harmlessness labels mixed with human helpfulness labels.

    Soft-label Bradley-Terry loss; LoRA by default, QLoRA with --quantize 4bit, full with --lora-r 0.

    Writes OUT/model and reports held-out accuracy on AI and human pairs. A re-run resumes.

    Example: cai pm train --ai prefs.jsonl --human data/helpful_prefs_example.jsonl --out runs/pm
    """
    from cai.stages.pm import run_train

    _run_stage(run_train, cfg, json_output)


@stage_command(pm_app, "score", PMScoreConfig, required=("model",), json_help=None)
def pm_score(cfg: PMScoreConfig) -> None:
    """Print the preference model's reward for a response (or add `reward` to each record of a JSONL).

    Example: cai pm score --model runs/pm --prompt "How do I pick a lock?" --response "I can't help with that."
    """
    from cai.stages.pm import run_score

    with RichReporter() as reporter:
        scored = run_score(cfg, _context(reporter=reporter))
    if cfg.input is None:
        print(f"{scored[0]['reward']:.4f}")
    elif cfg.out:
        print(cfg.out)
    else:
        for record in scored:
            print(json.dumps(record, ensure_ascii=False))


@stage_command(pm_app, "eval", PMEvalConfig, required=("model", "pairs"), json_help="Print the metrics as one JSON object.")
def pm_eval(cfg: PMEvalConfig, json_output: bool) -> None:
    """Measure a preference model on labelled pairs: accuracy, mean margin, calibration (ECE), length bias.

    With --out, also writes metrics.json, scores.jsonl, calibration.png and length_bias.png there.

    Example: cai pm eval --model runs/pm --pairs data/helpful_prefs_example.jsonl --out runs/pm/eval
    """
    from cai.stages.pm import format_metrics, run_eval

    started = time.time()
    with RichReporter() as reporter:
        result = run_eval(cfg, _context(reporter=reporter))
    print(json.dumps(result.metrics) if json_output else format_metrics(result.metrics))
    for name, path in result.outputs.items():
        stderr.print(f"{name}: {path}", highlight=False)
    stderr.print(f"pm eval: {result.summary} [{time.time() - started:.0f} s]", highlight=False)


@stage_command(app, "rl", RLConfig, required=("prompts", "out"), panels={
    "Rewards and monitors": "reward length_target code_timeout code_memory_mb unsafe_run_code judge constitution "
                            "judge_every",
    "Training": "num_generations prompts_per_step max_steps lr max_new_tokens temperature quantize lora_r "
                "save_steps pm_batch_size"})
def rl(cfg: RLConfig, json_output: bool) -> None:
    """Optimise a policy against the preference model (GRPO or RLOO) with a KL penalty and optional verifiable rewards.

    Example: cai rl --model runs/x/2-sft/model --pm runs/x/4-pm/model --prompts data/red_team_prompts.jsonl
    --prompts data/helpful_prompts.jsonl --out runs/x/5-rl --max-steps 20
    """
    from cai.stages.rl import run

    _run_stage(run, cfg, json_output)


@stage_command(app, "dpo", DPOConfig, required=("ai", "out"), panels={
    "Preference data": "ai human human_fraction eval_fraction soft_labels",
    "Model and output": "out model quantize lora_r",
    "Training": "beta loss_type epochs lr max_steps max_length per_device_train_batch_size save_steps seed"})
def dpo(cfg: DPOConfig, json_output: bool) -> None:
    """Train the policy with DPO on mixed human/AI preferences: the offline alternative to pm + rl.

    The pairs are mixed and held out exactly as `cai pm train` does; the reference model is the starting
    policy (with LoRA: the adapter disabled, no second copy). A re-run resumes from the last checkpoint;
    a finished run is skipped.

    Example: cai dpo --model runs/demo/2-sft/model --ai runs/demo/3-feedback/prefs.jsonl
    --human data/helpful_prefs_example.jsonl --soft-labels --out dpo-model
    """
    from cai.stages import dpo as stage

    _run_stage(stage.run, cfg, json_output)


@stage_command(app, "filter", FilterConfig, required=("prompts", "out"))
def filter_command(cfg: FilterConfig, json_output: bool) -> None:
    """Keep the verifiable prompts the policy solves sometimes and fails sometimes, for RL.

    Example: cai filter --prompts data/maths_train.jsonl --model embedded:smollm2-135m-instruct
    --k 4 --samples 8 --out runs/x/5-filter
    """
    from cai.stages.filter import run

    _run_stage(run, cfg, json_output)


@stage_command(app, "eval", EvalConfig, required=("models", "harmful", "benign", "out"),
               json_help="Print the result as one JSON document.", panels={
    "Judge": "judge judge_method constitution principles head_to_head", "pass@k": "verifiable k samples temperature",
    "Speed": "precision batch_size"})
def eval_command(cfg: EvalConfig, json_output: bool) -> None:
    """Measure harmlessness, over-refusal, PM score, head-to-head Elo and pass@k of one or more models.

    Example: cai eval -m base=embedded:smollm2-135m-instruct -m rl=runs/demo/5-rl/model
    --harmful data/eval_harmful.jsonl --benign data/eval_benign.jsonl --out eval/
    --benchmark harmbench_behaviors_text_test.csv --benchmark benign:xstest_prompts.csv

    Maths only: cai eval -m base=embedded:smollm2-135m-instruct -m rl=runs/rlvr/5-rl/model
    --harmful none --benign none --judge none --verifiable data/maths_heldout.jsonl --k 4 --samples 8 --out eval/
    """
    from cai.stages.evaluate import run

    _run_stage(run, cfg, json_output)


def _stage_list() -> str:
    from cai.recipe import stage_names

    return ", ".join(stage_names())


@app.command("run", cls=_Command)
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
