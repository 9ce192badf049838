"""Manifest manifests: when a new run may replace an earlier one, and what the refusal says."""

import json
from dataclasses import dataclass, field

import pytest

from cai.errors import ResumeMismatch
from cai.manifest import Manifest, default_manifest_path
from cai.records import read_jsonl


@dataclass
class Config:
    revisions: int = 1
    temperature: float = 0.7
    batch_size: int = field(default=8, metadata={"hash": False})


def manifest_for(out, cfg, force=False):
    return Manifest("critique", cfg, default_manifest_path(out), inputs={"prompts": None}, outputs=[out],
                    force=force)


def test_a_run_that_failed_before_writing_anything_is_replaced_without_force(tmp_path):
    out = tmp_path / "critique.jsonl"
    manifest_for(out, Config(revisions=1)).start()  # then failed: a mistyped model, say
    assert manifest_for(out, Config(revisions=2)).start() is False  # the corrected command starts fresh
    out.write_text("")  # an output file opened but empty holds nothing either
    assert manifest_for(out, Config(revisions=3)).start() is False


def test_a_directory_holding_only_its_manifest_holds_nothing(tmp_path):
    out = tmp_path / "model"
    manifest_for(out, Config(revisions=1)).start()
    assert (out / "manifest.json").exists()
    manifest_for(out, Config(revisions=2)).start()
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ResumeMismatch):
        manifest_for(out, Config(revisions=3)).start()


def test_the_refusal_names_the_output_and_what_changed(tmp_path):
    out = tmp_path / "critique.jsonl"
    manifest_for(out, Config(revisions=1)).start()
    out.write_text('{"id": "a"}\n')
    with pytest.raises(ResumeMismatch) as refused:
        manifest_for(out, Config(revisions=2, batch_size=4)).start()
    message = str(refused.value)
    assert message.startswith(f"{out}: ") and "revisions: 1 -> 2" in message and "--force" in message
    assert "temperature" not in message and "batch_size" not in message  # unchanged / not counted
    manifest_for(out, Config(revisions=2), force=True).start()
    assert not out.exists()  # discarded


@dataclass
class ScopedConfig:
    revisions: int = 1
    limit: int | None = field(default=None, metadata={"hash": False, "scope": True})


def test_a_finished_run_with_another_scope_is_resumed_not_skipped_nor_refused(tmp_path):
    out = tmp_path / "critique.jsonl"
    finished = manifest_for(out, ScopedConfig(limit=2))
    finished.start()
    out.write_text('{"id": "a"}\n{"id": "b"}\n')
    finished.complete(outputs={"records": out}, counts={}, summary="2 records")
    assert manifest_for(out, ScopedConfig(limit=2)).previous() is not None  # same scope: skipped
    wider = manifest_for(out, ScopedConfig(limit=4))
    assert wider.previous() is None and wider.start() is True and out.read_text().count("\n") == 2
    with pytest.raises(ResumeMismatch, match="revisions: 1 -> 2"):
        manifest_for(out, ScopedConfig(revisions=2, limit=4)).start()



def finished_run(out, cfg):
    run = manifest_for(out, cfg)
    run.start()
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n{"id": "d"}\n')
    run.complete(outputs={"records": out}, counts={"records": 4}, summary="4 records")


@pytest.mark.parametrize("before, after", [(4, 2), (None, 2)])
def test_a_smaller_limit_than_a_finished_run_is_refused_as_its_records_would_stay(tmp_path, before, after):
    out = tmp_path / "critique.jsonl"
    finished_run(out, ScopedConfig(limit=before))
    smaller = manifest_for(out, ScopedConfig(limit=after))
    assert smaller.previous() is None
    with pytest.raises(ResumeMismatch, match=f"larger run \\(limit: {before} -> 2\\).*--force"):
        smaller.start()
    assert out.read_text().count("\n") == 4  # nothing lost
    assert manifest_for(out, ScopedConfig(limit=after), force=True).start() is False and not out.exists()


def test_a_finished_run_whose_output_was_deleted_runs_again(tmp_path):
    out = tmp_path / "critique.jsonl"
    finished_run(out, ScopedConfig(limit=4))
    out.unlink()
    again = manifest_for(out, ScopedConfig(limit=4))
    assert again.previous() is None  # not "already complete; skipped" with no file behind it
    assert again.start() is True  # rebuilds what is missing


def test_a_model_directory_retrained_in_place_is_a_new_input(tmp_path):
    import os

    from cai.manifest import input_hash

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"A" * 64)
    before = input_hash(model)
    weights.write_bytes(b"B" * 64)  # same size, as retrained weights of the same shapes are
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert input_hash(model) != before

@pytest.mark.parametrize("stage", ["critique", "feedback"])
def test_limit_is_a_scope_where_records_depend_on_their_prompt_only(stage):
    import dataclasses
    import importlib

    module, name, _ = LIMITED_CONFIGS[stage]
    [limit] = [f for f in dataclasses.fields(getattr(importlib.import_module(module), name)) if f.name == "limit"]
    assert limit.metadata.get("scope") and limit.metadata.get("hash") is False


# Each stage with a --limit: its config class and the fewest other fields it needs.
LIMITED_CONFIGS = {
    "critique": ("cai.stages.critique", "CritiqueConfig", {"prompts": "p.jsonl"}),
    "feedback": ("cai.stages.feedback", "FeedbackConfig", {"prompts": "p.jsonl", "model": "m", "out": "f.jsonl"}),
    "feedback-eval": ("cai.stages.feedback", "FeedbackEvalConfig", {"pairs": "p.jsonl"}),
    "eval": ("cai.stages.evaluate", "EvalConfig", {}),
    "rl": ("cai.stages.rl", "RLConfig", {"model": "m", "prompts": ["p.jsonl"], "reward": ["length:1"]}),
    "pm-eval": ("cai.stages.pm", "PMEvalConfig", {"model": "pm", "pairs": "p.jsonl"}),
}


@pytest.mark.parametrize("limit", [0, -1])
@pytest.mark.parametrize("stage", LIMITED_CONFIGS)
def test_a_limit_below_one_is_refused_by_every_stage(stage, limit):
    """`records.read_prompts` stops once it has `limit` records, so -1 used to mean one record."""
    import importlib

    from cai.errors import ConfigError

    module, name, fields = LIMITED_CONFIGS[stage]
    config_class = getattr(importlib.import_module(module), name)
    config_class(**fields)  # valid without the limit
    with pytest.raises(ConfigError, match=f"--limit {limit}: must be at least 1"):
        config_class(**fields, limit=limit)


@dataclass
class OutConfig:
    out: str = ""


def test_a_stage_refuses_an_input_whose_run_has_not_finished(tmp_path):
    """`cai sft --data` on a critique run stopped at 10 of 40 records trained on the 10 without a word."""
    from cai.errors import ConfigError

    records = tmp_path / "critique.jsonl"
    upstream = Manifest("critique", OutConfig(out=str(records)), default_manifest_path(records), inputs={},
                        outputs=[records])
    upstream.start()
    records.write_text('{"id": "a"}\n')

    def downstream(data):
        return Manifest("sft", Config(), tmp_path / "sft" / "manifest.json", inputs={"data": data})

    with pytest.raises(ConfigError, match=r"critique.jsonl: the run that writes it has not finished .* then sft"):
        downstream(str(records))
    upstream.complete(outputs={"records": records}, counts={}, summary="done")
    downstream(str(records))  # finished: accepted

    # A recipe's stage keeps its manifest in its directory, naming the file as its `out`.
    stage_dir = tmp_path / "3-feedback"
    prefs = stage_dir / "prefs.jsonl"
    Manifest("feedback", OutConfig(out=str(prefs)), stage_dir / "manifest.json", inputs={}, outputs=[prefs]).start()
    prefs.write_text("{}\n")
    with pytest.raises(ConfigError, match="has not finished"):
        downstream([str(prefs)])
    # A manifest in the same directory that is about another output does not count.
    other = tmp_path / "data"
    other.mkdir()
    (other / "prompts.txt").write_text("hi\n")
    (other / "manifest.json").write_text('{"status": "partial", "config": {"out": "elsewhere"}}')
    downstream(str(other / "prompts.txt"))


@dataclass
class InputConfig:
    pairs: str = ""
    revisions: int = 1
    out: str = field(default="", metadata={"hash": False})


def input_run(tmp_path, pairs, revisions=1):
    return Manifest("pm-eval", InputConfig(pairs=str(pairs), revisions=revisions, out=str(tmp_path / "E")),
                    tmp_path / "E" / "manifest.json", inputs={"pairs": str(pairs)}, outputs=[tmp_path / "E"])


def test_an_input_counts_by_content_and_file_name(tmp_path):
    line = '{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pairs.jsonl").write_text(line)
    first = input_run(tmp_path, tmp_path / "a" / "pairs.jsonl")
    first.start()
    first.complete({"metrics": tmp_path / "E"}, {"pairs": 1}, "1 pair")
    (tmp_path / "a").rename(tmp_path / "b")  # moved: same name, same content
    assert input_run(tmp_path, tmp_path / "b" / "pairs.jsonl").previous() is not None
    (tmp_path / "b" / "other.jsonl").write_text(line)  # same content, another name: pm eval labels by it
    assert input_run(tmp_path, tmp_path / "b" / "other.jsonl").previous() is None
    (tmp_path / "b" / "pairs.jsonl").write_text(line + line)  # same name, other content
    assert input_run(tmp_path, tmp_path / "b" / "pairs.jsonl").previous() is None


@dataclass
class EvalLikeConfig:
    models: list = field(default_factory=list)
    out: str = field(default="", metadata={"hash": False})


def eval_run(tmp_path, models):
    inputs = {f"model:{m.split('=', 1)[0]}": m.split("=", 1)[1] for m in models}
    return Manifest("eval", EvalLikeConfig(models=models, out=str(tmp_path / "E")), tmp_path / "E" / "manifest.json",
                    inputs=inputs, outputs=[tmp_path / "E"])


def test_a_moved_run_keeps_a_finished_eval_whose_models_are_labelled_paths(tmp_path):
    """eval's --model list holds LABEL=PATH: its paths count by content too, so a moved or renamed run
    directory does not redo eval (README: a moved run directory keeps its finished stages)."""
    for name in ("sft", "rl"):
        (tmp_path / "a" / name).mkdir(parents=True)
        (tmp_path / "a" / name / "config.json").write_text("{}")
    first = eval_run(tmp_path, ["base=embedded:tiny-random", f"sl={tmp_path / 'a' / 'sft'}",
                                f"rl={tmp_path / 'a' / 'rl'}"])
    first.start()
    first.complete({"metrics": tmp_path / "E"}, {"models": 3}, "3 models")
    (tmp_path / "a").rename(tmp_path / "b")
    moved = ["base=embedded:tiny-random", f"sl={tmp_path / 'b' / 'sft'}", f"rl={tmp_path / 'b' / 'rl'}"]
    assert eval_run(tmp_path, moved).previous() is not None
    # The labels and their order still count: they name the report's columns and its baseline.
    assert eval_run(tmp_path, [moved[0], moved[2], moved[1]]).previous() is None
    assert eval_run(tmp_path, [moved[0], "sft=" + moved[1][3:], moved[2]]).previous() is None


def test_an_input_inside_the_stages_own_out_does_not_block_its_resume(tmp_path):
    """`cai rl --prompts work/prompts.jsonl --out work`, killed: the rerun must resume, not call its own
    partial manifest an unfinished input."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "prompts.jsonl").write_text('{"id": "1", "prompt": "hi"}\n')
    cfg = OutConfig(out=str(work))
    Manifest("rl", cfg, work / "manifest.json", inputs={"prompts": str(work / "prompts.jsonl")}).start()
    resumed = Manifest("rl", cfg, work / "manifest.json", inputs={"prompts": str(work / "prompts.jsonl")})
    assert resumed.start() is True


def test_scratch_outlives_a_kill_before_the_manifest_and_goes_once_it_is_complete(tmp_path):
    out, checkpoints = tmp_path / "model", tmp_path / "model" / "checkpoints"

    def run():
        return Manifest("sft", Config(), default_manifest_path(out), inputs={"prompts": None}, outputs=[out],
                        scratch=[checkpoints])

    run().start()
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"x")  # saved; then killed before complete(): resume from them
    assert run().start() is True and checkpoints.is_dir()
    run().complete(outputs={"model": out}, counts={}, summary="done")
    assert not checkpoints.exists()
    (checkpoints / "checkpoint-4").mkdir(parents=True)  # a kill between the manifest and their removal
    assert run().previous().skipped and not checkpoints.exists()


def test_a_stage_that_writes_a_directory_refuses_an_out_that_names_a_file(tmp_path):
    """`cai sft --out sl/critique.jsonl`: sft took the critique's NAME.manifest.json for its own, reported
    'holds sft output made with different options', and with --force overwrote that manifest (the critique
    records then read as unfinished) before failing on the file. Every directory-writing stage refuses first."""
    from cai.errors import ConfigError
    from cai.stages.dpo import DPOConfig
    from cai.stages.evaluate import EvalConfig
    from cai.stages.pm import PMEvalConfig, PMTrainConfig
    from cai.stages.rl import RLConfig
    from cai.stages.sft import SFTConfig

    records = tmp_path / "critique.jsonl"
    records.write_text('{"id": "a", "prompt": "hi", "final": "no"}\n')
    manifest = default_manifest_path(records)
    manifest.write_text('{"stage": "critique", "status": "complete"}')
    makers = [lambda out: SFTConfig(data=str(records), out=out, force=True),
              lambda out: DPOConfig(ai=str(records), out=out),
              lambda out: PMTrainConfig(ai=str(records), out=out),
              lambda out: PMEvalConfig(model="pm", pairs=str(records), out=out),
              lambda out: RLConfig(prompts=[str(records)], out=out, reward=["math:1"]),
              lambda out: EvalConfig(out=out)]
    for make in makers:
        for out in (str(records), str(tmp_path / "model.json"), str(tmp_path / "existing")):
            (tmp_path / "existing").write_text("a file without a suffix")
            with pytest.raises(ConfigError, match=r"writes a directory, and this names a file -- give a directory"):
                make(out)
        make(str(tmp_path / "model-dir"))  # a directory path is fine
    from typer.testing import CliRunner

    from cai.cli import app

    result = CliRunner().invoke(app, ["sft", "--data", str(records), "--out", str(records), "--force",
                                      "--model", "embedded:tiny-random"])
    assert result.exit_code == 1 and "sft writes a directory" in str(result.exception)
    assert manifest.read_text() == '{"stage": "critique", "status": "complete"}'  # the critique's, untouched


class _SelfInterruptingTrainer:
    """A stand-in trainer whose train() receives a SIGINT, as a Ctrl-C in the terminal would deliver."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def train(self, resume_from_checkpoint=None):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        return "trained"


def test_an_ignored_sigint_stays_ignored_while_training(monkeypatch):
    """A job started with SIGINT ignored (`cai run r.yaml &` in a script) is not stopped by a Ctrl-C sent
    to its process group: train_or_resume must not install its Ctrl-C handler over SIG_IGN."""
    import signal

    from cai.stages.base import train_or_resume

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert train_or_resume(_SelfInterruptingTrainer(), None) == "trained"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_every_process_of_a_multi_gpu_run_stops_at_the_step_one_of_them_was_interrupted(monkeypatch):
    """Under accelerate each process takes its own SIGINT: the one that did not (yet) must stop and save at
    the same step as the one that did, or it would wait forever in the next collective."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainingArguments

    from cai.stages.base import _stop_at_step_end

    class Trainer:
        def add_callback(self, callback):
            self.callback = callback

    others_asked = []  # what the other process brings to the all-reduce

    def all_reduce(flag, op):
        flag.copy_(flag.clamp(min=int(bool(others_asked))))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stop = _stop_at_step_end(trainer := Trainer())
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    control = trainer.callback.on_step_end(args, None, TrainerControl())
    assert not control.should_training_stop and not stop.requested
    others_asked.append(True)  # the other process took a Ctrl-C; this one did not
    control = trainer.callback.on_step_end(args, None, TrainerControl())
    assert control.should_save and control.should_training_stop and stop.requested


# ----------------------------------------------------------------------------- one writer per output

GATED_CRITIQUE = """
import pathlib, sys, time
from cai.stages import critique
real = critique.critique_chunk
def gated(*args, **kwargs):  # holds the run, lock taken and manifest partial, until the test says go
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
critique.critique_chunk = gated
from cai.cli import app
app(sys.argv[2:], prog_name="cai")
"""


def test_a_second_cai_writing_the_same_output_stops_at_once_and_the_first_finishes_intact(tmp_path,
                                                                                           tiny_model_dir):
    """Two `cai critique --out same.jsonl` at once both ran: 24 lines, 12 unique ids, a manifest saying
    `records: 24`. The second now stops before any work, naming the first one's pid."""
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from cai.cli import app

    prompts, out, go = tmp_path / "prompts.jsonl", tmp_path / "same.jsonl", tmp_path / "go"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"request {i}"}) + "\n" for i in range(12)))
    command = ["critique", "--prompts", str(prompts), "--out", str(out), "--model", tiny_model_dir,
               "--max-new-tokens", "4", "--chunk-size", "4"]
    first = subprocess.Popen([sys.executable, "-c", GATED_CRITIQUE, str(go), *command],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        manifest = default_manifest_path(out)
        deadline = time.monotonic() + 120
        while not manifest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(manifest.read_text())["status"] == "partial"
        second = CliRunner().invoke(app, command)
        assert second.exit_code == 1, second.output
        message = str(second.exception)
        assert message.startswith(f"another cai (pid {first.pid}) is writing {out} -- ") and "\n" not in message
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    ids = [record["id"] for _, record in read_jsonl(out)]
    assert len(ids) == 12 and len(set(ids)) == 12
    written = json.loads(default_manifest_path(out).read_text())
    assert written["status"] == "complete" and written["counts"]["records"] == 12


HOLD_LOCK = """
import sys, time
from cai.manifest import lock
lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    import signal
    import subprocess
    import sys

    from cai.manifest import OutputBusy, lock, unlock

    out = tmp_path / "records.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=f"another cai \\(pid {holder.pid}\\) is writing {out}"):
            lock(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".records.jsonl.lock").exists()  # left behind, naming a dead process
    key = lock(out)  # and yet free
    unlock(key)
    assert not (tmp_path / ".records.jsonl.lock").exists()  # a released lock leaves no file


def test_cai_run_holds_its_run_directory_while_its_stages_lock_their_outputs(tmp_path):
    """One process takes the run directory and then a stage's output inside it (no deadlock); another
    process asking for the run directory meanwhile is refused, and gets it once it is released."""
    import os
    import subprocess
    import sys

    from cai.manifest import lock, unlock

    run_dir = tmp_path / "runs" / "x"
    outer = lock(run_dir, fix="choose another --name")
    records = run_dir / "1-critique" / "records.jsonl"
    manifest = Manifest("critique", OutConfig(out=str(records)), run_dir / "1-critique" / "manifest.json", inputs={})
    manifest.start()
    probe = [sys.executable, "-c", "import sys; from cai.manifest import lock; lock(sys.argv[1], 'choose another --name')"]
    refused = subprocess.run([*probe, str(run_dir)], capture_output=True, text=True)
    assert f"another cai (pid {os.getpid()}) is writing {run_dir} -- wait for it to finish, or choose another --name" \
        in refused.stderr
    assert subprocess.run([*probe, str(records)], capture_output=True, text=True).returncode != 0
    unlock(outer)
    manifest.release()
    assert subprocess.run([*probe, str(run_dir)], capture_output=True, text=True).returncode == 0
    assert subprocess.run([*probe, str(records)], capture_output=True, text=True).returncode == 0


# ----------------------------------------------------------------------------- --force never removes inputs


def test_force_does_not_remove_an_input_inside_the_output_directory(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from cai.cli import app

    data = tmp_path / "D" / "c.jsonl"
    data.parent.mkdir()
    data.write_text('{"id": "a", "prompt": "hi", "final": "hello"}\n')
    result = CliRunner().invoke(app, ["sft", "--data", str(data), "--out", str(data.parent), "--force",
                                      "--model", tiny_model_dir])
    assert result.exit_code == 1 and f"--out {data.parent} holds the input {data} (data)" in str(result.exception)
    assert data.read_text() == '{"id": "a", "prompt": "hi", "final": "hello"}\n'


def test_an_output_that_is_an_input_is_refused_with_or_without_force(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from cai.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "hi"}\n')
    for force in ([], ["--force"]):
        result = CliRunner().invoke(app, ["critique", "--prompts", str(prompts), "--out", str(prompts),
                                          "--model", tiny_model_dir, *force])
        assert result.exit_code == 1
        assert str(result.exception).startswith(f"--out {prompts} is also the input prompts: writing would overwrite")
        assert prompts.read_text() == '{"id": "p1", "prompt": "hi"}\n'
