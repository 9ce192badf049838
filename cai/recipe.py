"""Recipes: one YAML file -> every stage's config, run in order into one run directory.

A recipe names the base model, the constitution, the data and each stage's options (the same keys as
the stage's command options, snake_case):

    name: demo
    model: embedded:smollm2-135m-instruct
    constitution: default
    stages: [critique, sft, feedback, pm, rl, eval]
    data:
      red_team: data/red_team_prompts.jsonl
    critique: {revisions: 1, limit: 40}
    sft: {epochs: 2}

Precedence: the stage config's dataclass default, then what the pipeline wires in (the
run-directory paths of upstream outputs, the recipe's `model`, `constitution`, `seed`...), then the
recipe's stage mapping, then `--set stage.key=value` on the command line. Unknown keys, wrong types
and missing files raise `RecipeError` naming `file:line`, the key and the closest valid key, before any
model loads.

A recipe is code: `launch.command` runs the command line it gives (accelerate, torchrun) with the
user's rights. Run only recipes you trust, as you would a script.

The run directory:

    runs/NAME/recipe.yaml             the fully resolved recipe
    runs/NAME/1-critique/records.jsonl + manifest.json
    runs/NAME/2-sft/model/             + manifest.json
    runs/NAME/3-feedback/prefs.jsonl   + manifest.json
    runs/NAME/4-pm/model/              + manifest.json
    runs/NAME/5-rl/model/  (or 5-dpo/) + manifest.json
    runs/NAME/6-eval/                  metrics.json, report.html, report.md, *.png
    runs/NAME/run.json                 what each stage did in the last `cai run` and how long it took

Skipping and resuming are the stages' own (their manifests, `cai.manifest`). The runner adds what only it knows:
when a stage's manifest no longer matches (its options or an upstream output changed), the stage's
directory belongs to this run, so it is discarded and the stage runs again; every stage after it then
sees changed inputs and runs again too.
"""

import dataclasses
import difflib
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.errors import ModelError, RecipeError, ResumeMismatch
from cai.paths import bundled, read_input_text, yaml_loader

# ----------------------------------------------------------------------------- the stage registry


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage as the runner sees it.

    `wiring` maps a config field to where its value comes from in a recipe:
    `model` / `judge` / `constitution` (top-level keys), `data.KEY` (a prompt or preference file),
    `out.STAGE` (that stage's output in the run directory; the recipe must run STAGE or set the field),
    `out?.STAGE` (the same, left at the field's default when the recipe does not run STAGE),
    `models` (eval's model list: base plus the output of each policy stage the recipe runs),
    `A|B` (the first of A and B that gives a value: rl reads the filter's prompts when the recipe runs it).
    Wired values are defaults: the recipe's stage mapping may override any of them except `out`.
    """

    name: str
    directory: str  # subdirectory of the run directory
    module: str  # imported only when the stage's config is needed
    output: str  # cfg.out, relative to the stage directory ("" = the directory itself)
    wiring: dict[str, str] = field(default_factory=dict)
    product: str | None = None  # what later stages read, relative to the stage directory (None = output)
    config: str | None = None  # config class name (None = the module's one *Config dataclass)
    function: str = "run"  # the stage's run(cfg, ctx) in the module
    loader: Callable[[], tuple[type, Callable]] | None = None  # tests plug fake stages in here

    def load(self) -> tuple[type, Callable]:
        """(config class, run function), imported now."""
        if self.loader is not None:
            return self.loader()
        module = importlib.import_module(self.module)
        if self.config:
            return getattr(module, self.config), getattr(module, self.function)
        configs = [value for name, value in vars(module).items()
                   if name.endswith("Config") and dataclasses.is_dataclass(value)
                   and value.__module__ == module.__name__]
        if len(configs) != 1:
            raise RuntimeError(f"{self.module} defines {len(configs)} *Config dataclasses -- name one in StageSpec.config")
        return configs[0], getattr(module, self.function)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("critique", "1-critique", "cai.stages.critique", "records.jsonl",
              {"prompts": "data.red_team", "model": "model", "constitution": "constitution"}),
    StageSpec("sft", "2-sft", "cai.stages.sft", "model",
              {"data": "out.critique", "model": "model", "helpful": "data.helpful"}),
    StageSpec("feedback", "3-feedback", "cai.stages.feedback", "prefs.jsonl", config="FeedbackConfig",
              wiring={"prompts": "data.red_team", "model": "out.sft", "judge": "judge",
                      "constitution": "constitution"}),
    StageSpec("pm", "4-pm", "cai.stages.pm", "", product="model", config="PMTrainConfig", function="run_train",
              wiring={"ai": "out.feedback", "human": "data.human_prefs", "model": "model"}),
    StageSpec("filter", "5-filter", "cai.stages.filter", "", product="prompts.jsonl",
              wiring={"prompts": "data.rl_prompts", "model": "out?.sft|model"}),
    StageSpec("rl", "5-rl", "cai.stages.rl", "", product="model",
              wiring={"model": "out.sft", "pm": "out.pm", "prompts": "out?.filter|data.rl_prompts",
                      "constitution": "constitution"}),
    StageSpec("dpo", "5-dpo", "cai.stages.dpo", "model",
              {"model": "out.sft", "ai": "out.feedback", "human": "data.human_prefs"}),
    StageSpec("eval", "6-eval", "cai.stages.evaluate", "",
              {"models": "models", "harmful": "data.eval_harmful", "benign": "data.eval_benign",
               "verifiable": "data.eval_verifiable", "judge": "judge", "constitution": "constitution",
               "pm": "out?.pm"}),
)

DEFAULT_STAGES = ["critique", "sft", "feedback", "pm", "rl", "eval"]
# Labels of the models eval compares, in order, and the stage whose output each one is.
EVAL_MODELS = (("base", None), ("sl", "sft"), ("rl", "rl"), ("dpo", "dpo"))

DATA_KEYS = {
    "red_team": ("data/red_team_prompts.jsonl", "harmful requests for critique, feedback and RL"),
    "helpful": ("data/helpful_prompts.jsonl", "ordinary requests mixed into SFT so the model stays helpful"),
    "human_prefs": ("data/helpful_prefs_example.jsonl", "human helpfulness comparisons mixed into the PM/DPO"),
    "rl_prompts": (None, "prompts for RL rollouts (a file or a list); null = red_team and helpful"),
    "eval_harmful": ("data/eval_harmful.jsonl", "held-out harmful requests for eval"),
    "eval_benign": ("data/eval_benign.jsonl", "held-out benign requests for eval (over-refusal)"),
    "eval_verifiable": (None, "held-out problems with `answer`/`tests` for eval's pass@k; null = none"),
}

TOP_LEVEL = {
    "name": "run name: the directory under runs/ (default: the recipe file's name)",
    "description": "free text",
    "model": "base model reference (embedded:NAME, hub id or directory)",
    "judge": "feedback and eval judge model; null = the base model",
    "constitution": "constitution file or bundled name",
    "seed": "seed every stage uses",
    "quantize": "4bit or null, for every stage that takes --quantize",
    "device": "cpu, cuda, cuda:N; null = CUDA when present",
    "stages": "which stages to run, in order (dpo may replace pm + rl)",
    "data": "input files: " + ", ".join(DATA_KEYS),
    "launch": "run some stages through a launcher: {command: 'accelerate launch --config_file F', stages: [sft, ...]}",
}
LAUNCH_KEYS = ("command", "stages")
# Set in a stage process started by a `launch:` command, so it runs the stage instead of launching again.
LAUNCHED_ENV = "CAI_LAUNCHED"
# Top-level keys copied into every stage config that has a field of the same name (unless the stage sets it).
SHARED_FIELDS = ("seed", "quantize")
# Config fields the runner owns: never read from a recipe.
RUNNER_FIELDS = ("out", "force")
# Stage fields that name an input, checked when a recipe's stage section or --set gives them, as the
# top-level `model`, `judge`, `constitution` and `data` are: a typo must fail at load, not after the runner
# has discarded that stage's finished output to redo it with the new value.
INPUT_FILE_FIELDS = ("prompts", "data", "ai", "human", "helpful", "harmful", "benign", "verifiable")
MODEL_FIELDS = ("model", "judge", "pm")
# Old names of stage keys: a recipe that uses one fails naming the current key, rather than having its
# value dropped or read with another meaning.
RENAMED = {"feedback": {"policy": "model", "samples_temperature": "temperature", "samples_top_p": "top_p"},
           "rl": {"policy": "model", "checkpoint_every": "save_steps"},
           "dpo": {"policy": "model", "batch_size": "per_device_train_batch_size", "loss": "loss_type"},
           "sft": {"batch_size": "per_device_train_batch_size"}, "pm": {"batch_size": "per_device_train_batch_size"},
           "filter": {"policy": "model"}, "eval": {"sample_temperature": "temperature"}}


def stage_names(registry: tuple[StageSpec, ...] = STAGES) -> list[str]:
    return [spec.name for spec in registry]


# ----------------------------------------------------------------------------- recipes


@dataclass
class PlannedStage:
    spec: StageSpec
    config: Any  # the stage's config dataclass, fully resolved
    directory: Path
    explicit: frozenset[str] = frozenset()  # fields the recipe's stage section or --set gave

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"


@dataclass
class Recipe:
    path: Path
    name: str
    run_dir: Path
    top: dict[str, Any]  # resolved top-level values (model, constitution, seed, data...)
    stages: list[PlannedStage]

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.spec.name == name)

    def resolved(self) -> dict[str, Any]:
        """The recipe with every value filled in, as written to runs/NAME/recipe.yaml (loadable again)."""
        out: dict[str, Any] = {k: v for k, v in self.top.items() if v is not None or k in ("judge", "quantize")}
        out["stages"] = [s.spec.name for s in self.stages]
        for planned in self.stages:
            # Wired and shared values are left to the top level, which gives them again on loading: baked
            # in, a copy run under another --name would read the first run's outputs, and a top-level
            # --set (seed=7, model=..., data.*) would not reach the stages.
            derived = {*planned.spec.wiring, *SHARED_FIELDS} - planned.explicit
            out[planned.spec.name] = {f.name: _plain(getattr(planned.config, f.name))
                                      for f in dataclasses.fields(planned.config)
                                      if f.name not in RUNNER_FIELDS and f.name not in derived}
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Problems:
    """Collects every problem in a recipe, each as `where: message`, so one run shows them all."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[tuple[int, str]] = []

    def at(self, node: yaml.Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        self.items.append((line, f"{self.path}:{line or 1}: {message}"))

    def cli(self, option: str, message: str) -> None:
        self.items.append((10**9, f"--set {option}: {message}"))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [text for _, text in sorted(self.items, key=lambda item: item[0])]
        head = lines[0] if len(lines) == 1 else f"{len(lines)} problems in the recipe:\n" + "\n".join(lines)
        raise RecipeError(head)


def _closest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"did you mean `{match[0]}`?" if match else f"valid keys: {', '.join(candidates)}"


def _missing_recipe_hint(path: Path) -> str:
    """The bundled recipe nearest the name given (`recipes/dem.yaml` -> recipes/demo.yaml), else where the
    examples are."""
    names = sorted(recipe.stem for recipe in bundled("recipes").glob("*.yaml"))
    match = difflib.get_close_matches(path.stem, names, n=1)
    return f"did you mean recipes/{match[0]}.yaml?" if match else "see recipes/ for examples (recipes/smoke.yaml)"


RUN_NAME = re.compile(r"[A-Za-z0-9_-]+")
MAX_RECIPE_BYTES = 2**20  # a recipe is a page of YAML; 1 MB is far past any real one


def _compose(path: Path) -> yaml.MappingNode:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file -- {_missing_recipe_hint(path)}")
    text = read_input_text(path, RecipeError, "recipe YAML file", MAX_RECIPE_BYTES)
    try:
        root = yaml.compose(text, Loader=yaml_loader())
        _check_keys(root, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RecipeError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML "
                          f"({getattr(exc, 'problem', exc)}) -- check indentation and quoting") from None
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply to read -- a recipe nests a few levels at most") from None
    if root is None:
        raise RecipeError(f"{path}:1: the recipe is empty -- see recipes/smoke.yaml for an example")
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{path}:1: a recipe is a YAML mapping (model:, stages:, data:, one mapping per stage)")
    return root


def _check_keys(node: yaml.Node, path: Path) -> None:
    """Every mapping key in the tree is a plain scalar: `[a, b]: 1` is a YAML mapping key no recipe means."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"{path}:{key_node.start_mark.line + 1}: a key must be a plain name, not a "
                                  "list or a mapping -- check the brackets and the indentation")
            _check_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item, path)


def _value(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _parse_set(option: str, problems: _Problems) -> tuple[list[str], Any] | None:
    if "=" not in option:
        problems.cli(option, "expected KEY=VALUE, e.g. --set sft.epochs=2")
        return None
    key, text = option.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


# -- types -------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if tp is Path:
        return "a path"
    return getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted value) for a YAML value against a config field's annotation.

    int is accepted for float (and converted), and so is a string in exponent notation; a path field takes
    a string; bool is not an int."""
    if tp is Any or tp is object:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = check_type(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False, value
        args = typing.get_args(tp)
        if not args:
            return True, value
        converted = []
        for item in value:
            ok, item_value = check_type(item, args[0])
            if not ok:
                return False, value
            converted.append(item_value)
        return True, converted if origin is list else tuple(converted)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # YAML 1.1 reads 5e-5 (no dot) as a string: how people write a learning rate.
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if tp is Path:
        return isinstance(value, str | Path), str(value) if isinstance(value, Path) else value
    return True, value


def _fields(config_class: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(config_class)
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(config_class)}


# -- resolution ---------------------------------------------------------------------------------------


def _constitution_problem(reference: str, problems: list[str]) -> str:
    """A constitution's first problem, and how many more there are: fixing them one `cai run` at a time
    would take as many runs."""
    more = (f" (and {len(problems) - 1} more: `cai constitution validate {reference}` lists them all)"
            if len(problems) > 1 else "")
    return f"constitution {reference!r}: {problems[0]}{more}"


def _reference_problem(key: str, value: Any, run_dir: Path | None = None) -> str | None:
    """What is wrong with a stage field that names a model or a constitution (None when nothing is, or
    when it is not such a field): the checks the top-level keys get, without loading anything. A model
    inside `run_dir` is an earlier stage's output of this run (`eval.models: [sl=runs/demo/2-sft/model]`),
    which need not exist before the run writes it: the stage that reads it checks it then."""
    if key == "constitution" and isinstance(value, str):
        from cai import constitution as constitution_module

        problems = constitution_module.validate(value)
        return _constitution_problem(value, problems) if problems else None
    if key in MODEL_FIELDS and isinstance(value, str):
        references = [value]
    elif key == "models" and isinstance(value, list):
        from cai.stages.evaluate import parse_model

        references = [parse_model(str(spec))[1] for spec in value]
    else:
        return None
    from cai.models import check_reference

    for reference in references:
        if not reference or reference.lower() == "none":  # rl/eval: `judge: none` turns the judge off
            continue
        if run_dir is not None and Path(reference).expanduser().resolve().is_relative_to(run_dir.resolve()):
            continue
        try:
            check_reference(reference)
        except ModelError as exc:
            return str(exc)
    return None


def _existing_path(value: str) -> Path | None:
    """A relative path is read from the current directory first, then from cai's bundled files. A hub
    dataset (`hf:...`) and a glob that matches are taken as given: their reader checks them."""
    from cai.errors import RecordsError
    from cai.records import HUB_PREFIX, input_source

    try:
        source = input_source(value)
    except RecordsError:  # `OWNER/NAME` without `hf:`: reported as a missing file
        return None
    if isinstance(source, str):
        return Path(value) if value.startswith(HUB_PREFIX) or glob.glob(os.path.expanduser(value)) else None
    path = source
    return path.resolve() if path.exists() else None


def _recipe_path(path: Path) -> Path:
    """The recipe as given, else cai's bundled copy: an installed cai carries recipes/ inside the package,
    so `cai run recipes/smoke.yaml` (or `cai run smoke`) works outside a source checkout too."""
    if path.exists():
        return path
    candidates = [bundled(str(path))]
    if path.suffix == "" and len(path.parts) == 1:
        candidates.append(bundled(f"recipes/{path}.yaml"))
    return next((candidate for candidate in candidates if candidate.exists()), path)


def load(path: str | Path, overrides: list[str] = (), *, name: str | None = None,
         runs_dir: str | Path = "runs", registry: tuple[StageSpec, ...] = STAGES) -> Recipe:
    """Read and check a recipe; build every stage's config. Loads no model; raises `RecipeError` with
    every problem found (unknown keys, wrong types, missing files), each naming `file:line`."""
    path = _recipe_path(Path(path))
    reader = _Reader(path, _compose(path), overrides, registry)
    top = reader.top_level(name)
    order = reader.stage_order()
    top["data"] = reader.data(order)
    reader.check_references(top)
    run_dir = Path(runs_dir) / top["name"]
    planned = [stage for stage in (reader.stage(name, top, order, run_dir) for name in order) if stage is not None]
    for spec in registry:  # options of stages this run leaves out: a typo there would surface only later
        if spec.name not in order and (spec.name in reader.nodes or spec.name in reader.cli_stage):
            reader.options(spec.name, check_files=False)
    reader.problems.raise_if_any()
    return Recipe(path=path, name=top["name"], run_dir=run_dir, top=top, stages=planned)


class _Reader:
    """Reads one recipe: the YAML node tree (for line numbers) and the --set overrides on top of it."""

    def __init__(self, path: Path, root: yaml.MappingNode, overrides: list[str], registry: tuple[StageSpec, ...]):
        self.problems = _Problems(path)
        self.reporters: dict[str, dict[str, Callable[[str], None]]] = {}  # stage -> key -> where it was given
        self.registry = registry
        self.by_name = {spec.name: spec for spec in registry}
        self.nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}  # top-level key -> (key node, value node)
        for key_node, value_node in root.value:
            key = key_node.value
            if key not in TOP_LEVEL and key not in self.by_name:
                self.problems.at(key_node, f"unknown key `{key}` -- {_closest(key, [*TOP_LEVEL, *self.by_name])}")
                continue
            if key in self.nodes:
                self.problems.at(key_node, f"key `{key}` appears twice -- keep one")
            self.nodes[key] = (key_node, value_node)
        # --set: KEY=VALUE for a top-level key, data.KEY=VALUE, or STAGE.FIELD=VALUE.
        self.cli_top: dict[str, Any] = {}
        self.cli_data: dict[str, Any] = {}
        self.cli_stage: dict[str, dict[str, tuple[str, Any]]] = {}
        for option in overrides:
            parsed = _parse_set(option, self.problems)
            if parsed is None:
                continue
            keys, value = parsed
            if len(keys) == 1 and keys[0] in TOP_LEVEL and keys[0] != "data":
                self.cli_top[keys[0]] = value
            elif len(keys) == 2 and keys[0] == "data":
                if keys[1] not in DATA_KEYS:
                    self.problems.cli(option, f"unknown data key `{keys[1]}` -- {_closest(keys[1], DATA_KEYS)}")
                self.cli_data[keys[1]] = value
            elif len(keys) == 2 and keys[0] in self.by_name:
                self.cli_stage.setdefault(keys[0], {})[keys[1]] = (option, value)
            else:
                self.problems.cli(option, f"`{'.'.join(keys)}` is not a recipe key -- use STAGE.KEY ("
                                          f"{_closest(keys[0], [*TOP_LEVEL, *self.by_name])}), data.KEY or a "
                                          "top-level key")

    def node(self, key: str) -> yaml.Node | None:
        return self.nodes[key][1] if key in self.nodes else None

    def value(self, key: str, default: Any, kind: Any) -> Any:
        """A top-level value: --set, else the recipe, else `default`; type-checked against `kind`."""
        if key in self.cli_top:
            ok, value = check_type(self.cli_top[key], kind)
            if not ok:
                self.problems.cli(f"{key}={self.cli_top[key]}", f"`{key}` must be {_type_name(kind)}")
            return value
        if key not in self.nodes:
            return default
        ok, value = check_type(_value(self.node(key)), kind)
        if not ok:
            self.problems.at(self.node(key), f"`{key}` must be {_type_name(kind)}, got {_value(self.node(key))!r}")
            return default
        return value

    def top_level(self, name: str | None) -> dict[str, Any]:
        top: dict[str, Any] = {
            "name": name or self.value("name", self.problems.path.stem, str),
            "description": self.value("description", None, str | None),
            "model": self.value("model", "embedded:smollm2-135m-instruct", str),
            "judge": self.value("judge", None, str | None),
            "constitution": self.value("constitution", "default", str),
            "seed": self.value("seed", 0, int),
            "quantize": self.value("quantize", None, str | None),
            "device": self.value("device", None, str | None),
            "launch": self.value("launch", None, dict | None),
        }
        if not RUN_NAME.fullmatch(top["name"]):
            rule = f"{top['name']!r} is not a run name: letters, digits, - and _ only (it names runs/NAME)"
            if name is not None:  # the flag wins over the recipe, so the flag is what to fix
                self.problems.items.append((0, f"--name {rule} -- e.g. --name my-run"))
            elif "name" in self.cli_top:
                self.problems.cli(f"name={top['name']}", f"{rule} -- e.g. --set name=my-run")
            elif self.node("name") is not None:
                self.problems.at(self.node("name"), f"name {rule} -- e.g. name: my-run")
            else:
                self.problems.at(None, f"the run is named after the recipe file, and {rule} -- add `name: my-run` "
                                       "to the recipe, or pass --name my-run")
        launch = top["launch"]
        if launch is not None:
            for key in launch:
                if key not in LAUNCH_KEYS:
                    self.problems.at(self.node("launch"), f"unknown key `{key}` in launch -- {_closest(key, LAUNCH_KEYS)}")
            if not isinstance(launch.get("command"), str) or not launch["command"].strip():
                self.problems.at(self.node("launch"), "launch.command must be a command line, e.g. accelerate "
                                                      "launch --config_file recipes/accelerate/multi-gpu.yaml")
            if not check_type(launch.get("stages"), list[str])[0]:
                self.problems.at(self.node("launch"), "launch.stages must be a list of stage names, e.g. [sft, pm]")
            else:
                for stage in launch["stages"]:
                    if stage not in self.by_name:
                        self.problems.at(self.node("launch"), f"unknown stage `{stage}` in launch.stages -- "
                                                              f"{_closest(stage, self.by_name)}")
        return top

    def stage_order(self) -> list[str]:
        """The stages to run, always in pipeline order."""
        stages = self.value("stages", list(DEFAULT_STAGES), list[str])
        for index, stage in enumerate(stages):
            if stage not in self.by_name:
                node = self.node("stages").value[index] if "stages" in self.nodes and "stages" not in self.cli_top \
                    else None
                self.problems.at(node, f"unknown stage `{stage}` in stages -- {_closest(stage, self.by_name)}")
        if len(set(stages)) != len(stages):
            self.problems.at(self.node("stages"), "a stage is listed twice in stages")
        return [spec.name for spec in self.registry if spec.name in stages]

    def data(self, order: list[str]) -> dict[str, Any]:
        """The input files, checked to exist now rather than after an hour of training."""
        data: dict[str, Any] = {key: default for key, (default, _) in DATA_KEYS.items()}
        data_nodes: dict[str, yaml.Node] = {}
        mapping = self.node("data")
        if mapping is not None and not isinstance(mapping, yaml.MappingNode):
            self.problems.at(mapping, "`data` must be a mapping like {red_team: FILE, eval_harmful: FILE}")
        elif mapping is not None:
            for key_node, value_node in mapping.value:
                key = key_node.value
                if key not in DATA_KEYS:
                    self.problems.at(key_node, f"unknown data key `{key}` -- {_closest(key, DATA_KEYS)}")
                    continue
                if key in data_nodes:
                    self.problems.at(key_node, f"key `data.{key}` appears twice -- keep one")
                value = _value(value_node)
                if not check_type(value, str | list[str] | None)[0] or value == []:
                    self.problems.at(value_node, f"`data.{key}` must be a file path (or a list of them), got {value!r}")
                    continue
                data[key], data_nodes[key] = value, value_node
        data.update(self.cli_data)
        derived_rl_prompts = data["rl_prompts"] is None  # then its files are checked as red_team's and helpful's
        if derived_rl_prompts:  # the paper trained RL on red-team and helpful prompts
            files = []
            for key in ("red_team", "helpful"):  # each a file, a list of them or null (left out)
                files += data[key] if isinstance(data[key], list) else [data[key]] if data[key] is not None else []
            data["rl_prompts"] = files or None
        needed = {source.split(".", 1)[1] for spec in self.registry if spec.name in order
                  for sources in spec.wiring.values() for source in sources.split("|") if source.startswith("data.")}
        for key in list(data):
            if data[key] is None:
                continue
            resolved = []
            for value in data[key] if isinstance(data[key], list) else [data[key]]:
                found = _existing_path(str(value))
                checked = key in needed and not (key == "rl_prompts" and derived_rl_prompts)
                if found is None and checked:
                    self._data_problem(key, data_nodes.get(key),
                                       f"data.{key}: no such file {value!r} -- check the path (relative paths are "
                                       "read from the current directory, then from cai's bundled files)")
                resolved.append(str(found) if found else value)
                if found is not None and checked:
                    self._check_format(key, found, data_nodes.get(key))
            data[key] = resolved if isinstance(data[key], list) else resolved[0]
        return data

    def _check_format(self, key: str, path: Path, node: yaml.Node | None) -> None:
        """Read the first record of a data file the way its stage will, so a preference file given as
        prompts (or the reverse) fails now, not after the stages before it have run for hours."""
        from cai.errors import RecordsError
        from cai.records import read_preferences, read_prompts

        try:
            if key == "human_prefs":
                read_preferences(path, limit=1)
            else:
                read_prompts(path, 1)
        except RecordsError as exc:
            self._data_problem(key, node, f"data.{key}: {exc}")

    def _data_problem(self, key: str, node: yaml.Node | None, message: str) -> None:
        """Report a problem with `data.KEY` where it was given: its --set option, else `node` in the recipe."""
        if key in self.cli_data:
            self.problems.cli(f"data.{key}", message)
        else:
            self.problems.at(node, message)

    def check_references(self, top: dict[str, Any]) -> None:
        """The constitution validates; model and judge paths exist (hub ids are checked when loaded)."""
        from cai import constitution as constitution_module

        reference = top["constitution"]
        problems = constitution_module.validate(reference)
        if problems:
            self.problems.at(self.node("constitution"), _constitution_problem(reference, problems))
        elif Path(reference).exists():
            top["constitution"] = str(Path(reference).resolve())
        from cai.models import check_reference

        for key in ("model", "judge"):
            reference = top[key]
            if not reference:
                continue
            try:
                local = check_reference(reference)
            except ModelError as exc:
                self.problems.at(self.node(key), f"`{key}`: {exc}")
                continue
            if local is not None:
                top[key] = str(Path(reference).expanduser().resolve())

    def options(self, stage: str, check_files: bool = True, run_dir: Path | None = None) -> dict[str, Any]:
        """`stage`'s options from the recipe's mapping and --set, each checked for its name, its type and
        (`check_files`) that an input file or model it names exists (a model in `run_dir`, this run's own
        output, once the run writes it)."""
        spec = self.by_name[stage]
        fields = _fields(spec.load()[0])
        values: dict[str, Any] = {}
        given: dict[str, tuple[Any, Callable[[str], None]]] = {}
        mapping = self.node(stage)
        if mapping is not None and not (isinstance(mapping, yaml.ScalarNode) and mapping.tag.endswith(":null")):
            if not isinstance(mapping, yaml.MappingNode):
                self.problems.at(mapping, f"`{stage}` must be a mapping of its options, e.g. {stage}: {{seed: 1}}")
            else:
                for key_node, value_node in mapping.value:
                    if key_node.value in given:  # YAML keeps the last one: say so rather than guess
                        self.problems.at(key_node, f"key `{stage}.{key_node.value}` appears twice -- keep one")
                    given[key_node.value] = (_value(value_node), lambda m, n=key_node: self.problems.at(n, m))
        for key, (option, value) in self.cli_stage.get(stage, {}).items():
            given[key] = (value, lambda m, o=option: self.problems.cli(o, m))
        allowed = [name for name in fields if name not in RUNNER_FIELDS]
        self.reporters[stage] = {key: report for key, (_, report) in given.items()}
        for key, (value, report) in given.items():
            if key in RENAMED.get(stage, {}) and key not in allowed:
                report(f"`{stage}.{key}` is renamed to `{RENAMED[stage][key]}`")
                continue
            if key not in allowed:
                report(f"unknown key `{key}` in {stage} -- {_closest(key, allowed)}")
                continue
            ok, converted = check_type(_fit(value, fields[key][1]), fields[key][1])  # `reward: pm:1` as on the CLI
            if not ok:
                report(f"`{stage}.{key}` must be {_type_name(fields[key][1])}, got {value!r}")
                continue
            choices = fields[key][0].metadata.get("choices")  # as the command line checks them
            if choices and converted is not None and converted not in choices:
                report(f"`{stage}.{key}` must be one of {', '.join(map(str, choices))}, got {value!r}")
                continue
            if check_files and (spec.wiring.get(key, "").startswith("data.") or key in INPUT_FILE_FIELDS) \
                    and isinstance(converted, str | list) and str(converted).lower() != "none":  # eval's none
                files = converted if isinstance(converted, list) else [converted]
                found = [_existing_path(str(file)) for file in files]
                missing = [file for file, path in zip(files, found, strict=True) if path is None]
                if missing:
                    report(f"`{stage}.{key}`: no such file {missing[0]!r} -- check the path")
                    continue
                converted = [str(p) for p in found] if isinstance(converted, list) else str(found[0])
            if check_files and (problem := _reference_problem(key, converted, run_dir)):
                report(f"`{stage}.{key}`: {problem}")
                continue
            values[key] = converted
        return values

    def stage(self, stage: str, top: dict[str, Any], order: list[str], run_dir: Path) -> PlannedStage | None:
        """One stage's config: dataclass default < wiring and shared top-level keys < recipe < --set."""
        spec = self.by_name[stage]
        config_class, _ = spec.load()
        fields = _fields(config_class)

        def output_of(name: str, product: bool = True) -> Path:
            other = self.by_name[name]
            directory = (run_dir / other.directory).resolve()
            relative = other.product if product and other.product is not None else other.output
            return directory / relative if relative else directory

        explicit = self.options(stage, run_dir=run_dir)  # the stage section and --set: they win over what is wired
        values: dict[str, Any] = {}
        for field_name, source in spec.wiring.items():
            if field_name not in fields:
                raise RuntimeError(f"recipe wiring: {config_class.__name__} has no field {field_name!r} "
                                   f"(update StageSpec({stage!r}).wiring in cai/recipe.py)")
            wired = _wired_value(source, top, order, output_of)
            if wired is not _MISSING:
                wired = _fit(wired, fields[field_name][1])
                if not check_type(wired, fields[field_name][1])[0] and field_name not in explicit:
                    self._data_problem(source.split(".", 1)[1], self.node("data"),
                                       f"`{source}` feeds `{stage}.{field_name}`, which takes one file, got {wired!r} "
                                       f"-- give one file (join the files into one), or set {stage}.{field_name}")
                    continue
                values[field_name] = wired
        for shared in SHARED_FIELDS:
            if shared in fields and top.get(shared) is not None:
                values[shared] = top[shared]
        values.update(explicit)
        for field_name, source in spec.wiring.items():  # an upstream output this recipe does not produce
            if source.startswith("out.") and field_name not in values:
                self.problems.at(self.node("stages"), f"{stage} needs {source[4:]}'s output (`{stage}.{field_name}`) "
                                                      f"-- add {source[4:]} to stages, or set {stage}.{field_name}")
        values["out"] = str(output_of(stage, product=False))
        if self.problems.items:
            return None
        try:
            config = config_class(**values)
        except TypeError as exc:  # a required field the recipe does not set
            self.problems.at(self.nodes[stage][0] if stage in self.nodes else None, f"{stage}: {exc}")
            return None
        except Exception as exc:  # ConfigError from __post_init__: a combination that cannot work
            self._report_at_key(stage, str(exc))(f"{stage}: {exc}")
            return None
        return PlannedStage(spec, config, (run_dir / spec.directory).resolve(), frozenset(explicit))

    def _report_at_key(self, stage: str, message: str) -> Callable[[str], None]:
        """Where to report a config check's error: the line (or --set) of the first option it names by its
        flag (`--key-name`, as the command line spells it and a stage's checks write); else the stage's mapping."""
        from cai.stages.base import option_flag

        flags = {name: option_flag(f) for name, (f, _) in _fields(self.by_name[stage].load()[0]).items()}
        named = []
        for key, report in self.reporters.get(stage, {}).items():
            found = re.search(rf"--{re.escape(flags.get(key, key))}(?![\w-])", message)
            if found:
                named.append((found.start(), report))
        if named:
            return min(named, key=lambda item: item[0])[1]
        return lambda m: self.problems.at(self.node(stage), m)


_MISSING = object()


def _fit(value: Any, tp: Any) -> Any:
    """A value shaped for its field: one string given to a list field (a wired path, `reward: pm:1`)
    becomes a list of one."""
    if isinstance(value, str) and not check_type(value, tp)[0] and check_type([value], tp)[0]:
        return [value]
    return value


def _wired_value(source: str, top: dict[str, Any], order: list[str], output_of: Callable[[str], Path]) -> Any:
    if "|" in source:  # "out?.filter|data.rl_prompts": the first source that gives a value
        for each in source.split("|"):
            if (value := _wired_value(each, top, order, output_of)) is not _MISSING:
                return value
        return _MISSING
    if source in ("model", "constitution"):
        return top[source]
    if source == "judge":
        return top["judge"] or top["model"]
    if source.startswith("data."):
        value = top["data"][source[5:]]
        return _MISSING if value is None else value
    if source.startswith(("out.", "out?.")):
        stage = source.split(".", 1)[1]
        return str(output_of(stage)) if stage in order else _MISSING
    if source == "models":
        models = [f"base={top['model']}"]
        models += [f"{label}={output_of(stage)}" for label, stage in EVAL_MODELS if stage and stage in order]
        return models
    raise RuntimeError(f"unknown wiring source {source!r}")


# ----------------------------------------------------------------------------- running


@dataclass
class StageOutcome:
    name: str
    seconds: float
    skipped: bool
    summary: str
    outputs: dict[str, str]
    counts: dict[str, int]
    metrics: dict[str, Any]


@dataclass
class RunResult:
    recipe: Recipe
    outcomes: list[StageOutcome]

    @property
    def report_path(self) -> Path | None:
        for outcome in self.outcomes:
            if "report_html" in outcome.outputs:
                return Path(outcome.outputs["report_html"])
        candidate = self.recipe.run_dir / "6-eval" / "report.html"
        return candidate if candidate.exists() else None


# Called as on_stage(index, total, stage_name) before each stage runs (index from 0).
StageCallback = Callable[[int, int, str], None]


def select(recipe: Recipe, from_stage: str | None = None, only: str | None = None) -> list[PlannedStage]:
    names = [s.spec.name for s in recipe.stages]
    for option, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in names:
            raise RecipeError(f"{option} {value}: not a stage of this recipe -- use one of: {', '.join(names)}")
    if from_stage and only:
        raise RecipeError("--from and --only do not combine -- use one")
    if only:
        return [recipe.stage(only)]
    if from_stage:
        return recipe.stages[names.index(from_stage):]
    return list(recipe.stages)


def write_resolved(recipe: Recipe) -> Path:
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    target = recipe.run_dir / "recipe.yaml"
    header = (f"# Resolved from {recipe.path} by `cai run`: every option of every stage, defaults included;\n"
              "# inputs wired between stages (and model, constitution, seed) follow from the top-level keys.\n"
              f"# Run it again with: cai run {target}\n")
    target.write_text(header + yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True, width=110))
    return target


def _run_command(recipe: Recipe) -> str:
    """The `cai run` command line that runs this recipe into this run directory."""
    command = f"cai run {shlex.quote(str(recipe.path))}"
    if recipe.run_dir.parent.resolve() != Path("runs").resolve():
        command += f" --runs-dir {shlex.quote(str(recipe.run_dir.parent))}"
    return command + f" --name {shlex.quote(recipe.name)}"


def run(recipe: Recipe, reporter, *, from_stage: str | None = None, only: str | None = None,
        force: bool = False, on_stage: StageCallback | None = None) -> RunResult:
    """Run the selected stages in order.

    Every stage skips itself when its manifest is complete and matches (no work at all) and resumes a
    partial one. `force` discards the selected stages' directories first; `from_stage` re-runs that
    stage and every one after it (forced), leaving earlier ones alone.
    """
    from cai.manifest import lock, unlock

    # One `cai run` writes a run directory at a time; the processes a `launch:` command starts run inside it.
    key = None if os.environ.get(LAUNCHED_ENV) else lock(recipe.run_dir, fix="choose another --name")
    try:
        return _run_selected(recipe, reporter, from_stage, only, force, on_stage)
    finally:
        if key is not None:
            unlock(key)


def _run_selected(recipe: Recipe, reporter, from_stage: str | None, only: str | None, force: bool,
                  on_stage: StageCallback | None) -> RunResult:
    from cai.manifest import discard_outputs
    from cai.stages.base import StageContext

    selected = select(recipe, from_stage, only)
    selected_names = {s.spec.name for s in selected}
    for planned in recipe.stages:  # stages not run now must have finished before
        if planned.spec.name in selected_names:
            break
        if not _complete(planned.manifest_path):
            raise RecipeError(f"stage {planned.spec.name} has not finished in {recipe.run_dir} -- run "
                              f"`{_run_command(recipe)}` (without --from/--only) first")
    if only:
        upstream = {source.split(".", 1)[1] for sources in recipe.stage(only).spec.wiring.values()
                    for source in sources.split("|") if source.startswith(("out.", "out?."))}
        for planned in recipe.stages:
            if planned.spec.name in upstream and not _complete(planned.manifest_path):
                raise RecipeError(f"--only {only}: stage {planned.spec.name} has not finished in {recipe.run_dir} "
                                  f"-- run `{_run_command(recipe)}` first")
    write_resolved(recipe)
    outcomes: list[StageOutcome] = []
    for index, planned in enumerate(selected):
        if on_stage:
            on_stage(index, len(selected), planned.spec.name)
        if force or from_stage:
            discard_outputs(planned.directory)
        started = time.time()
        if _launched_elsewhere(recipe, planned.spec.name):
            result = _launch(recipe, planned, reporter)
            outcome = StageOutcome(planned.spec.name, round(time.time() - started, 2), result.skipped,
                                   result.summary, dict(result.outputs), dict(result.counts), dict(result.metrics))
            outcomes.append(outcome)
            reporter.log(f"{planned.spec.name}: {result.summary} [{outcome.seconds:.0f} s]")
            _record_outcomes(recipe, outcomes)
            continue
        _, run_fn = planned.spec.load()
        context = StageContext(reporter=reporter, manifest_path=planned.manifest_path, device=recipe.top["device"])
        try:
            result = run_fn(planned.config, context)
        except ResumeMismatch as exc:
            # The directory belongs to this run and was made from an older recipe or older upstream
            # outputs: what it holds is stale by definition, so start the stage over.
            changed = "; ".join(exc.changes) or "its options or inputs"
            reporter.log(f"{planned.spec.name}: changed since the last run ({changed}); "
                         f"discarding {planned.directory.name}/ and running it again")
            discard_outputs(planned.directory)
            result = run_fn(planned.config, context)
        outcome = StageOutcome(planned.spec.name, round(time.time() - started, 2), result.skipped, result.summary,
                               dict(result.outputs), dict(result.counts), dict(result.metrics))
        outcomes.append(outcome)
        reporter.log(f"{planned.spec.name}: {result.summary} [{outcome.seconds:.0f} s]")
        _record_outcomes(recipe, outcomes)
    return RunResult(recipe, outcomes)


def _launched_elsewhere(recipe: Recipe, stage: str) -> bool:
    launch = recipe.top.get("launch")
    return bool(launch) and stage in launch["stages"] and not os.environ.get(LAUNCHED_ENV)


def launch_command(recipe: Recipe, stage: str) -> list[str]:
    """The command that runs one stage through the recipe's launcher (accelerate, torchrun...): the
    launcher runs `-m cai run runs/NAME/recipe.yaml --only STAGE` in each of its processes."""
    resolved = recipe.run_dir / "recipe.yaml"
    return [*shlex.split(recipe.top["launch"]["command"]), "-m", "cai", "run", str(resolved), "--only", stage,
            "--runs-dir", str(recipe.run_dir.parent), "--name", recipe.name]


def _launch(recipe: Recipe, planned: PlannedStage, reporter):
    from cai.manifest import read_result

    command = launch_command(recipe, planned.spec.name)
    reporter.log(f"{planned.spec.name}: launching {' '.join(shlex.quote(c) for c in command)}")
    completed = subprocess.run(command, env={**os.environ, LAUNCHED_ENV: "1"})
    if completed.returncode != 0:
        raise RecipeError(f"{planned.spec.name}: the launched command exited with {completed.returncode} -- its "
                          f"output is above; fix it and run again (finished work is kept)")
    if (result := read_result(planned.manifest_path)) is None:
        raise RecipeError(f"{planned.spec.name}: the launched command wrote no complete manifest at "
                          f"{planned.manifest_path}")
    return result


def _complete(manifest_path: Path) -> bool:
    try:
        return json.loads(manifest_path.read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def _record_outcomes(recipe: Recipe, outcomes: list[StageOutcome]) -> None:
    """runs/NAME/run.json: what each stage of the last `cai run` did and how long it took."""
    data = {"name": recipe.name, "recipe": str(recipe.path), "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "stages": [dataclasses.asdict(o) for o in outcomes]}
    (recipe.run_dir / "run.json").write_text(json.dumps(data, indent=2, default=str))


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Lines for a person: refusal of harmful requests, over-refusal of benign ones and Elo, for the prompt
    kinds the eval had; greedy pass@1 and pass@k on verifiable problems, with the last model's ratio to the first."""
    models = metrics.get("models", {})
    labels = list(models)

    def series(key: str, values=lambda label: models[label]) -> str:
        parts = [f"{label} {values(label)[key] * 100:.0f}%" for label in labels if values(label).get(key) is not None]
        return " -> ".join(parts) if parts else "n/a"

    verifiable = {label: models[label].get("verifiable") or {} for label in labels}
    lines = []
    for key, title in (("harmful_refusal_rate", "harmful requests refused"),
                       ("benign_refusal_rate", "benign requests refused (over-refusal)")):
        if series(key) != "n/a" or not any(verifiable.values()):
            lines.append(f"{title}: {series(key)}")
    if any(verifiable.values()):
        first, last = verifiable[labels[0]].get("pass@1"), verifiable[labels[-1]].get("pass@1")
        ratio = f" ({last / first:.2f}x)" if first and last is not None and len(labels) > 1 else ""
        lines.append(f"verifiable problems solved, greedy pass@1: {series('pass@1', verifiable.get)}{ratio}")
        k = next((v["k"] for v in verifiable.values() if "k" in v), None)
        if k is not None:
            lines.append(f"pass@{k} (from {verifiable[labels[0]].get('n')} samples): "
                         f"{series('pass@k', verifiable.get)}; all@{k}: {series('all@k', verifiable.get)}")
        return lines
    elo = metrics.get("elo") or {}
    if elo:
        lines.append("harmlessness Elo (judge): " + ", ".join(f"{label} {elo[label]:.0f}" for label in labels
                                                               if label in elo))
    else:
        lines.append("harmlessness Elo: n/a (no judge, or no comparison it could judge)")
    return lines
