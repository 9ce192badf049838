"""What every stage shares: the context it runs in, progress reporting and option checks.

A stage is `run(cfg, ctx) -> StageResult`: a function from files and a config dataclass to files.
Stages never print; they report through `ctx.reporter` (the CLI draws a Rich progress bar on stderr).
Its manifest (`cai.manifest`) makes it skip finished work, resume and refuse changed options.
"""

import dataclasses
import hashlib
import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cai.errors import ConfigError
from cai.manifest import FILE_OUTPUT_SUFFIXES, default_manifest_path

# ----------------------------------------------------------------------------- reporting


class Task(Protocol):
    def advance(self, items: int = 1, tokens: int = 0) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """Progress and status. `task` returns a handle to advance; `log` is a status line (stderr in the CLI)."""

    def task(self, description: str, total: int | None, unit: str = "items") -> Task: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, items: int = 1, tokens: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class NullReporter:
    """Reports nothing; keeps the log lines so tests can assert on them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def task(self, description: str, total: int | None, unit: str = "items") -> Task:
        return _NullTask()

    def log(self, message: str) -> None:
        self.messages.append(message)


def engine_progress(task: Task) -> Callable[[int, int], None]:
    """Adapt a reporter task to the engine's `progress(items, tokens)` callback."""
    return lambda items, tokens: task.advance(items, tokens)


# ----------------------------------------------------------------------------- context and result


@dataclass
class StageContext:
    """What a stage runs with besides its config.

    `manifest_path`: where the caller wants the manifest (a recipe puts it in the stage directory);
    None means beside the output (`default_manifest_path`). `device`: None picks CUDA when present.
    """

    reporter: Reporter = field(default_factory=NullReporter)
    manifest_path: Path | None = None
    device: str | None = None

    def manifest_for(self, out: str | Path) -> Path:
        return Path(self.manifest_path) if self.manifest_path else default_manifest_path(out)


def check_limit(limit: int | None) -> None:
    """`--limit N` reads the first N records: N < 1 is a mistake, not "one record" nor "none"."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1 -- leave --limit out to use every record")


def none_as_missing(value: str | None) -> str | None:
    """An optional model option (`--pm`, eval's `--judge`) with the word its help offers for "none of it"
    (`none`, any case, or empty) read as left out."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def check_at_least_one(cfg: Any, *names: str) -> None:
    """Each named option of `cfg` (a batch size, a step or token count) is at least 1: 0 would crash deep
    in the engine or trainer (a range step of 0, no batches) or quietly do nothing. The error names the
    option as the CLI spells it, which also puts a recipe's error on the line that set it."""
    flags = {f.name: option_flag(f) for f in dataclasses.fields(cfg)}
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{flags[name]} {getattr(cfg, name)} must be >= 1")


def check_jsonl_out(out: str, stage: str) -> None:
    """A stage that writes records needs a `.jsonl` file to write (anything else was taken for a
    directory, after the generating)."""
    if out and not str(out).endswith(".jsonl"):
        raise ConfigError(f"--out {str(out)!r}: {stage} writes JSON Lines records -- name the output file "
                          f"NAME.jsonl (e.g. {Path(str(out)).with_suffix('').name or 'records'}.jsonl)")


def check_directory_out(out: str | None, stage: str, example: str) -> None:
    """A stage that writes a directory refuses an --out that names a file: its manifest would be that
    file's NAME.manifest.json (`cai sft --out sl/critique.jsonl` took the critique's manifest for its own,
    and with --force overwrote it) and its writing would fail on the file afterwards."""
    if out and (Path(str(out)).suffix in FILE_OUTPUT_SUFFIXES or Path(str(out)).expanduser().is_file()):
        raise ConfigError(f"--out {str(out)!r}: {stage} writes a directory, and this names a file -- give a directory "
                          f"path (e.g. {example})")


def item_seed(seed: int, item_id: str, *salt: str) -> int:
    """A per-item seed from the run seed and the item's id: the same item draws the same random numbers in
    any batch and after any resume (the same text in fp32; in bf16 see the engine's note on rounding)."""
    digest = hashlib.sha256("\x1f".join([str(seed), item_id, *salt]).encode()).digest()
    return int.from_bytes(digest[:4], "big")




def last_checkpoint(directory: Path) -> str | None:
    """The newest complete trainer checkpoint under `directory` (one whose trainer_state.json, the last
    file the trainer writes, exists), or None. transformers' get_last_checkpoint takes the highest number
    whatever it holds: a run killed while saving then failed on every resume."""
    if not directory.is_dir():
        return None
    candidates = []
    for path in directory.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            candidates.append((int(suffix), path))
    return str(max(candidates)[1]) if candidates else None


def _finished(checkpoint: str) -> bool:
    """Whether a trainer checkpoint was saved at the end of its training (global_step reached max_steps)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def train_or_resume(trainer, checkpoint: str | None, log: Callable[[str], None] | None = None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except from the checkpoint a finished training
    saved at its last step (a kill during the final save, or before the manifest): transformers resumed
    there trains one step past max_steps (it checks the limit only after a step; sft ran 5 of 4), so
    the checkpoint's weights and state are loaded instead. Returns train()'s output, or None then.

    A Ctrl-C while it trains loses nothing: the step under way finishes, a checkpoint is saved, and
    KeyboardInterrupt is raised then (the same command resumes from that step). `log` says so at once. A
    second Ctrl-C stops at once, as before, losing the steps since the last checkpoint."""
    if checkpoint is not None and _finished(checkpoint):
        from transformers import TrainerState

        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        return None
    stop = _stop_at_step_end(trainer)
    with _FirstInterruptStops(stop, log):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.requested:
        # Also after the last step (a Ctrl-C during the final save): a recipe must stop, not go on to the
        # next stage, and nothing is lost: transformers saves at max_steps, which the rerun loads (`_finished`).
        raise KeyboardInterrupt
    return result


def _stop_at_step_end(trainer):
    """A callback added to `trainer`: once `requested`, it has the trainer save a checkpoint at the end
    of the step under way and stop training."""
    from transformers import TrainerCallback

    class StopAtStepEnd(TrainerCallback):
        requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if _world_size() > 1:
                # Each process of a multi-GPU run takes its own SIGINT, maybe a step apart: they agree on
                # every step, or one would stop and save while the others wait in the next collective.
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(self.requested)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self.requested = bool(flag.item())
            if self.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    callback = StopAtStepEnd()
    trainer.add_callback(callback)  # after transformers' own flow callback, which only ever asks to save
    return callback


def _world_size() -> int:
    """Processes in this training run (1 unless torch.distributed is set up, as accelerate launches do)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _FirstInterruptStops:
    """While active, the first SIGINT sets `stop.requested` (and puts the previous handler back, so a
    second one interrupts at once). Off the main thread, where Python cannot take signals, or where SIGINT is
    ignored or handled outside Python, it does nothing."""

    def __init__(self, stop, log: Callable[[str], None] | None):
        self.stop, self.log, self.previous = stop, log, None

    def _on_interrupt(self, signum, frame) -> None:
        self.stop.requested = True
        signal.signal(signal.SIGINT, self.previous)
        if self.log:
            self.log("interrupted: saving a checkpoint after this training step, then stopping (the same "
                     "command resumes from it); press Ctrl-C again to stop at once and lose the steps "
                     "since the last checkpoint")

    def __enter__(self):
        # SIGINT ignored (`cai run ... &` from a script, nohup-style launchers) stays ignored: a Ctrl-C meant
        # for the foreground job must not stop this one. A handler not installed from Python (getsignal
        # gives None) could not be put back, so it is left alone too.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)):
            self.previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._on_interrupt:
            signal.signal(signal.SIGINT, self.previous)


def option_flag(f: dataclasses.Field) -> str:
    """A config field's name as an option (`max_new_tokens` -> `max-new-tokens`; `metadata={"flag": ...}`
    where they differ): the command line's `--NAME` and what config errors and recipe errors call it."""
    return f.metadata.get("flag", f.name.replace("_", "-"))
