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



# ----------------------------------------------------------------------------- stage 3: pm train, pm score, pm eval (issue 5)



# ----------------------------------------------------------------------------- stage 4: rl (issue 6)



# ----------------------------------------------------------------------------- offline path: dpo (issue 8)



# ----------------------------------------------------------------------------- pipeline: run, eval (issue 7)


def _eval_help(name: str) -> str:
    from cai.stages.base import help_of
    from cai.stages.evaluate import EvalConfig

    return help_of(EvalConfig, name)


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help=_eval_help("models"))],
    harmful: Annotated[str, typer.Option(help=_eval_help("harmful"))],
    benign: Annotated[str, typer.Option(help=_eval_help("benign"))],
    out: Annotated[str, typer.Option(help=_eval_help("out"))],
    judge: Annotated[str, typer.Option(help=_eval_help("judge"), rich_help_panel="Judge")]
    = "embedded:smollm2-135m-instruct",
    judge_method: Annotated[str, typer.Option(help=_eval_help("judge_method"), rich_help_panel="Judge")] = "auto",
    constitution: Annotated[str, typer.Option(help=_eval_help("constitution"), rich_help_panel="Judge")] = "default",
    principles: Annotated[int, typer.Option(help=_eval_help("principles"), rich_help_panel="Judge")] = 1,
    head_to_head: Annotated[bool, typer.Option("--head-to-head/--no-head-to-head", help=_eval_help("head_to_head"),
                                               rich_help_panel="Judge")] = True,
    pm: Annotated[str | None, typer.Option(help=_eval_help("pm"))] = None,
    limit: Annotated[int | None, typer.Option(help=_eval_help("limit"))] = None,
    max_new_tokens: Annotated[int, typer.Option(help=_eval_help("max_new_tokens"))] = 128,
    quantize: Annotated[str | None, typer.Option(help=_eval_help("quantize"))] = None,
    seed: Annotated[int, typer.Option(help=_eval_help("seed"))] = 0,
    batch_size: Annotated[int, typer.Option(help=_eval_help("batch_size"), rich_help_panel="Speed")] = 16,
    examples: Annotated[int, typer.Option(help=_eval_help("examples"))] = 6,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Measure harmlessness, over-refusal, PM score and head-to-head Elo of one or more models.

    Example: cai eval -m base=embedded:smollm2-135m-instruct -m rl=runs/demo/5-rl/model
    --harmful data/eval_harmful.jsonl --benign data/eval_benign.jsonl --out eval/
    """
    from cai.stages.evaluate import EvalConfig, run

    cfg = EvalConfig(models=model, harmful=harmful, benign=benign, out=out, judge=judge, judge_method=judge_method,
                     constitution=constitution, principles=principles, head_to_head=head_to_head, pm=pm,
                     limit=limit, max_new_tokens=max_new_tokens, quantize=quantize, seed=seed,
                     batch_size=batch_size, examples=examples)
    _run_stage(run, cfg, json_output)


def _stage_list() -> str:
    from cai.recipe import stage_names

    return ", ".join(stage_names())


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/: smoke, demo, qlora-1gpu, multi-gpu).")],
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
