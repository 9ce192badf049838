import dataclasses
import importlib
import pkgutil

from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import cai.stages
from cai.cli import app

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


def test_every_stage_config_field_has_help():
    """Field help is the only documentation of an option (STYLE.md 2): none may be missing."""
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
