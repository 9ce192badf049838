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
from rich.text import Text

from cai import __version__
from cai.errors import CaiError

app = typer.Typer(name="cai", help="Constitutional AI on your own model and constitution.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
models_app = typer.Typer(help="Resolve, convert and cache models.", no_args_is_help=True)
constitution_app = typer.Typer(help="Write, check and inspect constitutions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(constitution_app, name="constitution")

stderr = Console(stderr=True, soft_wrap=True)  # soft_wrap: never break a file:line message
_state = {"debug": False}


# ----------------------------------------------------------------------------- progress


class _Throughput(ProgressColumn):
    """items/s and, when the task reports them, tokens/s."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        text = f"{task.completed / elapsed:.2f} {task.fields.get('unit', 'items')}/s"
        tokens = task.fields.get("tokens", 0)
        if tokens:
            text += f"  {tokens / elapsed:.0f} tok/s"
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
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), _Throughput(), console=stderr, transient=False)

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def task(self, description: str, total: int | None, unit: str = "items") -> _RichTask:
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
    from cai.models import EMBEDDED_PREFIX, _is_complete, embedded_names
    from cai.paths import cai_home

    for name in embedded_names():
        directory = cai_home() / "models" / name
        state = str(directory) if _is_complete(directory) else "(not prepared yet: cai models prepare)"
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
    print(f"{loaded.path}: ok ({len(loaded.critique_principles)} critique principles, "
          f"{len(loaded.judge_principles)} judge principles, {len(loaded.critique_examples)} critique examples, "
          f"{len(loaded.judge_examples)} judge examples)")


EXAMPLE_REQUEST = "How can I get into my coworker's email account without them knowing?"


@constitution_app.command("show")
def constitution_show(
    path: Annotated[str, typer.Argument(help="Constitution file, or a bundled name.")] = "default",
    seed: Annotated[int, typer.Option(help="Seed for drawing principles, as the stages use it.")] = 0,
    prompt: Annotated[str, typer.Option(help="The request to render the prompts for.")] = EXAMPLE_REQUEST,
    item_id: Annotated[str, typer.Option("--id", help="Record id the principles are drawn for.")] = "example",
    rounds: Annotated[int, typer.Option(help="Critique/revision rounds to show.")] = 1,
    principles: Annotated[int, typer.Option(help="Judge principles to show (feedback --principles).")] = 1,
    no_few_shot: Annotated[bool, typer.Option("--no-few-shot", help="Leave the few-shot examples out.")] = False,
) -> None:
    """Print the exact critique, revision and judge prompts the stages send, before spending GPU hours.

    Placeholders stand for what the model writes: <ANSWER>, <CRITIQUE>, <RESPONSE A/B>.

    Example: cai constitution show constitutions/default.yaml --seed 1 --rounds 2
    """
    from cai import constitution as c

    loaded = c.load(path)
    few_shot = not no_few_shot
    sections = []
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



# ----------------------------------------------------------------------------- stage 2: feedback, feedback eval (issue 4)

from cai.stages.base import help_of  # noqa: E402  (stage config modules are light: no torch)
from cai.stages.feedback import FeedbackConfig, FeedbackEvalConfig  # noqa: E402

feedback_app = typer.Typer(no_args_is_help=False)
app.add_typer(feedback_app, name="feedback")
_IO, _JUDGE, _SAMPLING, _RUN = "Inputs and outputs", "Judge", "Answer sampling", "Run"


def _fb(name: str) -> str:
    return help_of(FeedbackConfig, name)


def _fe(name: str) -> str:
    return help_of(FeedbackEvalConfig, name)


@feedback_app.callback(invoke_without_command=True)
def feedback(
    ctx: typer.Context,
    prompts: Annotated[str | None, typer.Option(help=_fb("prompts"), rich_help_panel=_IO)] = None,
    policy: Annotated[str | None, typer.Option(help=_fb("policy"), rich_help_panel=_IO)] = None,
    out: Annotated[str | None, typer.Option(help=_fb("out"), rich_help_panel=_IO)] = None,
    judge: Annotated[str | None, typer.Option(help=_fb("judge"), rich_help_panel=_JUDGE)] = None,
    constitution: Annotated[str, typer.Option(help=_fb("constitution"), rich_help_panel=_JUDGE)] = "default",
    method: Annotated[str, typer.Option(help=_fb("method"), rich_help_panel=_JUDGE)] = "auto",
    principles: Annotated[int, typer.Option(help=_fb("principles"), rich_help_panel=_JUDGE)] = 1,
    cot: Annotated[bool, typer.Option("--cot", help=_fb("cot"), rich_help_panel=_JUDGE)] = False,
    cot_max_new_tokens: Annotated[int, typer.Option(help=_fb("cot_max_new_tokens"), rich_help_panel=_JUDGE)] = 128,
    swap: Annotated[bool, typer.Option("--swap/--no-swap", help=_fb("swap"), rich_help_panel=_JUDGE)] = True,
    clamp: Annotated[str, typer.Option(metavar="LO,HI", help=_fb("clamp"), rich_help_panel=_JUDGE)] = "0.4,0.6",
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help=_fb("few_shot"),
                                           rich_help_panel=_JUDGE)] = True,
    judge_temperature: Annotated[float, typer.Option(help=_fb("judge_temperature"), rich_help_panel=_JUDGE)] = 1.0,
    samples_temperature: Annotated[float, typer.Option(help=_fb("samples_temperature"),
                                                       rich_help_panel=_SAMPLING)] = 1.0,
    samples_top_p: Annotated[float, typer.Option(help=_fb("samples_top_p"), rich_help_panel=_SAMPLING)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help=_fb("max_new_tokens"), rich_help_panel=_SAMPLING)] = 256,
    quantize: Annotated[str | None, typer.Option(help=_fb("quantize"), rich_help_panel=_RUN)] = None,
    batch_size: Annotated[int, typer.Option(help=_fb("batch_size"), rich_help_panel=_RUN)] = 16,
    limit: Annotated[int | None, typer.Option(help=_fb("limit"), rich_help_panel=_RUN)] = None,
    seed: Annotated[int, typer.Option(help=_fb("seed"), rich_help_panel=_RUN)] = 0,
    force: Annotated[bool, typer.Option("--force", help=_fb("force"), rich_help_panel=_RUN)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON result instead of paths.",
                                              rich_help_panel=_RUN)] = False,
) -> None:
    """Sample two answers per prompt from the policy and label which is less harmful with the judge.

    Writes one preference record per pair (chosen, rejected, soft label p_chosen, P(A) in each order) for `cai pm train` or `cai dpo`; pairs set aside go to OUT.rejected.jsonl. A killed run resumes where it stopped; a finished one is skipped. Check a judge first with `cai feedback eval`.

    Example: cai feedback --prompts data/red_team_prompts.jsonl --policy runs/demo/2-sft/model --out prefs.jsonl --limit 16
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [flag for flag, value in (("--prompts", prompts), ("--policy", policy), ("--out", out)) if not value]
    if missing:
        raise typer.BadParameter(f"missing {', '.join(missing)} (see `cai feedback --help`; to check a judge "
                                 "instead, run `cai feedback eval --pairs FILE`)")
    from cai.stages import feedback as stage

    cfg = FeedbackConfig(prompts=prompts, policy=policy, out=out, judge=judge, constitution=constitution,
                         method=method, principles=principles, cot=cot, cot_max_new_tokens=cot_max_new_tokens,
                         swap=swap, clamp=clamp, few_shot=few_shot, judge_temperature=judge_temperature,
                         samples_temperature=samples_temperature, samples_top_p=samples_top_p,
                         max_new_tokens=max_new_tokens, quantize=quantize,
                         batch_size=batch_size, limit=limit, seed=seed, force=force)
    _run_stage(stage.run, cfg, json_output)


@feedback_app.command("eval")
def feedback_eval(
    pairs: Annotated[str, typer.Option(help=_fe("pairs"), rich_help_panel=_IO)],
    judge: Annotated[str, typer.Option(help=_fe("judge"), rich_help_panel=_JUDGE)] = "embedded:smollm2-135m-instruct",
    method: Annotated[str | None, typer.Option(help=_fe("method"), rich_help_panel=_JUDGE)] = None,
    constitution: Annotated[str, typer.Option(help=_fe("constitution"), rich_help_panel=_JUDGE)] = "default",
    principles: Annotated[int, typer.Option(help=_fe("principles"), rich_help_panel=_JUDGE)] = 1,
    swap: Annotated[bool, typer.Option("--swap/--no-swap", help=_fe("swap"), rich_help_panel=_JUDGE)] = True,
    cot: Annotated[bool, typer.Option("--cot", help=_fe("cot"), rich_help_panel=_JUDGE)] = False,
    cot_max_new_tokens: Annotated[int, typer.Option(help=_fe("cot_max_new_tokens"), rich_help_panel=_JUDGE)] = 128,
    clamp: Annotated[str, typer.Option(metavar="LO,HI", help=_fe("clamp"), rich_help_panel=_JUDGE)] = "0.4,0.6",
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help=_fe("few_shot"),
                                           rich_help_panel=_JUDGE)] = True,
    judge_temperature: Annotated[float, typer.Option(help=_fe("judge_temperature"), rich_help_panel=_JUDGE)] = 1.0,
    sanity: Annotated[bool, typer.Option("--sanity/--no-sanity", help=_fe("sanity"), rich_help_panel=_IO)] = True,
    limit: Annotated[int | None, typer.Option(help=_fe("limit"), rich_help_panel=_IO)] = None,
    bins: Annotated[int, typer.Option(help=_fe("bins"), rich_help_panel=_IO)] = 10,
    out: Annotated[str | None, typer.Option(help=_fe("out"), rich_help_panel=_IO)] = None,
    quantize: Annotated[str | None, typer.Option(help=_fe("quantize"), rich_help_panel=_RUN)] = None,
    batch_size: Annotated[int, typer.Option(help=_fe("batch_size"), rich_help_panel=_RUN)] = 16,
    seed: Annotated[int, typer.Option(help=_fe("seed"), rich_help_panel=_RUN)] = 0,
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
                             bins=bins, out=out, quantize=quantize, batch_size=batch_size, seed=seed)
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



# ----------------------------------------------------------------------------- stage 4: rl (issue 6)



# ----------------------------------------------------------------------------- offline path: dpo (issue 8)



# ----------------------------------------------------------------------------- pipeline: run, eval (issue 7)



# ----------------------------------------------------------------------------- entry point


def main() -> None:
    """Console entry point: run the app, turning `CaiError` into one line on stderr and exit code 1."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except CaiError as exc:
        if debug:
            raise
        stderr.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        stderr.print("aborted; finished records are kept -- run the same command again to resume")
        sys.exit(130)
    except KeyboardInterrupt:
        stderr.print("interrupted; finished records are kept -- run the same command again to resume")
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
