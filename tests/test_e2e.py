"""End to end: `cai run recipes/smoke.yaml` (tiny random model, every stage) into a temporary runs dir.

One full run is shared by the tests in this module; the others re-run it (skips), change an option
(re-runs that stage and later ones only) and kill a run in the middle of a stage (resumes, no duplicates).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cai import recipe as recipes
from cai.cli import app
from cai.records import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
STAGES = [s for s in recipes.STAGES if s.name in yaml.safe_load(SMOKE.read_text())["stages"]]

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(s.module) is None for s in STAGES),
                                reason="a stage module is not merged yet")


def cai(*args, runs_dir: Path):
    """`cai run` in this process (no second torch import); returns (exit code, parsed --json output)."""
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--runs-dir", str(runs_dir), "--json", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1]), result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    started = time.time()
    data, result = cai(runs_dir=runs_dir)
    return {"runs_dir": runs_dir, "run_dir": runs_dir / "smoke", "data": data, "seconds": time.time() - started,
            "stderr": result.stderr}


def test_every_stage_writes_its_outputs(smoke):
    run_dir = smoke["run_dir"]
    assert [s["stage"] for s in smoke["data"]["stages"]] == [s.name for s in STAGES]
    assert not any(s["skipped"] for s in smoke["data"]["stages"])
    for spec in STAGES:
        manifest = json.loads((run_dir / spec.directory / "manifest.json").read_text())
        assert manifest["status"] == "complete", spec.name
    critique = [r for _, r in read_jsonl(run_dir / "1-critique" / "records.jsonl")]
    assert critique and all(r["final"] for r in critique)
    prefs = [r for _, r in read_jsonl(run_dir / "3-feedback" / "prefs.jsonl")]
    assert prefs and all(0.0 <= r["p_chosen"] <= 1.0 for r in prefs)
    for model_dir in ("2-sft/model", "4-pm/model", "5-rl/model"):
        assert (run_dir / model_dir / "config.json").exists(), model_dir
    metrics = json.loads((run_dir / "6-eval" / "metrics.json").read_text())
    assert metrics["labels"] == ["base", "sl", "rl"]
    judgments = [r for _, r in read_jsonl(run_dir / "6-eval" / "judgments.jsonl")]
    limit = yaml.safe_load(SMOKE.read_text())["eval"]["limit"]
    assert len(judgments) == 3 * limit + 3 * 2 * limit  # vs the refusal, then 3 pairs on both prompt kinds
    assert metrics["models"]["rl"]["pm_score_harmful"] is not None
    # The paths that only non-empty greedy answers reach: the judge read comparisons, Elo is a number, and
    # sft mixed in helpful answers (an empty answer is dropped in both, rightly for a real model).
    counts = json.loads((run_dir / "6-eval" / "manifest.json").read_text())["counts"]
    assert counts["judgments"] - counts["judgments_dropped/empty-answer"] > 0, counts
    assert sum(1 for j in judgments if j["p_a"] is not None) > 0
    assert set(metrics["elo"]) == {"base", "sl", "rl"}
    assert all(isinstance(metrics["models"][label]["judge_vs_refusal"], float) for label in metrics["labels"])
    assert "n/a" not in smoke["data"]["summary"][2] and smoke["data"]["summary"][2].startswith("harmlessness Elo")
    sft_counts = json.loads((run_dir / "2-sft" / "manifest.json").read_text())["counts"]
    assert sft_counts["helpful"] > 0 and sft_counts["examples"] == sft_counts["harmless"] + sft_counts["helpful"]
    report = Path(smoke["data"]["report"])
    assert report == (run_dir / "6-eval" / "report.html").resolve() and report.exists()
    assert (run_dir / "6-eval" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert smoke["data"]["summary"][0].startswith("harmful requests refused: base ")
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["model"] == "embedded:tiny-random" and "epochs" in resolved["sft"]


def test_second_run_does_no_work(smoke):
    started = time.time()
    data, _ = cai(runs_dir=smoke["runs_dir"])
    assert all(s["skipped"] for s in data["stages"])
    assert time.time() - started < smoke["seconds"]
    # Without --json: the report's path on stdout, the three-line summary last on stderr.
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--runs-dir", str(smoke["runs_dir"])])
    assert result.exit_code == 0 and result.stdout.strip() == data["report"]
    assert result.stderr.strip().splitlines()[-3:] == data["summary"]


def test_changing_an_option_reruns_that_stage_and_later_ones(smoke):
    max_steps = yaml.safe_load(SMOKE.read_text())["rl"]["max_steps"]
    data, _ = cai("--set", f"rl.max_steps={max_steps + 1}", runs_dir=smoke["runs_dir"])
    ran = [s["stage"] for s in data["stages"] if not s["skipped"]]
    assert ran == ["rl", "eval"]


def test_unknown_key_fails_naming_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(SMOKE.read_text().replace("\nsft:\n", "\nsft:\n  epoch: 3\n", 1))
    line = recipe.read_text().splitlines().index("  epoch: 3") + 1
    result = subprocess.run([sys.executable, "-m", "cai", "run", str(recipe), "--runs-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {recipe}:{line}: unknown key `epoch` in sft -- did you mean `epochs`")
    assert not (tmp_path / "smoke").exists()


def test_killed_run_resumes_without_duplicates(tmp_path):
    records = tmp_path / "smoke" / "1-critique" / "records.jsonl"
    # Critique alone: the kill lands in it, and the re-run has only it to finish.
    command = [sys.executable, "-m", "cai", "run", str(SMOKE), "--runs-dir", str(tmp_path), "--set",
               "stages=[critique]"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = records.read_bytes().count(b"\n") if records.exists() else 0
    assert kept >= 1
    result = subprocess.run(command + ["--json"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    ids = [r["id"] for _, r in read_jsonl(records)]
    assert len(ids) == len(set(ids)) and len(ids) >= kept
    assert len(ids) == yaml.safe_load(SMOKE.read_text())["critique"]["limit"]
    assert json.loads((tmp_path / "smoke" / "1-critique" / "manifest.json").read_text())["status"] == "complete"
