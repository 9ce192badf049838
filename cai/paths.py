"""Where cai keeps its state and finds its bundled files.

`CAI_HOME` (default `~/.cache/cai`) holds converted models; tests point it at a temporary directory.
Bundled files (constitutions/, data/, recipes/) live at the repository root in a source checkout and
inside the package (`cai/_bundled/`) in a wheel.
"""

import os
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
