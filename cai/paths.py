"""Where cai keeps its state and finds its bundled files.

`CAI_HOME` (default `~/.cache/cai`) holds converted models; tests point it at a temporary directory.
Bundled files (constitutions/, data/, recipes/) live at the repository root in a source checkout and
inside the package (`cai/_bundled/`) in a wheel.
"""

import os
from collections.abc import Callable
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def cai_home() -> Path:
    """The state directory: `$CAI_HOME`, else `~/.cache/cai`."""
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai")


def bundled(relative: str) -> Path:
    """Path of a bundled file such as `constitutions/default.yaml` (source checkout first, then wheel)."""
    for root in (_PACKAGE_DIR.parent, _PACKAGE_DIR / "_bundled"):
        candidate = root / relative
        if candidate.exists():
            return candidate
    return _PACKAGE_DIR.parent / relative


def local_or_bundled(value: str | Path) -> Path:
    """An input file as given when it exists; else, for a relative path such as `data/red_team_prompts.jsonl`,
    cai's bundled copy when there is one (an installed cai run outside a checkout); else the path as given,
    for the caller's "no such file"."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    candidate = bundled(str(value))
    return candidate if candidate.exists() else path


# Inputs are read whole or line by line into memory, so their size is bounded: a stray multi-gigabyte
# file or an endless device fails at once with the limit and how to raise it, instead of filling RAM.
# The defaults sit far above real inputs (hh-rlhf's largest split is ~100 MB unpacked; its longest
# record ~40 KB).
MAX_INPUT_MB = 1024  # one input file (JSONL, CSV, text; a .gz counts unpacked); env CAI_MAX_INPUT_MB
MAX_LINE_MB = 4  # one JSONL line; env CAI_MAX_LINE_MB


def input_limit() -> int:
    """The most bytes one input file may hold (CAI_MAX_INPUT_MB)."""
    return size_limit("CAI_MAX_INPUT_MB", MAX_INPUT_MB)


def line_limit() -> int:
    """The most bytes one JSONL line may hold (CAI_MAX_LINE_MB)."""
    return size_limit("CAI_MAX_LINE_MB", MAX_LINE_MB)


def size_limit(name: str, default_mb: int) -> int:
    """A size limit in bytes: environment variable `name` (in MB, a positive number) or `default_mb`."""
    text = os.environ.get(name, "").strip()
    try:
        megabytes = float(text) if text else default_mb
    except ValueError:
        megabytes = -1
    if not megabytes > 0:
        from cai.errors import ConfigError

        raise ConfigError(f"{name}={text!r} is not a size -- give a number of megabytes, e.g. {name}={default_mb * 2}")
    return int(megabytes * 2**20)


def open_input(path: Path, error: Callable[[str], Exception], what: str, max_bytes: int | None = None):
    """Open an input file for reading bytes after checking that it is a regular file (not a device such as
    /dev/zero, a pipe or a directory) of at most `max_bytes` (default: CAI_MAX_INPUT_MB). Raises `error`
    with one line naming the file and the fix; `what` names the kind of file wanted ("prompt file")."""
    import stat

    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such file -- check the path") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc}) -- give a {what}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a directory -- give a {what} in it")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file (a device, pipe or socket) -- give a {what}; save a stream "
                    "to a file first")
    limit = max_bytes if max_bytes is not None else input_limit()
    if info.st_size > limit:
        raise error(too_big(path, info.st_size, limit, "CAI_MAX_INPUT_MB" if max_bytes is None else None))
    try:
        return path.open("rb")
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc}) -- give a {what}") from None


def too_big(where: str | Path, size: int, limit: int, variable: str | None, what: str = "the file") -> str:
    """The message for an input over a size limit (`size` -1: not known, only that it is over);
    `variable` is the environment variable that raises the limit, if one does."""
    fix = f"raise the limit with {variable}=N (megabytes)" if variable else "split it or trim it"
    over = f"is {_megabytes(size)}, over" if size >= 0 else "is over"
    return f"{where}: {what} {over} the {_megabytes(limit)} limit -- {fix}"


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.3g} MB"


def read_input_text(path: Path, error: Callable[[str], Exception], what: str, max_bytes: int | None = None) -> str:
    """A whole text input, bounded as in `open_input`, decoded as UTF-8 (a leading byte order mark
    dropped); an invalid byte fails naming its line."""
    with open_input(path, error, what, max_bytes) as handle:
        limit = max_bytes if max_bytes is not None else input_limit()
        raw = handle.read(limit + 1)
    if len(raw) > limit:  # the file grew after the check
        raise error(too_big(path, -1, limit, "CAI_MAX_INPUT_MB" if max_bytes is None else None))
    return decode_utf8(raw, path, error)


def decode_utf8(raw: bytes, where: str | Path, error: Callable[[str], Exception], first_line: int = 1) -> str:
    """`raw` as UTF-8 text (a leading byte order mark dropped); an invalid byte fails naming its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise error(f"{where}:{line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text -- save the file as UTF-8 "
                    "(most editors: Save with encoding, UTF-8)") from None


def yaml_loader():
    """PyYAML's C loader where libyaml is present (bench/yaml_loader.py: a 1 MB constitution in 0.6 s
    against 10 s, 17x), else its pure-Python one; both keep each node's line for file:line errors."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)
