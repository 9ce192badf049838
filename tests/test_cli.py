import dataclasses
import importlib
import pkgutil
import re

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import cai.stages
from cai.cli import app
from cai.stages.critique import CritiqueConfig
from cai.stages.dpo import DPOConfig
from cai.stages.evaluate import EvalConfig
from cai.stages.feedback import FeedbackConfig, FeedbackEvalConfig
from cai.stages.filter import FilterConfig
from cai.stages.pm import PMEvalConfig, PMScoreConfig, PMTrainConfig
from cai.stages.rl import RLConfig
from cai.stages.sft import SFTConfig

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("cai ")


def test_models_prepare_prints_a_loadable_directory():
    result = runner.invoke(app, ["models", "prepare", "embedded:tiny-random"])
    assert result.exit_code == 0
    AutoModelForCausalLM.from_pretrained(result.stdout.strip())


def test_user_errors_are_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cai", "models", "prepare", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: model ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, where):
    """`cai models prepare X --debug`, as people retry a failed command, was 'No such option: --debug'."""
    import subprocess
    import sys

    command = ["models", "prepare", str(tmp_path / "missing")]
    command = ["--debug", *command] if where == "before" else [*command, "--debug"]
    result = subprocess.run([sys.executable, "-m", "cai", *command], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ModelError" in result.stderr


@pytest.mark.parametrize("option", ["--rounds", "--principles"])
def test_constitution_show_refuses_a_negative_count(option):
    result = runner.invoke(app, ["constitution", "show", "short", option, "-1"])
    assert result.exit_code == 2 and "===" not in result.stdout


def test_constitution_show_starts_with_the_initial_answer_request_and_its_system_prompt():
    result = runner.invoke(app, ["constitution", "show", "medical", "--prompt", "Is ibuprofen safe?"])
    first = result.stdout.split("=====")[2]  # the section after the first title
    assert result.stdout.startswith("===== initial answer =====")
    assert first.index("[system]\nYou are a health-information assistant") < first.index("[user]\nIs ibuprofen safe?")


def test_constitution_validate_counts_what_it_found_in_words_that_agree():
    result = runner.invoke(app, ["constitution", "validate", "short"])
    assert result.exit_code == 0
    assert "4 critique principles, 4 judge principles, 1 critique example, 1 judge example" in result.stdout


def test_a_stage_that_fails_before_its_first_bar_prints_just_the_error(tmp_path):
    """No blank line from a progress display that never drew (rich prints one off a terminal)."""
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n{broken\n')
    result = subprocess.run([sys.executable, "-m", "cai", "feedback", "--prompts", str(prompts), "--model",
                             "embedded:tiny-random", "--out", str(tmp_path / "f.jsonl")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {prompts}:2: not valid JSON"), result.stderr


def test_usage_errors_print_clicks_message_without_traceback():
    """typer 0.2x raises its own copy of click's exceptions, which are not click.ClickException: a
    misspelled option must still come out as click's two-line message, exit code 2."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cai", "critique", "--prompts", "p.jsonl", "--revisons", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "No such option: --revisons" in result.stderr and "--revisions" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_says_finished_records_are_kept(monkeypatch, capsys):
    import sys

    import pytest

    import cai.cli
    import cai.models

    def interrupted(reference):
        raise KeyboardInterrupt

    monkeypatch.setattr(cai.models, "resolve", interrupted)
    monkeypatch.setattr(sys, "argv", ["cai", "models", "prepare", "embedded:tiny-random"])
    with pytest.raises(SystemExit) as exited:
        cai.cli.main()
    assert exited.value.code == 130
    assert "finished records are kept" in capsys.readouterr().err


def test_an_invalid_constitution_exits_non_zero_from_the_console_command(tmp_path):
    """Through `cai` itself, not the test runner: a script or CI step must see the failure in the exit code."""
    import subprocess
    import sys

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ncritique_principles:\n  - id: a\n    critique: hi\n")
    result = subprocess.run([sys.executable, "-m", "cai", "constitution", "validate", str(broken)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{broken}:3: critique_principles[1] is missing `revision`" in result.stderr


def test_every_stage_config_field_has_help():
    """Field help is the only documentation of an option: none may be missing."""
    for module_info in pkgutil.iter_modules(cai.stages.__path__):
        module = importlib.import_module(f"cai.stages.{module_info.name}")
        for name, value in vars(module).items():
            if name.endswith("Config") and dataclasses.is_dataclass(value) and value.__module__ == module.__name__:
                for field in dataclasses.fields(value):
                    assert field.metadata.get("help"), f"{name}.{field.name} has no help text"


def test_importing_the_cli_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, cai.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


COMMAND_CONFIGS = {("critique",): CritiqueConfig, ("sft",): SFTConfig, ("feedback",): FeedbackConfig,
                   ("feedback", "eval"): FeedbackEvalConfig, ("pm", "train"): PMTrainConfig,
                   ("pm", "score"): PMScoreConfig, ("pm", "eval"): PMEvalConfig, ("rl",): RLConfig,
                   ("dpo",): DPOConfig, ("eval",): EvalConfig, ("filter",): FilterConfig}


def _command(*path):
    import typer.main

    command = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    return command


def test_every_config_field_is_an_option_with_its_flag_help_and_default():
    """What a user can set on the command line is exactly what a recipe can: one option per config field,
    under the flag config errors name, with the field's help, showing the default the stage really uses."""
    from cai.stages.base import option_flag

    for path in COMMAND_CONFIGS:
        config = COMMAND_CONFIGS[path]
        params = {param.name: param for param in _command(*path).params}
        for field in dataclasses.fields(config):
            param = params.get(field.name)
            assert param is not None, f"cai {' '.join(path)}: no option for {config.__name__}.{field.name}"
            assert f"--{option_flag(field)}" in param.opts and param.help == field.metadata["help"]
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            if param.required or default in ("", None, []):
                continue
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            assert param.default == shown, (path, field.name, param.default, default)
        assert set(params) - {f.name for f in dataclasses.fields(config)} <= {"json_output", "ctx", "help"}


def _parsed(monkeypatch, args):
    """The config a command line builds, without running the stage."""
    import cai.cli

    seen = []
    monkeypatch.setattr(cai.cli, "_run_stage", lambda run, cfg, json_output=False: seen.append(cfg))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_options_reach_the_config_and_left_out_ones_keep_its_defaults(monkeypatch, tmp_path):
    out = str(tmp_path / "f.jsonl")
    cfg = _parsed(monkeypatch, ["feedback", "--prompts", "p.jsonl", "--out", out, "--cot", "--clamp", "0.3,0.7",
                                "--no-swap", "--method", "mc", "--limit", "5"])
    assert (cfg.cot, cfg.clamp, cfg.swap, cfg.method, cfg.limit) == (True, (0.3, 0.7), False, "mc", 5)
    assert (cfg.few_shot, cfg.principles, cfg.judge) == (True, 1, None)
    rl = _parsed(monkeypatch, ["rl", "--prompts", "a.jsonl", "--prompts", "b.jsonl", "--out", str(tmp_path / "rl"),
                               "--reward", "math:1", "--reward", "length:0.5"])
    assert rl.prompts == ["a.jsonl", "b.jsonl"] and rl.weights == {"math": 1.0, "length": 0.5} and rl.pm is None
    assert _parsed(monkeypatch, ["rl", "--prompts", "a.jsonl", "--out", str(tmp_path / "rl"), "--pm", "pm-dir"]
                   ).reward == ["pm:1"]
    evaluation = _parsed(monkeypatch, ["eval", "-m", "a=x", "--model", "b=y", "--harmful", "h", "--benign", "b",
                                       "--out", str(tmp_path / "e"), "--no-head-to-head"])
    assert evaluation.models == ["a=x", "b=y"] and evaluation.head_to_head is False


@pytest.mark.parametrize("args, choices", [
    (["rl", "--prompts", "p.jsonl", "--out", "rl", "--algo", "ppo"], "'grpo', 'rloo'"),
    (["sft", "--data", "d.jsonl", "--out", "s", "--quantize", "8bit"], "'none', '4bit'"),
    (["feedback", "eval", "--pairs", "p.jsonl", "--method", "vote"], "'auto', 'mc', 'contrast'"),
])
def test_a_choice_option_rejects_a_bad_value_naming_the_choices(args, choices):
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "Invalid value for" in result.output and choices in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["rl", "--policy", "m", "--prompts", "p.jsonl", "--out", "rl"], "--policy is renamed to --model"),
    (["feedback", "--samples-temperature", "0.7"], "--samples-temperature is renamed to --temperature"),
    (["pm", "train", "--batch-size", "4"], "--batch-size is renamed to --per-device-train-batch-size"),
])
def test_an_option_under_its_old_name_names_the_new_one(args, message):
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and message in result.output, result.output


def test_help_lists_the_commands_in_pipeline_order():
    listed = re.findall(r"^│ (\w+) ", _help(), re.MULTILINE)
    assert listed == ["models", "constitution", "critique", "sft", "feedback", "pm", "filter", "rl", "dpo", "eval", "run"]


def test_progress_line_keeps_counts_and_throughput_on_one_line_at_80_columns(monkeypatch):
    import io

    from rich.console import Console

    from cai import cli

    console = Console(file=io.StringIO(), width=80, soft_wrap=True)
    monkeypatch.setattr(cli, "stderr", console)
    now = [0.0]
    with cli.RichReporter() as reporter:
        reporter.progress.get_time = lambda: now[0]
        task = reporter.task("mc: sanity: harmful-request judge_sanity_pairs.jsonl", total=24, unit="comparisons")
        now[0] = 2.0
        task.advance(24, tokens=29_341)
    [line] = [text for text in console.file.getvalue().splitlines() if text.strip()]
    assert line.startswith("mc: sanity: harmful-request") and "…" in line  # the description gave way
    assert "24/24" in line and "comparisons/s" in line and "tok/s" in line


def test_rates_keep_three_figures():
    from cai.cli import _rate

    assert [_rate(v) for v in (0.4834, 8.491, 97.83, 1234.4, 29_341, 293_410, 1_254_600)] == \
        ["0.48", "8.49", "97.8", "1234", "29.3k", "293k", "1.25M"]


def test_path_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """A directory for --prompts, an --out that is not .jsonl (it was made a directory, after generating),
    and an --out where nothing can be written."""
    import sys

    import pytest

    import cai.cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so nothing can be written under it")
    cases = [(["--prompts", str(tmp_path), "--out", str(tmp_path / "c.jsonl")], "is a directory"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "c.txt")], "name the output file NAME.jsonl"),
             (["--prompts", str(prompts), "--out", str(blocked / "c.jsonl")], "check the path, its permissions")]
    for options, message in cases:
        monkeypatch.setattr(sys, "argv", ["cai", "critique", "-m", "embedded:tiny-random", "--limit", "1",
                                          "--max-new-tokens", "2", *options])
        with pytest.raises(SystemExit) as exited:
            cai.cli.main()
        err = capsys.readouterr().err
        assert exited.value.code == 1 and err.startswith("error: ") and message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "c.txt").exists()


def _every_command_path(command=None, path=()):
    """(), ("critique",), ("feedback", "eval"), ...: every command and group of `cai`."""
    import typer.main

    command = command or typer.main.get_command(app)
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _every_command_path(sub, (*path, name))


def _help(*path: str) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_flags_show_no_type_in_help():
    """typer 0.29 printed `--force <bool>`, `--help <bool>`: as if a flag took a value. Options that do take
    one keep their type."""
    paths = list(_every_command_path())
    assert len(paths) > 10
    for path in paths:
        assert "<bool>" not in _help(*path), f"cai {' '.join(path)} --help"
    critique = _help("critique")
    assert "<int>" in critique
    assert re.search(r"--force +Discard", critique)


def test_help_carries_no_measurement_notes():
    """Figures measured on one machine belong in the docs and bench/, not in the option help."""
    for path in _every_command_path():
        assert not re.search(r"\b[Mm]easured\b|SmolLM2-135M", _help(*path)), f"cai {' '.join(path)} --help"


def test_rl_names_its_file_options_types_as_the_other_stages_do():
    """`cai rl --help` showed `<list[Path]>` and `<path>` where every other stage shows `<str>`."""
    rl = _help("rl")
    assert "<path>" not in rl and "Path]" not in rl
    assert re.search(r"--out +<str> ", rl) and re.search(r"--out +<str> ", _help("dpo"))
    assert re.search(r"--prompts +<list\[str\]> ", rl)


def _help_of(config, name):
    return next(f.metadata["help"] for f in dataclasses.fields(config) if f.name == name)


def _stage_config_fields():
    for module_info in pkgutil.iter_modules(cai.stages.__path__):
        module = importlib.import_module(f"cai.stages.{module_info.name}")
        for name, value in vars(module).items():
            if name.endswith("Config") and dataclasses.is_dataclass(value) and value.__module__ == module.__name__:
                for field in dataclasses.fields(value):
                    yield f"{name}.{field.name}", field.metadata["help"]


# The options that take a literal `none` (as a word for "no judge", "no PM", "full precision").
TAKES_NONE = {"EvalConfig.judge", "EvalConfig.pm", "RLConfig.pm", "RLConfig.judge", "SFTConfig.quantize",
              "FeedbackConfig.quantize", "FeedbackEvalConfig.quantize", "PMTrainConfig.quantize",
              "RLConfig.quantize", "DPOConfig.quantize", "EvalConfig.quantize", "EvalConfig.harmful",
              "EvalConfig.benign", "EvalConfig.verifiable"}


def test_option_help_says_what_leaving_it_out_does_never_to_type_none():
    """"None = all" read as a value to type: `--revision-prefix None` made every revision start with "None",
    `--helpful none` looked for a file called none. Help says what leaving the option out does, and names
    `none` only for the options that take that word."""
    offenders = [name for name, text in _stage_config_fields()
                 if re.search(r"\bNone\b", text) or (re.search(r"\bnone\b", text) and name not in TAKES_NONE)]
    assert not offenders, offenders
    assert "Left out: the model writes the whole revision." in _help_of(CritiqueConfig, "revision_prefix")
    assert "Left out: train on the revisions alone." in _help_of(SFTConfig, "helpful")


def test_the_options_whose_help_offers_none_take_it(tmp_path):
    assert EvalConfig(models=["embedded:tiny-random"], harmful="h.jsonl", benign="b.jsonl", out=str(tmp_path / "e"),
                      judge="none", pm="none", quantize="none").pm is None
    assert RLConfig(prompts=["p.jsonl"], out=str(tmp_path / "rl"), pm="none", reward=["length:1"],
                    quantize="none").pm is None
    assert SFTConfig(data="d.jsonl", out=str(tmp_path / "sft"), quantize="none").quantize is None


def test_quantize_help_does_not_claim_cuda_only():
    """`--quantize 4bit` runs on CPU too (bitsandbytes; tests/test_models.py loads a 4-bit model there), so
    no command's help may call it CUDA only."""
    quantize = {name: text for name, text in _stage_config_fields() if name.endswith(".quantize")}
    assert len(quantize) >= 7
    for name, text in quantize.items():
        assert "4bit" in text and "CUDA" not in text, (name, text)


@pytest.mark.parametrize("make, message", [
    (lambda: SFTConfig(helpful_fraction=1.0), "--helpful-fraction 1.0: must be in [0, 1)"),
    (lambda: SFTConfig(quantize="4bit", lora_r=0), "--quantize 4bit with --lora-r 0: "),
    (lambda: CritiqueConfig(prompts="p.jsonl", out="c.jsonl", top_p=0.0), "--top-p 0.0: must be in (0, 1]"),
    (lambda: CritiqueConfig(prompts="p.jsonl", out="c.txt"), "--out 'c.txt': critique writes JSON Lines"),
    (lambda: FeedbackEvalConfig(pairs="p.jsonl", cot=True, method="contrast"),
     "--cot needs the multiple-choice judge, but --method is contrast -- drop --cot or use --method mc"),
    (lambda: FeedbackConfig(prompts="p.jsonl", out="f.jsonl", clamp="0.3,0.7"),
     "--clamp 0.3,0.7 bounds chain-of-thought probabilities only, and --cot is not given -- add --cot"),
    (lambda: FeedbackConfig(prompts="p.jsonl", out="f.jsonl", top_p=2.0), "--top-p 2.0 must be"),
    (lambda: DPOConfig(soft_labels=True, loss_type="robust"), "--soft-labels with --loss-type robust: "),
    (lambda: DPOConfig(eval_fraction=0.9), "--eval-fraction 0.9 -- use a share in [0, 0.5]"),
])
def test_config_errors_name_the_flag_as_the_cli_spells_it(make, message):
    """"helpful_fraction=1.0", "cot=True ... method='contrast'" named Python fields, not the flags the user
    typed; flag wording is also how a recipe error finds the line that set the value (cai/recipe.py)."""
    from cai.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        make()
    assert str(raised.value).startswith(message), str(raised.value)
    assert not re.search(r"\b[a-z]+(_[a-z]+)*=", str(raised.value)), str(raised.value)
