"""Errors a user can fix. Only `cai.cli` catches these: it prints `error: <message>` and exits 1.

Anything that is not a `CaiError` is a bug in cai and shows a traceback.
Messages are one sentence naming what was wrong (file:line or the option) and how to fix it.
"""


class CaiError(Exception):
    """Base class: something the user can fix (a bad file, option, model reference...)."""


class ConfigError(CaiError):
    """An option value, or a combination of values, that cannot work."""


class RecipeError(CaiError):
    """A recipe YAML that is invalid: unknown key, wrong type, missing file."""


class RecordsError(CaiError):
    """A JSONL/CSV/text input that cannot be read; the message names file:line."""


class ConstitutionError(CaiError):
    """A constitution with problems; `problems` lists every one as `file:line: problem -- fix`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the constitution:"
        super().__init__(head if len(problems) == 1 else head + "\n" + "\n".join(problems))


class ModelError(CaiError):
    """A model reference that cannot be resolved or loaded."""


class ResumeMismatch(CaiError):
    """Existing output was written with a different configuration than the one asked for now. `changes`:
    what differs, one "NAME: OLD -> NEW" (or "INPUT changed") each."""

    def __init__(self, message: str, changes: list[str] | None = None):
        super().__init__(message)
        self.changes = list(changes or [])


class MissingDependency(CaiError):
    """An optional package is missing; the message names the pip extra that provides it."""
