"""Stage manifests: what an output was made from, written last, so a stage can skip, resume or refuse.

    manifest = Manifest("critique", cfg, ctx.manifest_for(cfg.out), inputs={"prompts": cfg.prompts},
                        outputs=[cfg.out], force=cfg.force)
    if (done := manifest.previous()) is not None:
        return done                      # complete, same options and inputs, outputs there: no work at all
    resuming = manifest.start()          # status "partial"; refuses other options (ResumeMismatch)
    ...                                  # work that appends records / checkpoints as it goes
    return manifest.complete(outputs={...}, counts={...}, summary="...")

`manifest.json` holds the stage, its status (partial/complete), the config and a hash of the fields that
change the output, a content hash of each input, the outputs, counts, library versions and times. It is
replaced atomically, and says "complete" only after every output is written.

While a Manifest exists, its process holds an exclusive lock on the stage's output: a second cai writing
the same output stops at once. The lock is an OS lock (flock) on a file beside the output, so a killed
process leaves nothing that blocks.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import __version__
from cai.errors import CaiError, ConfigError, ResumeMismatch
from cai.paths import local_or_bundled

FILE_OUTPUT_SUFFIXES = (".jsonl", ".json", ".csv")  # an --out with one of these is a file; any other, a directory


@dataclass
class StageResult:
    stage: str
    outputs: dict[str, str]  # name -> path written
    counts: dict[str, int]  # what was done, dropped, skipped
    summary: str  # one line for a person
    skipped: bool = False  # True when a complete manifest matched and nothing ran
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers worth keeping (accuracy, loss...)


def default_manifest_path(out: str | Path) -> Path:
    """`DIR/manifest.json` for a directory output, `NAME.manifest.json` beside a file output."""
    out = Path(out)
    if out.suffix in FILE_OUTPUT_SUFFIXES:
        return out.with_name(out.name.rsplit(".", 1)[0] + ".manifest.json")
    return out / "manifest.json"


def discard_outputs(*paths: str | Path) -> None:
    """Remove earlier outputs before a forced restart."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------- one writer per output


class OutputBusy(CaiError):
    """Another cai process holds the lock on an output."""


_held: dict[Path, list] = {}  # lock file -> [open file, holders in this process]
os.register_at_fork(after_in_child=_held.clear)  # a forked child holds none of its parent's locks


def lock(target: str | Path, fix: str = "choose another --out") -> Path:
    """Take the exclusive lock on `target` (an output file or directory, or a run directory) for this
    process, or raise OutputBusy naming the process that holds it. The same process may take it again
    (`cai run` holds its run directory while each stage locks its output inside it). Returns the key for
    `unlock`. The lock is an flock on `.NAME.lock` beside `target` (never inside it, where discarding the
    output would remove it): the OS releases it when its process ends, however it ends, so a file left by a
    killed process blocks nothing."""
    target = Path(target).expanduser()
    key = target.resolve().with_name(f".{target.resolve().name}.lock")
    if key in _held:
        _held[key][1] += 1
        return key
    key.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = key.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise OutputBusy(f"another cai (pid {holder}) is writing {target} -- wait for it to finish, or {fix}") from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(key)):
                break
        except FileNotFoundError:
            pass
        handle.close()  # its holder removed the file while this one waited to lock it: lock the new one
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    _held[key] = [handle, 1]
    return key


def unlock(key: Path) -> None:
    entry = _held.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] == 0:
            key.unlink(missing_ok=True)  # while still locked, so whoever locks next locks a file at this path
            entry[0].close()
            del _held[key]


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


def _paths(value: Any) -> list[str]:
    """The references a config value or an input names: itself, each item of a list, REF of `LABEL=REF`."""
    values = value if isinstance(value, list | tuple) else [value]
    return [pair[1] if (pair := labelled(v)) is not None else str(v) for v in values if v not in (None, "")]


def input_hash(reference: str | Path | None) -> str | None:
    """Content hash of an input: a file's bytes; a directory's file names, sizes and modification times
    (the times catch weights retrained in place, same shapes and sizes; a copy that does not keep times
    reruns what reads it); a model reference that is not a path (embedded:..., hub id) is its own identity."""
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
        entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return hashlib.sha256(str(reference).encode()).hexdigest()[:16]


def unfinished_manifest(reference: Any, ignore: Path | None = None) -> Path | None:
    """The manifest saying "partial" of the cai output `reference` names, or None: a stage reading it would
    quietly work on part of the records (or a model never saved). An output's manifest is where a stage
    writes it (NAME.manifest.json beside a file, DIR/manifest.json), or, for a recipe's stages, the parent
    directory's manifest.json when its `out` is this output or that directory. `ignore`: the asking
    stage's own manifest (an input inside its own --out is no unfinished input)."""
    path = Path(str(reference)).expanduser().resolve()
    own = default_manifest_path(path) if path.is_file() else path / "manifest.json"
    for manifest in (own, path.parent / "manifest.json"):
        if not manifest.is_file() or manifest == path or (ignore and manifest == Path(ignore).resolve()):
            continue
        try:
            data = json.loads(manifest.read_text())
            out = Path(str(data.get("config", {}).get("out", ""))).expanduser().resolve()
        except (OSError, ValueError, AttributeError):
            continue
        if manifest == own or out in (path, path.parent):
            return manifest if data.get("status") == "partial" else None
    return None


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


def _stored(value: Any) -> Any:
    """A value as a manifest stores it (JSON: paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def counted_fields(cfg: Any, by_name: set[str] = frozenset()) -> dict[str, Any]:
    """The config fields that change a stage's output (not `metadata={"hash": False}`), as a manifest
    stores them; those in `by_name` (naming inputs, which count by content) by their file names only."""
    counted = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("hash", True):
            value = _stored(getattr(cfg, f.name))
            counted[f.name] = file_names(value) if f.name in by_name else value
    return counted


def config_hash(cfg: Any, by_name: set[str] = frozenset()) -> str:
    text = json.dumps(counted_fields(cfg, by_name), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- the manifest


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_result(path: Path) -> StageResult | None:
    """The result the complete manifest at `path` records, its outputs where they are now (those inside the
    manifest's directory are stored relative to it, so a moved run directory still finds them); None when
    there is no complete manifest."""
    if (manifest := _read(path)) is None or manifest.get("status") != "complete":
        return None
    return StageResult(stage=manifest.get("stage", ""), counts=manifest.get("counts", {}),
                       outputs={name: str(Path(path).parent / out) for name, out in manifest.get("outputs", {}).items()},
                       summary=manifest.get("summary", ""), metrics=manifest.get("metrics", {}))


class Manifest:
    """The manifest of one execution of one stage (see the module docstring).

    Config fields with `metadata={"hash": False}` (batch size, output paths, force) do not count: changing
    them keeps finished work. Scope fields (`{"hash": False, "scope": True}`: a `--limit` whose records do
    not depend on it) do not count either: a larger one extends a finished run, a smaller one is refused.
    A field naming inputs counts by their file names only, the inputs by their content: a moved run
    directory is the same work. `scratch` (trainer checkpoints) is kept while the stage runs and removed
    once the manifest says complete, so a kill between the final save and the manifest resumes from it.
    """

    def __init__(self, stage: str, cfg: Any, path: str | Path, inputs: dict[str, Any],
                 outputs: list[str | Path] = (), force: bool = False, scratch: list[str | Path] = ()):
        self.stage, self.cfg, self.path, self.force = stage, cfg, Path(path), force
        self.outputs, self.scratch = [Path(p) for p in outputs], [Path(p) for p in scratch]
        self.started = time.time()
        references = {name: _paths(value) for name, value in inputs.items()}
        self.input_files = [(name, Path(r)) for name, refs in references.items() for r in refs if Path(r).exists()]
        for name, given in self.input_files:
            if any(output.resolve() == given.resolve() for output in self.outputs):
                raise ConfigError(f"--out {given} is also the input {name}: writing would overwrite it -- "
                                  "choose another --out")
            if (manifest := unfinished_manifest(given, ignore=self.path)) is not None:
                raise ConfigError(f"{given}: the run that writes it has not finished ({manifest} says partial), "
                                  f"so it holds only part of its output -- run that command again to finish it, "
                                  f"then {stage}")
        # One process writes an output: the other ranks of a multi-GPU launch (RANK > 0) run beside rank 0.
        out = getattr(cfg, "out", None) or (self.outputs[0] if self.outputs else self.path)
        key = lock(out) if int(os.environ.get("RANK") or 0) == 0 else None
        self.release = weakref.finalize(self, unlock, key) if key else lambda: None
        self.inputs = {name: input_hash(value) for name, value in inputs.items()}
        named = {r for refs in references.values() for r in refs}
        self.by_name = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("hash", True)
                        and (refs := _paths(_stored(getattr(cfg, f.name)))) and all(r in named for r in refs)}
        self.counted = counted_fields(cfg, self.by_name)
        self.scope = {f.name: _stored(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.metadata.get("scope")}
        self.config_hash = config_hash(cfg, self.by_name)

    def _compared(self, name: str, value: Any) -> Any:
        return file_names(value) if name in self.by_name else value

    def changes(self, previous: dict[str, Any]) -> list[str]:
        """What differs from the run that wrote `previous`: "NAME: OLD -> NEW" per option that counts (a field
        it does not know of counts as unchanged), "INPUT changed" per input whose content differs, and each
        scope field asking for less than it covered."""
        before, inputs = previous.get("config", {}), previous.get("inputs") or {}
        changes = [f"{name}: {before[name]!r} -> {_stored(getattr(self.cfg, name))!r}"
                   for name, now in self.counted.items() if name in before and self._compared(name, before[name]) != now]
        changes += [f"{name} changed" for name in sorted(set(inputs) | set(self.inputs))
                    if inputs.get(name) != self.inputs.get(name)]
        return changes + [f"{name}: {before.get(name)!r} -> {new!r}" for name, new in self.scope.items()
                          if new is not None and (before.get(name) is None or new < before[name])]

    def previous(self) -> StageResult | None:
        """The earlier result when a complete manifest matches these options, inputs and scope and its
        outputs are still there; else None."""
        result = read_result(self.path)
        if (self.force or result is None or self.changes(previous := _read(self.path))
                or any(previous.get("config", {}).get(name) != value for name, value in self.scope.items())
                or not all(Path(path).exists() for path in result.outputs.values())):
            return None
        self._remove_scratch()  # left by a kill between the manifest and their removal
        self.release()
        return dataclasses.replace(result, stage=self.stage, skipped=True,
                                   summary=result.summary + " (already complete; skipped)")

    def start(self) -> bool:
        """Record that work began; True when it resumes earlier work of the same options and inputs.

        Earlier output of other options (or inputs, or a larger --limit), or without a manifest, is refused
        with what changed, unless --force, or unless it holds nothing (a run that failed before writing: the
        corrected command replaces it). A partial run of the same options resumes, --force or not (the same
        command again after a kill); a complete one is extended (a larger --limit, a deleted output) or, with
        --force, started over. Starting over never removes an input.
        """
        previous = _read(self.path)
        changes = self.changes(previous) if previous is not None else None
        resuming = changes == [] and not (self.force and previous.get("status") == "complete")
        if not resuming and self._holds_work():
            for name, given in self.input_files:
                for output in self.outputs:
                    if output.resolve() in given.resolve().parents:
                        raise ConfigError(f"--out {output} holds the input {given} ({name}): starting over would "
                                          f"remove it -- move it out of {output}, or choose another --out")
            if not self.force:
                raise self._refusal(changes)
        if not resuming:
            discard_outputs(*self.outputs)
        self._write("partial", outputs={}, counts={}, summary="")
        return resuming

    def _refusal(self, changes: list[str] | None) -> ResumeMismatch:
        where = self.outputs[0] if self.outputs else self.path.parent
        if changes is None:
            return ResumeMismatch(f"{where}: exists but has no manifest, so cai cannot tell how it was made -- "
                                  "pass --force to overwrite it, or choose another --out")
        if all(change.split(":")[0] in self.scope for change in changes):
            return ResumeMismatch(
                f"{where}: holds the {self.stage} output of a larger run ({'; '.join(changes)}); a smaller --limit "
                "would not remove its records -- leave --limit as it was to keep them, pass --force to start over "
                "with the smaller one, or choose another --out", changes=changes)
        return ResumeMismatch(
            f"{where}: holds {self.stage} output made with different options or inputs ({'; '.join(changes)}) "
            "-- pass --force to discard it and start over, or choose another --out", changes=changes)

    def _holds_work(self) -> bool:
        """Whether any output holds something: a non-empty file, or a directory with a file besides this
        manifest."""
        own = {self.path.resolve(), self.path.with_name(self.path.name + ".tmp").resolve()}
        return any((path.is_file() and path.stat().st_size > 0)
                   or (path.is_dir() and any(p.is_file() and p.resolve() not in own for p in path.rglob("*")))
                   for path in self.outputs)

    def _remove_scratch(self) -> None:
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)

    def complete(self, outputs: dict[str, str | Path], counts: dict[str, int], summary: str,
                 metrics: dict[str, Any] | None = None) -> StageResult:
        """Write the complete manifest (after every output), remove the scratch, release the output."""
        here = self.path.parent.absolute()
        stored = {name: os.path.relpath(path, here) if path == here or here in path.parents else str(path)
                  for name, path in ((name, Path(p).absolute()) for name, p in outputs.items())}
        self._write("complete", outputs=stored, counts=counts, summary=summary, metrics=metrics or {})
        self._remove_scratch()
        self.release()
        return StageResult(stage=self.stage, outputs={k: str(v) for k, v in outputs.items()}, counts=counts,
                           summary=summary, metrics=metrics or {})

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
