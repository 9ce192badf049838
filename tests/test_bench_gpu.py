"""bench/gpu.py's dry mode, which CI runs: the configs it would measure are built and its arguments checked."""

import importlib.util
import json
from pathlib import Path

import pytest


def _gpu_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_builds_a_7b_shaped_model_config(capsys):
    _gpu_bench().main(["--dry-run", "--json", "--tokenizer", "embedded:tiny-random", "--prompts", "8"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True and plan["prompts"] == 8
    # 32 layers of 4096 x (4 x 4096 + 3 x 11008) weights: 6.5B, plus the (small) vocabulary's two matrices
    assert 6.4 < plan["parameters_b"] < 7.5
    assert plan["shape"]["num_hidden_layers"] == 32


@pytest.mark.parametrize("argv, named", [(["--train-steps", "0"], "--train-steps"),
                                         (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
                                         (["--max-new-tokens", "-4"], "--max-new-tokens")])
def test_bad_arguments_stop_with_the_flag_named(argv, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        _gpu_bench().parse(argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
