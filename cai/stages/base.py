"""What every stage shares: the context it runs in, its result, progress reporting, and manifests.

A stage is `run(cfg, ctx) -> StageResult`: a function from files and a config dataclass to files.
Stages never print; they report through `ctx.reporter` (the CLI draws a Rich progress bar on stderr).

Manifests make stages resumable and skippable (STYLE.md 8, DESIGN.md "Run directory"):

    run = StageRun("critique", cfg, ctx.manifest_for(cfg.out), inputs={"prompts": cfg.prompts}, force=cfg.force)
    if (done := run.previous()) is not None:
        return done                      # complete, same config and inputs: no work at all
    run.start()                          # writes status "partial"; refuses a different config (ResumeMismatch)
    ...                                  # work that appends records / checkpoints as it goes
    return run.complete(outputs={...}, counts={...}, summary="...")
"""

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cai import __version__
from cai.errors import ConfigError, ResumeMismatch
from cai.paths import local_or_bundled

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


@dataclass
class StageResult:
    stage: str
    outputs: dict[str, str]  # name -> path written
    counts: dict[str, int]  # what was done, dropped, skipped
    summary: str  # one line for a person
    skipped: bool = False  # True when a complete manifest matched and nothing ran
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers worth keeping (accuracy, loss...)


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


FILE_OUTPUT_SUFFIXES = (".jsonl", ".json", ".csv")  # an --out with one of these is a file; any other, a directory


def check_directory_out(out: str | None, stage: str, example: str) -> None:
    """A stage that writes a directory refuses an --out that names a file: its manifest would be that
    file's NAME.manifest.json (`cai sft --out sl/critique.jsonl` took the critique's manifest for its own,
    and with --force overwrote it) and its writing would fail on the file afterwards."""
    if out and (Path(str(out)).suffix in FILE_OUTPUT_SUFFIXES or Path(str(out)).expanduser().is_file()):
        raise ConfigError(f"--out {str(out)!r}: {stage} writes a directory, and this names a file -- give a directory "
                          f"path (e.g. {example})")


def output_directory(out: str | Path) -> Path:
    """The directory a stage writes into: its --out, or the folder of a file --out."""
    out = Path(out)
    return out.parent if out.suffix in FILE_OUTPUT_SUFFIXES else out


def default_manifest_path(out: str | Path) -> Path:
    """`DIR/manifest.json` for a directory output, `NAME.manifest.json` beside a file output."""
    out = Path(out)
    if out.suffix in FILE_OUTPUT_SUFFIXES:
        return out.with_name(out.name.rsplit(".", 1)[0] + ".manifest.json")
    return out / "manifest.json"


# ----------------------------------------------------------------------------- hashing


def labelled(value: Any) -> tuple[str, str] | None:
    """`LABEL=REF` (eval's `--model sl=runs/x/2-sft/model`) -> (LABEL, REF); None for anything else, a
    path that holds "=" included (`runs/lr=1e-5/model`: its LABEL would hold a "/")."""
    if not isinstance(value, str):
        return None
    label, equals, reference = value.partition("=")
    if equals and not value.startswith(("/", ".", "~")) and "/" not in label and "\\" not in label:
        return label.strip(), reference.strip()
    return None


def file_names(value: Any) -> Any:
    """A path's last component (of each, for a list; LABEL=its last component for `LABEL=PATH`): what of
    an input's path may carry meaning (pm eval labels pairs without a source by their file's name, eval
    its models by their labels) once its content is hashed apart."""
    if isinstance(value, list | tuple):
        return [file_names(v) for v in value]
    if (pair := labelled(value)) is not None:
        return f"{pair[0]}={Path(pair[1]).name}"
    return Path(str(value)).name if isinstance(value, str | Path) else value


def _names_inputs(value: Any, named: list[Any]) -> bool:
    """Whether a config value names inputs: one of them, or a list whose every item is one, bare or as
    `LABEL=INPUT` (eval's --model list)."""
    if value in named:
        return True
    return (isinstance(value, list | tuple) and bool(value)
            and all(v in named or ((pair := labelled(v)) is not None and pair[1] in named) for v in value))


def config_hash(cfg: Any, names_only: Collection[str] = (), count_scope: bool = False) -> str:
    """Hash of the fields that change a stage's output. Fields with `metadata={"hash": False}` (batch
    size, output paths, force) do not count: changing them must not invalidate finished work. Nor do
    scope fields (`metadata={"hash": False, "scope": True}`: `--limit` of a stage whose records do not
    depend on it): a finished run is extended to a larger scope, not redone (`StageRun.start`). Fields in
    `names_only` (`StageRun`: fields naming inputs, which count by their content) count by their file
    names only, so a moved run directory is the same work. `count_scope`: scope fields count too (how
    manifests written before a field became a scope field hash it)."""
    values = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("hash", True) or (count_scope and f.metadata.get("scope")):
            value = getattr(cfg, f.name)
            value = file_names(value) if f.name in names_only else value
            values[f.name] = str(value) if isinstance(value, Path) else value
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_hash(reference: str | Path | None) -> str | None:
    """Content hash of an input: a file's bytes; a directory's manifest (or file names, sizes and times);
    a model reference that is not a path (embedded:..., hub id) is its own identity."""
    if reference is None:
        return None
    path = local_or_bundled(str(reference))  # the file the readers open (`data/...` may be bundled)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.exists() and (path.parent / "manifest.json").exists():
            manifest = path.parent / "manifest.json"
        if manifest.exists():
            data = json.loads(manifest.read_text())
            return hashlib.sha256(json.dumps([data.get("config_hash"), data.get("inputs"), data.get("counts")],
                                             sort_keys=True).encode()).hexdigest()[:16]
        # Sizes alone would miss weights retrained in place (same shapes, same sizes); the modification
        # time catches that, at the cost of a rerun after a copy that does not keep times.
        entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return hashlib.sha256(str(reference).encode()).hexdigest()[:16]


def unfinished_manifest(reference: Any, ignore: Path | None = None) -> Path | None:
    """The manifest of a cai output that says its run stopped partway ("partial"), or None: a stage reading
    it would quietly work on part of the records (or a model that was never saved). A manifest counts when
    it sits where the stage writes it for this output (NAME.manifest.json beside a file, DIR/manifest.json),
    or in the parent directory with this output (or that directory) as its `out` (a recipe's stages).
    `ignore`: the asking stage's own manifest (an input inside its own --out is no unfinished input)."""
    if not isinstance(reference, str | Path) or not str(reference):
        return None
    path = Path(str(reference)).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    own = default_manifest_path(path) if path.is_file() else path / "manifest.json"
    skip = Path(ignore).expanduser().resolve() if ignore is not None else None
    for manifest in (own, path.parent / "manifest.json"):
        if not manifest.is_file() or manifest == path or manifest.resolve() == skip:
            continue
        try:
            data = json.loads(manifest.read_text())
            out = Path(str(data.get("config", {}).get("out", ""))).expanduser().resolve()
        except (OSError, ValueError, AttributeError):
            continue
        if manifest == own or out in (path, path.parent):
            return manifest if data.get("status") == "partial" else None
    return None


def item_seed(seed: int, item_id: str, *salt: str) -> int:
    """A per-item seed from the run seed and the item's id: the same item draws the same random numbers in
    any batch and after any resume (the same text in fp32; in bf16 see the engine's note on rounding)."""
    digest = hashlib.sha256("\x1f".join([str(seed), item_id, *salt]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ----------------------------------------------------------------------------- manifests


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "cai": __version__}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


class StageRun:
    """Manifest bookkeeping for one execution of one stage (see module docstring)."""

    def __init__(self, stage: str, cfg: Any, manifest_path: str | Path, inputs: dict[str, Any],
                 outputs: list[str | Path] = (), force: bool = False, scratch: list[str | Path] = ()):
        self.stage = stage
        self.outputs = [Path(p) for p in outputs]
        # Kept while the stage runs and removed once its manifest says complete (trainer checkpoints): a
        # kill after the final save but before the manifest then resumes from them instead of starting over.
        self.scratch = [Path(p) for p in scratch]
        self.cfg = cfg
        self.path = Path(manifest_path)
        for value in inputs.values():
            for reference in value if isinstance(value, list | tuple) else [value]:
                if (manifest := unfinished_manifest(reference, ignore=self.path)) is not None:
                    raise ConfigError(f"{reference}: the run that writes it has not finished ({manifest} says "
                                      f"partial), so it holds only part of its output -- run that command again "
                                      f"to finish it, then {stage}")
        self.inputs = {name: input_hash(value) for name, value in inputs.items()}
        # A field that names an input counts by that input's content, not its path: a run directory moved
        # elsewhere, or the same data file reached from another working directory, is the same work.
        named = [value for value in inputs.values() if value not in (None, "", [])]
        self.by_input = {f.name for f in dataclasses.fields(cfg) if _names_inputs(getattr(cfg, f.name, None), named)}
        self.config_hash = config_hash(cfg, self.by_input)
        self.legacy_hash = config_hash(cfg)  # as manifests written before `by_input` have it
        # As manifests written before list fields (eval's LABEL=PATH models, rl's prompts) counted by content.
        single = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name, None) in named}
        self.single_input_hash = config_hash(cfg, single)
        # As manifests written while a scope field still counted (eval's --limit, before a larger one extended it).
        self.scope_counted_hashes = {config_hash(cfg, names, count_scope=True) for names in ((), single)}
        self.force = force
        self.started = time.time()

    def _read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return None

    def matches(self, manifest: dict[str, Any]) -> bool:
        return (manifest.get("config_hash") in {self.config_hash, self.legacy_hash, self.single_input_hash,
                                                 *self.scope_counted_hashes}
                and manifest.get("inputs") == self.inputs)

    def _as_stored(self, name: str) -> Any:
        """This run's value of config field `name` as a manifest stores it (JSON: paths as strings,
        tuples as lists), so it compares with an earlier manifest's."""
        return json.loads(json.dumps(getattr(self.cfg, name), default=str))

    def same_scope(self, manifest: dict[str, Any]) -> bool:
        before = manifest.get("config", {})
        return all(before.get(f.name) == self._as_stored(f.name)
                   for f in dataclasses.fields(self.cfg) if f.metadata.get("scope"))

    def narrower_scope(self, manifest: dict[str, Any]) -> list[str]:
        """Scope fields (`--limit`) that ask for less than the run that wrote `manifest` covered, as
        "NAME: OLD -> NEW" (None is everything)."""
        before = manifest.get("config", {})
        narrower = []
        for f in dataclasses.fields(self.cfg):
            if f.metadata.get("scope"):
                old, new = before.get(f.name), self._as_stored(f.name)
                if new is not None and (old is None or new < old):
                    narrower.append(f"{f.name}: {old!r} -> {new!r}")
        return narrower

    def _outputs(self, manifest: dict[str, Any]) -> dict[str, str]:
        """The outputs `manifest` lists, where they are now: a run directory moved or renamed since (its
        manifest naming the old place) has them under this run's `out`."""
        outputs = manifest.get("outputs", {})
        before, now = manifest.get("config", {}).get("out"), getattr(self.cfg, "out", None)
        if not before or not now or str(before) == str(now):
            return outputs
        old, new = str(output_directory(before)), str(output_directory(now))
        return {name: new + path[len(old):] if path == old or path.startswith(old + os.sep) else path
                for name, path in outputs.items()}

    def _outputs_exist(self, manifest: dict[str, Any]) -> bool:
        return all(Path(path).exists() for path in self._outputs(manifest).values())

    def previous(self) -> StageResult | None:
        """The earlier result if a complete manifest matches this config and these inputs and its outputs
        are still there, else None."""
        manifest = self._read()
        if (manifest and manifest.get("status") == "complete" and self.matches(manifest) and self.same_scope(manifest)
                and self._outputs_exist(manifest) and not self.force):
            self._remove_scratch()  # left by a kill between the manifest and their removal
            return StageResult(stage=self.stage, outputs=self._outputs(manifest), counts=manifest.get("counts", {}),
                               summary=manifest.get("summary", "") + " (already complete; skipped)", skipped=True,
                               metrics=manifest.get("metrics", {}))
        return None

    def _remove_scratch(self) -> None:
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)

    def start(self) -> bool:
        """Record that work began. Returns True when resuming a partial run of the same config.

        | earlier state                      | without force     | with force          |
        | no manifest, no output             | start             | start               |
        | no manifest, output exists         | ResumeMismatch    | discard, start      |
        | partial, same config and inputs    | resume            | resume              |
        |   ... but a smaller scope          | as complete, below| discard, start      |
        | partial, different, nothing written| discard, start    | discard, start      |
        | complete, same config and inputs   | (previous() skips)| discard, start      |
        | complete, same, an output deleted  | resume (rebuild)  | discard, start      |
        | complete, same, a larger scope     | resume (extend)   | discard, start      |
        | complete, same, a smaller scope    | ResumeMismatch    | discard, start      |
        | different config or inputs         | ResumeMismatch    | discard, start      |

        "Nothing written": a run that failed before finishing any record (a mistyped model, a missing
        file) loses nothing when the corrected command replaces it; refusing would only make the user
        find --force for an empty output. A smaller scope (`--limit 2` after `--limit 8`) is refused:
        the output would still hold the other records, and dropping them would lose finished work.
        """
        manifest = self._read()
        resuming = False
        if manifest is None:
            if any(p.exists() for p in self.outputs):
                if not self.force:
                    raise ResumeMismatch(f"{self.outputs[0]}: exists but has no manifest, so cai cannot tell how "
                                         "it was made -- pass --force to overwrite it, or choose another --out")
                discard_outputs(*self.outputs)
        elif self.matches(manifest) and manifest.get("status") == "partial" and not self.narrower_scope(manifest):
            resuming = True
        elif self.force or (manifest.get("status") == "partial" and not self._holds_work()):
            discard_outputs(*self.outputs)
        elif not self.matches(manifest):
            where = self.outputs[0] if self.outputs else self.path.parent
            changes = self._differences(manifest)
            raise ResumeMismatch(
                f"{where}: holds {self.stage} output made with different options or inputs "
                f"({'; '.join(changes)}) -- pass --force to discard it and start over, "
                "or choose another --out", changes=changes)
        elif narrower := self.narrower_scope(manifest):
            where = self.outputs[0] if self.outputs else self.path.parent
            raise ResumeMismatch(
                f"{where}: holds the {self.stage} output of a larger run ({'; '.join(narrower)}); a smaller "
                "--limit would not remove its records -- leave --limit as it was to keep them, pass --force to "
                "start over with the smaller one, or choose another --out", changes=narrower)
        else:  # complete, same options and inputs: a larger --limit or a deleted output; add what is missing
            resuming = True
        self._write("partial", outputs={}, counts={}, summary="")
        return resuming

    def _holds_work(self) -> bool:
        """Whether any output holds something: a non-empty file, or a directory with a file besides this
        manifest."""
        own = {self.path.resolve(), self.path.with_name(self.path.name + ".tmp").resolve()}
        for path in self.outputs:
            if path.is_file() and path.stat().st_size > 0:
                return True
            if path.is_dir() and any(p.is_file() and p.resolve() not in own for p in path.rglob("*")):
                return True
        return False

    def _differences(self, manifest: dict[str, Any]) -> list[str]:
        """What differs from the run that wrote `manifest`: "NAME: OLD -> NEW" per option that counts
        (`config_hash`), "INPUT changed" per input whose content differs."""
        before = manifest.get("config", {})
        changes = []
        for f in dataclasses.fields(self.cfg):
            if f.metadata.get("hash", True) and f.name in before:
                now = self._as_stored(f.name)
                if f.name in self.by_input and file_names(before[f.name]) == file_names(now):
                    continue  # the same file, moved: its content counts, through `inputs`
                if before[f.name] != now:
                    changes.append(f"{f.name}: {before[f.name]!r} -> {now!r}")
        previous_inputs = manifest.get("inputs") or {}
        changes += [f"{name} changed" for name in sorted(set(previous_inputs) | set(self.inputs))
                    if previous_inputs.get(name) != self.inputs.get(name)]
        return changes or ["written by another cai version"]

    def complete(self, outputs: dict[str, str | Path], counts: dict[str, int], summary: str,
                 metrics: dict[str, Any] | None = None) -> StageResult:
        outputs = {k: str(v) for k, v in outputs.items()}
        self._write("complete", outputs=outputs, counts=counts, summary=summary, metrics=metrics or {})
        self._remove_scratch()
        return StageResult(stage=self.stage, outputs=outputs, counts=counts, summary=summary,
                           metrics=metrics or {})

    def _write(self, status: str, **fields: Any) -> None:
        manifest = {
            "stage": self.stage, "status": status, "config_hash": self.config_hash, "inputs": self.inputs,
            "config": {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg)},
            "seed": getattr(self.cfg, "seed", None), "versions": _library_versions(), "git_sha": _git_sha(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S") if status == "complete" else None,
            "seconds": round(time.time() - self.started, 1) if status == "complete" else None,
            **fields,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, self.path)  # written last and atomically: a manifest is never half-written


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


def discard_outputs(*paths: str | Path) -> None:
    """Remove earlier outputs before a forced restart."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def option_flag(f: dataclasses.Field) -> str:
    """A config field's name as an option (`max_new_tokens` -> `max-new-tokens`; `metadata={"flag": ...}`
    where they differ): the command line's `--NAME` and what config errors and recipe errors call it."""
    return f.metadata.get("flag", f.name.replace("_", "-"))
