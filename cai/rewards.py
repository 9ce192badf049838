"""Reward functions for RL (stage 4), and the monitors that watch for reward hacking.

Every reward is a callable with trl's reward-function signature,

    reward(prompts, completions, **columns) -> list[float | None]    # one value per completion

where `prompts` are conversations (lists of messages), `completions` are `[{"role": "assistant",
"content": ...}]` lists (or plain strings), and `columns` holds the dataset's other columns, one value
per completion (`answer`, `tests`), plus what trl adds (`completion_ids`, `trainer_state`, `log_metric`).
None means "does not apply to this item" (a maths reward on a prompt without an `answer`).

- `PreferenceModelReward`: the PM's scalar score. The conversation is re-rendered with the PM's OWN
  tokenizer and chat template: a PM trained on one template and fed text rendered with the policy's
  scores garbage without any error (a known trl pitfall).
- verifiable: `math_reward` (the final number equals the record's `answer`), `CodeReward` (the answer's
  code block passes the record's `tests` in a sandboxed subprocess), `FormatReward` (well-formed, not
  truncated), `LengthPenalty` (beyond a target length).
- `CombinedReward`: a weighted sum of named parts (`--reward NAME:WEIGHT`), which also reports each
  part's mean and hands each batch to observers (the hacking monitors).
- monitors: `boilerplate_share`, `slope`, `ContrastJudgeScore` (a held-back judge that is never
  optimised), and `hacking_warnings`, which reads the per-step metrics and says what looks wrong.

The text rewards and monitors are pure functions of their inputs, unit-tested without a model.
"""

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

from cai.errors import ConfigError, ModelError
from cai.records import Message, as_messages

RewardFn = Callable[..., list[float | None]]

REWARD_NAMES = ("pm", "math", "code", "format", "length")

# ----------------------------------------------------------------------------- inputs as trl passes them


def completion_text(completion: str | list[Message]) -> str:
    """The assistant's text from a trl completion: a string, or a list of messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def prompt_messages(prompt: str | list[Message]) -> list[Message]:
    return as_messages(prompt)


# ----------------------------------------------------------------------------- reward specs and mixing


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """`"pm:1"` -> `("pm", 1.0)`; a bare name means weight 1. Unknown names and bad weights raise ConfigError."""
    name, _, weight_text = spec.partition(":")
    name = name.strip().lower()
    if name not in REWARD_NAMES:
        raise ConfigError(f"--reward {spec!r}: unknown reward {name!r} -- use one of {', '.join(REWARD_NAMES)} "
                          "as NAME:WEIGHT, e.g. --reward pm:1 --reward format:0.2")
    try:
        weight = float(weight_text) if weight_text.strip() else 1.0
    except ValueError:
        raise ConfigError(f"--reward {spec!r}: weight {weight_text!r} is not a number -- write NAME:WEIGHT, "
                          "e.g. math:0.5") from None
    if not math.isfinite(weight) or weight == 0:
        raise ConfigError(f"--reward {spec!r}: weight must be a finite non-zero number -- drop the reward instead "
                          "of giving it weight 0")
    return name, weight


def weighted_sum(values: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float]:
    """Combine per-part rewards: `values[k][i]` is part k's reward for completion i (None = not applicable).

    Result i is sum_k weights[k] * values[k][i] over the parts that apply to i; 0.0 if none applies
    (an item no reward speaks about carries no signal, and GRPO/RLOO give a flat group zero advantage).
    Shapes: values (K parts, N completions), weights (K,) -> (N,).
    """
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} reward parts but {len(weights)} weights")
    if not values:
        return []
    count = len(values[0])
    if any(len(v) != count for v in values):
        raise ValueError("every reward part must return one value per completion")
    totals = []
    for i in range(count):
        total = 0.0
        for part, weight in zip(values, weights, strict=True):
            value = part[i]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                total += weight * float(value)
        totals.append(total)
    return totals


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(present) / len(present) if present else None


@dataclass
class RewardBatch:
    """What one reward call saw and returned: handed to observers (monitors)."""

    prompts: list[list[Message]]
    completions: list[str]
    parts: dict[str, list[float | None]]  # reward name -> one value per completion (unweighted)
    totals: list[float]  # weighted sum
    step: int | None  # trainer global step when trl passed its state


class CombinedReward:
    """A weighted sum of named reward parts, as one trl reward function.

        reward = CombinedReward([("pm", pm_reward, 1.0), ("format", FormatReward(), 0.2)])
        reward(prompts, completions, **columns) -> [float, ...]

    Each part's unweighted mean reaches trl's metrics (`log_metric`, as `reward_<name>`), and every batch
    is passed to `observers` (callables taking a `RewardBatch`), which is how the monitors see the
    completions without a second pass.
    """

    __name__ = "cai"  # the name trl logs this function under (rewards/cai/mean)

    def __init__(self, parts: Sequence[tuple[str, RewardFn, float]],
                 observers: Sequence[Callable[[RewardBatch], None]] = ()):
        if not parts:
            raise ConfigError("no reward given -- pass at least one --reward NAME:WEIGHT")
        names = [name for name, _, _ in parts]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards {names} name one reward twice -- give each reward once")
        self.parts = list(parts)
        self.observers = list(observers)

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, _, weight in self.parts}

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        values = {name: list(fn(prompts, completions, **kwargs)) for name, fn, _ in self.parts}
        totals = weighted_sum(list(values.values()), [w for _, _, w in self.parts])
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for name, part in values.items():
                mean = _mean(part)
                if mean is not None:
                    log_metric(f"reward_{name}", mean)
        state = kwargs.get("trainer_state")
        batch = RewardBatch(prompts=[prompt_messages(p) for p in prompts],
                            completions=[completion_text(c) for c in completions], parts=values, totals=totals,
                            step=getattr(state, "global_step", None))
        for observer in self.observers:
            observer(batch)
        return totals


# ----------------------------------------------------------------------------- preference model


def pm_directory(path: str | Path) -> Path:
    """The model directory of a PM: `DIR` itself, or `DIR/model` when given a `cai pm train` output directory."""
    from cai.models import model_directory, unfinished_run

    path = Path(path).expanduser()
    directory = model_directory(path)
    if directory is not None:
        try:
            architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            architectures = []
        # A causal LM here (`--pm sl/model` for `--pm pm/model`) would load with a random score head.
        if any(name.endswith("ForCausalLM") for name in architectures):
            raise ModelError(f"{directory}: a language model ({architectures[0]}), not a preference model "
                             "-- pass the directory `cai pm train --out` wrote")
        return directory
    if path.is_dir() and (unfinished := unfinished_run(path)) is not None:
        raise ModelError(unfinished)
    raise ModelError(f"{path}: no preference model there (no config.json in it or in {path / 'model'}) -- "
                     "pass the directory `cai pm train --out` wrote")


# Written by `cai pm train` into the PM directory (cai.stages.pm.PM_INFO): how it was trained, max_length included.
PM_INFO = "cai-pm.json"
PM_MAX_LENGTH = 2048  # tokens given to a PM that does not say what it was trained on (one not made by cai)


class PreferenceModelReward:
    """The preference model's score of each (conversation, answer), as a trl reward function.

    Loaded once. Each conversation plus the answer is rendered with the PM's own tokenizer and chat
    template (`render`), whatever the policy's template is, then scored in batches (sorted by length,
    right-padded, no gradient), as `cai pm train` fed it. A text longer than the PM's `max_length` (the
    one it was trained with, from its `cai-pm.json`) keeps its last tokens, where the answer is.
    """

    __name__ = "pm"

    def __init__(self, model_dir: str | Path, *, device: str | None = None, batch_size: int = 16,
                 max_length: int | None = None, model=None, tokenizer=None):
        if model is None:
            from cai.models import load_sequence_classifier

            directory = pm_directory(model_dir)
            model, tokenizer = load_sequence_classifier(str(directory), device=device)
            info = directory / PM_INFO
            if max_length is None and info.exists():
                max_length = json.loads(info.read_text()).get("max_length")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or PM_MAX_LENGTH
        self.last_texts: list[str] = []  # the texts of the last call, as the PM saw them (for inspection)

    def render(self, prompt: str | list[Message], completion: str | list[Message]) -> str:
        """The conversation and the answer in the PM's own chat template (the text it was trained on)."""
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """The PM's logit for each rendered text, in input order."""
        import torch

        encoded = [ids[-self.max_length:] for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
        scores: list[float] = [0.0] * len(texts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding, as the PM was trained
                    input_ids[row, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    attention[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                for row, i in enumerate(batch):  # logits: (B, 1)
                    scores[i] = float(logits[row, 0])
        return scores

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        self.last_texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_texts(self.last_texts)


# ----------------------------------------------------------------------------- maths

# A number as people write it: -12, 1,234.5, $3, 0.75, 3/4, 25%. Thousands need groups of exactly 3 digits,
# so "3, 4" is two numbers; a full stop ending a sentence is not a decimal point ("is 42.").
_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)?%?"
# Not after "^": the 2 of "m^2" is an exponent, not an answer.
_NUMBER_RE = re.compile(rf"(?<![\w.^])({_NUMBER})")
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# A sign may stand before the fraction (-\frac{1}{2}) as well as inside it.
_FRAC_RE = re.compile(r"([-−]\s*)?\\d?frac\s*\{\s*([-−]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_ANSWER_RE = re.compile(rf"answer(?:\s+is)?[\s:=*]*({_NUMBER})", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """`"$1,234.5"` -> 1234.5, `"-3/4"` -> -0.75, `"25%"` -> 25 (the percent sign is dropped). None if not
    one number (`"1, 2"` is two: commas count only between groups of three digits)."""
    text = text.strip().replace("{,}", ",")
    # Two numbers are not one: "1, 2" (a comma outside groups of three digits), "1 2".
    if re.search(r"\d\s+\d", text) or (re.search(r"\d\s*,\s*\d", text)
                                       and not re.search(r"\d{1,3}(?:,\d{3})+(?!\d)", text)):
        return None
    text = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    if not text:
        return None
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("-+")
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            if Fraction(denominator) == 0:
                return None
            return sign * Fraction(numerator) / Fraction(denominator)
        return sign * Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Fraction | None:
    """The answer a maths response commits to: the last `\\boxed{}`, else the last "the answer is N", else
    the last number in the text. None if there is no number."""
    text = text.replace("{,}", ",")  # LaTeX's thousands separator: 1{,}234
    boxed = _BOXED_RE.findall(text)
    if boxed:
        inner = boxed[-1]
        frac = _FRAC_RE.search(inner)
        if frac:
            return _fraction(frac)
        numbers = _NUMBER_RE.findall(inner)
        if numbers:
            return parse_number(numbers[-1])
    stated = _ANSWER_RE.findall(text)
    if stated:
        return parse_number(stated[-1])
    frac = list(_FRAC_RE.finditer(text))
    numbers = list(_NUMBER_RE.finditer(text))
    if frac and (not numbers or frac[-1].end() >= numbers[-1].end()):
        return _fraction(frac[-1])
    return parse_number(numbers[-1].group(1)) if numbers else None


def _fraction(match: re.Match) -> Fraction | None:
    """The value of a `_FRAC_RE` match, its leading sign included: a minus with nothing before it that it
    could subtract from (`= -\\frac{1}{2}`, not `3 - \\frac{1}{2}`)."""
    value = parse_number(f"{match.group(2)}/{match.group(3)}")
    before = match.string[:match.start()].rstrip()[-1:]
    negative = bool(match.group(1)) and not (before and (before.isalnum() or before in ")]}"))
    return -value if value is not None and negative else value


def numbers_equal(got: Fraction, expected: Fraction, relative: float = 1e-6) -> bool:
    """Exactly, for a whole-number answer (a tolerance would pass 1000001 for 1000000); else within
    `relative`, for a fraction the response wrote as a rounded decimal (0.333333 for 1/3)."""
    if expected.denominator == 1:
        return got == expected
    return abs(got - expected) <= relative * max(1, abs(expected))


def math_score(response: str, answer: Any) -> float:
    """1.0 if the response's final number equals `answer` (a number or a string such as "3/4"), else 0.0."""
    expected = parse_number(str(answer))
    if expected is None:
        raise ValueError(f"answer {answer!r} is not a number")
    got = final_number(response)
    return 1.0 if got is not None and numbers_equal(got, expected) else 0.0


def math_reward(prompts, completions, answer: Sequence[Any] | None = None, **kwargs) -> list[float | None]:
    """trl reward: `math_score` for records with an `answer`, None (not applicable) for the others."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None or str(a).strip() == "" else math_score(completion_text(c), a)
            for c, a in zip(completions, answers, strict=True)]


math_reward.__name__ = "math"

# ----------------------------------------------------------------------------- code in a sandbox

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
SANDBOX_OUTCOMES = ("passed", "failed", "error", "timeout", "crashed", "blocked", "no-code")
_BLOCKED_EXIT = 97  # the sandbox stopped the code doing something forbidden
_FAILED_EXIT = 98  # a test assertion failed
_ERROR_EXIT = 99  # the solution or the tests raised


def extract_code(text: str) -> str | None:
    """The last ```python (or ```py / unlabelled) block of a response; None if it has none."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [body for lang, body in blocks if lang in wanted]
        if chosen:
            return chosen[-1]
    return None


# The sandbox process runs this first: limits, then an audit hook that ends the process (exit 97) on any
# socket, subprocess, ctypes or signal use and on any write, delete or rename outside its own temporary
# directory. The hook exits rather than raising, so code that catches exceptions cannot shrug it off.
# Limits are set here rather than in a `preexec_fn`: that runs between fork and exec, which is unsafe in
# a parent with threads (a torch trainer has many).
#
# A pass is proved by a secret the parent sends, printed only once the tests have run. Code under test
# shares the interpreter, so the secret is kept where it cannot reach: read before the solution loads,
# stdin closed after it, held in the main thread's frame only, while the solution and then the tests run
# in threads of their own (a frame's f_back never leads to another thread's frames; the calls that do,
# sys._current_frames and gc's object walks, are denied, and so are tracing hooks that could skip an
# assert). Everything the runner calls after the code has run is bound before it runs (default
# arguments), and nothing it calls then is the code's: such a call would have the main frame as its
# f_back. Code run in a thread cannot install signal handlers (Python allows that in the main thread
# only). This is a guard against accidents and reward hacks, not a wall against a determined attacker:
# for untrusted code at scale, run the stage in a container as well.
_SANDBOX_RUNNER = r'''
import _thread, collections, itertools, os, resource, sys, time
def _guarded(code, namespace, _exec=exec, _write=os.write, _exit=os._exit, _repr=repr, _name=type, _str=str,
             _failed=AssertionError, _any=BaseException):
    try:
        _exec(code, namespace)
    except _failed as exc:
        _write(2, ("cai-sandbox: test failed: " + _repr(exc)[:300] + "\n").encode())
        _exit(98)
    except _any as exc:
        _write(2, ("cai-sandbox: raised " + _name(exc).__name__ + " " + _str(exc)[:300] + "\n").encode())
        _exit(99)
def _hook(root):
    denied = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
              "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "signal.pthread_kill", "os.setuid",
              "os.chroot", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
              "sys.settrace", "sys.setprofile", "sys.monitoring", "sys.remote_exec")
    path_events = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                   "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
                   "shutil.move": 2, "shutil.copyfile": 2, "shutil.copytree": 2, "os.chflags": 1, "os.mkfifo": 1}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, isdir, fsdecode, sep, write, exit_ = os.path.realpath, os.path.isdir, os.fsdecode, os.sep, os.write, os._exit
    def inside(path):
        if isinstance(path, int):
            return True
        try:
            real = realpath(fsdecode(path))
        except Exception:
            return False
        return real == root or real.startswith(root + sep)
    def deny(event, args):
        write(2, ("cai-sandbox: blocked " + event + " " + repr(args)[:200] + "\n").encode())
        exit_(97)
    def hook(event, args):
        if event.startswith(denied):
            deny(event, args)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if not inside(path):
                real = realpath(fsdecode(path))
                # A directory opened outside is a handle for writing there (dir_fd=); a process's memory
                # file holds its secrets.
                if writing or isdir(real) or (real.startswith("/proc/") and real.endswith("/mem")):
                    deny(event, args)
        elif event == "sqlite3.connect":
            database = fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else ""
            if database != ":memory:" and (database.startswith("file:") or not inside(database)):
                deny(event, args)
        elif event in path_events:
            for path in args[:path_events[event]]:
                if path is not None and not inside(path):
                    deny(event, args)
    return hook
def main(_guarded=_guarded, _hook=_hook, _write=os.write, _exit=os._exit, _start=_thread.start_new_thread,
         _count=_thread._count, _deque=collections.deque, _chain=itertools.chain, _map=map, _sleep=time.sleep):
    memory, cpu_seconds, max_file, proof = (int(a) for a in sys.argv[1:5])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nonce = sys.stdin.readline().strip()
    os.close(0)
    sys.stdin = open(os.devnull)  # input() reads an end of file, as with no input
    root = os.path.realpath(os.getcwd())
    with open("solution.py", encoding="utf-8") as f:
        solution = compile(f.read(), "solution.py", "exec")
    with open("tests.py", encoding="utf-8") as f:
        tests = compile(f.read(), "tests.py", "exec")
    sys.addaudithook(_hook(root))
    namespace = {"__name__": "solution"}
    for code in (solution, tests):
        done, before = [], _count()
        # The thread runs C calls only around the code (a deque draining chained maps): no Python frame
        # between the thread's start and the code holds `done`, so code walking f_back from its own frame
        # cannot mark itself finished; only the second map does, once the first has returned.
        _start(_deque, (_chain(_map(_guarded, (code,), (namespace,)), _map(done.append, ("ok",))),), {"maxlen": 0})
        seen = False  # the thread counted as running (it counts itself once it has started)
        while not done:
            running = _count() > before
            if seen and not running:  # ended without finishing (an exception past the guard)
                break
            seen = seen or running
            _sleep(0.0005)
        if done != ["ok"]:
            _exit(99)
    # Nothing the code could have replaced is called from here on: this frame holds the secret.
    _write(proof, ("\n" + nonce + "\n").encode())
    _exit(0)
main()
'''


@lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """`("unshare", "-rn")` where unprivileged network namespaces work (the code then has no network at
    all, a second wall behind the audit hook); `()` elsewhere. Probed once."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


@dataclass(frozen=True)
class SandboxResult:
    outcome: str  # one of SANDBOX_OUTCOMES
    detail: str = ""  # the last line of stderr, for a person reading why

    @property
    def score(self) -> float:
        return 1.0 if self.outcome == "passed" else 0.0


def run_tests(code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
              max_file_mb: int = 16) -> SandboxResult:
    """Run `code` then `tests` (asserts) in a separate Python process and say how it went.

    The process runs in a fresh temporary directory (deleted afterwards) with `python -I -B` (no
    environment, no user site, no bytecode writes), a wall-clock limit (killed after `timeout_s`), a CPU
    limit, an address-space limit of `memory_mb`, a file-size limit, no network (audit hook, and a network
    namespace where available) and no writes outside its directory. Only a run that reaches the end of the
    tests and prints the secret it was given counts as passed, so `os._exit(0)` in the solution fails.
    """
    nonce = secrets.token_hex(16)
    # No pipes the parent buffers: what the code prints goes nowhere (printing is no part of passing,
    # and a flood cannot fill the parent's memory); its errors, and the secret that proves a pass (on a
    # descriptor of its own), go to files the parent made outside the sandbox's directory, capped by the
    # file-size limit, which the code cannot open by name.
    with tempfile.TemporaryDirectory(prefix="cai-sandbox-") as workdir, \
            tempfile.TemporaryFile() as proof_file, tempfile.TemporaryFile() as stderr_file:
        work = Path(workdir)
        (work / "runner.py").write_text(_SANDBOX_RUNNER, encoding="utf-8")
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        command = [*network_namespace_prefix(), sys.executable, "-I", "-B", "runner.py", str(memory_mb << 20),
                   str(max(1, math.ceil(timeout_s)) + 1), str(max_file_mb << 20), str(proof_file.fileno())]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=stderr_file, pass_fds=(proof_file.fileno(),), start_new_session=True)
        try:
            process.communicate(input=(nonce + "\n").encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            return SandboxResult("timeout", f"no result after {timeout_s:g} s")
        finally:
            if process.poll() is None:
                _kill_group(process)
        proof, stderr = _tail(proof_file), _tail(stderr_file)
    detail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    code_rc = process.returncode
    if code_rc == 0 and proof.decode("utf-8", "replace").rstrip().endswith(nonce):
        return SandboxResult("passed")
    if code_rc == _BLOCKED_EXIT:
        return SandboxResult("blocked", detail[0])
    if code_rc == _FAILED_EXIT:
        return SandboxResult("failed", detail[0])
    if code_rc == _ERROR_EXIT:
        return SandboxResult("error", detail[0])
    return SandboxResult("crashed", f"exit status {code_rc}: {detail[0]}")


def _tail(file, size: int = 4096) -> bytes:
    """The last `size` bytes written to `file` (all of a short output)."""
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read()


def _kill_group(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class CodeReward:
    """trl reward: 1.0 if the answer's code block passes the record's `tests`, 0.0 if not (no code, a
    failed assert, an exception, a hang, a crash, a blocked action); None for records without tests.

    Completions run in parallel (`workers` processes at a time). `counts` accumulates each outcome over
    the whole run, so hangs and crashes are counted and reported, never hidden in a zero.
    """

    __name__ = "code"

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, workers: int | None = None):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.counts: Counter[str] = Counter()

    def score_one(self, response: str, tests: str) -> SandboxResult:
        code = extract_code(response)
        if code is None:
            return SandboxResult("no-code", "no ```python block in the answer")
        return run_tests(code, tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def __call__(self, prompts, completions, tests: Sequence[str | None] | None = None, **kwargs) -> list[float | None]:
        tests = tests if tests is not None else [None] * len(completions)
        jobs = [(i, completion_text(c), t) for i, (c, t) in enumerate(zip(completions, tests, strict=True))
                if t is not None and str(t).strip()]
        scores: list[float | None] = [None] * len(completions)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda job: self.score_one(job[1], job[2]), jobs))
        for (i, _, _), result in zip(jobs, results, strict=True):
            scores[i] = result.score
            self.counts[result.outcome] += 1
        return scores


# ----------------------------------------------------------------------------- format and length

_CLEAN_END = tuple('.!?…"\')]}*`>') + ("```",)


def format_score(text: str, truncated: bool | None = None) -> float:
    """1.0 for a well-formed answer: non-empty, not cut off at the token limit (`truncated`, when known),
    every code fence closed, and ending where a sentence or a block ends (punctuation, a closing quote,
    bracket or fence). 0.0 otherwise."""
    stripped = text.strip()
    if not stripped or truncated:
        return 0.0
    if stripped.count("```") % 2:
        return 0.0
    return 1.0 if stripped.endswith(_CLEAN_END) else 0.0


class FormatReward:
    """trl reward: `format_score`, told about truncation by the completion's token ids: a completion whose
    last id is not one of `stop_ids` (end of turn / eos) ran into the token limit."""

    __name__ = "format"

    def __init__(self, stop_ids: Sequence[int] = ()):
        self.stop_ids = set(stop_ids)

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[float]:
        scores = []
        for i, completion in enumerate(completions):
            truncated = None
            if completion_ids is not None and self.stop_ids:
                ids = completion_ids[i]
                truncated = not ids or ids[-1] not in self.stop_ids
            scores.append(format_score(completion_text(completion), truncated))
        return scores


def length_penalty(num_tokens: int, target: int) -> float:
    """0 up to `target` tokens, then falls linearly to -1 at twice the target (and stays there)."""
    if target <= 0:
        raise ValueError(f"length target {target} must be positive")
    return -min(1.0, max(0, num_tokens - target) / target)


class LengthPenalty:
    """trl reward: `length_penalty` of each completion's token count (its ids, or about 4 characters a
    token when trl passes none)."""

    __name__ = "length"

    def __init__(self, target_tokens: int):
        self.target = target_tokens

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[float]:
        counts = ([len(ids) for ids in completion_ids] if completion_ids is not None
                  else [math.ceil(len(completion_text(c)) / 4) for c in completions])
        return [length_penalty(n, self.target) for n in counts]


# ----------------------------------------------------------------------------- hacking monitors

MIN_BOILERPLATE_WORDS = 3  # shorter "sentences" ("Sure!", "Yes.") are too common to mean anything
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _sentences(text: str) -> set[str]:
    out = set()
    for raw in _SENTENCE_SPLIT.split(text):
        sentence = re.sub(r"\s+", " ", raw).strip(" \t*-#>`\"'").lower().rstrip(".!?")
        if len(sentence.split()) >= MIN_BOILERPLATE_WORDS:
            out.add(sentence)
    return out


def boilerplate_share(completions: Sequence[str],
                      prompts: Sequence[Any] | None = None) -> tuple[float, str | None]:
    """The share of completions containing the most common sentence, and that sentence.

    A policy hacking its reward often converges on one stock sentence ("I'm sorry, but I can't help with
    that.") whatever it is asked. Sentences are compared lower-cased with collapsed whitespace; each
    completion counts a sentence once. (0.0, None) when no sentence has MIN_BOILERPLATE_WORDS words or
    none is repeated: a sentence in one completion only is not boilerplate (else every step would read
    at least 1/N). Given `prompts` (one per completion), a sentence counts only when answers to at least
    two different prompts share it: GRPO's answers to one prompt agree with each other by design.
    """
    if not completions:
        return 0.0, None
    counts: Counter[str] = Counter()
    asked: dict[str, set[str]] = {}
    for i, text in enumerate(completions):
        sentences = _sentences(text)
        counts.update(sentences)
        prompt = repr(prompts[i]) if prompts is not None else str(i)  # once: a chat prompt's repr is long
        for sentence in sentences:
            asked.setdefault(sentence, set()).add(prompt)
    repeated = [(count, sentence) for sentence, count in counts.most_common() if len(asked[sentence]) >= 2]
    if not repeated:
        return 0.0, None
    count, sentence = repeated[0]
    return count / len(completions), sentence


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against their index (units of the values per step); 0 for < 2 points."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    var_x = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / var_x


HeldBackScorer = Callable[[Sequence[list[Message]], Sequence[str]], list[float | None]]


class ContrastJudgeScore:
    """A held-back judge (never used as a reward): how much more likely an answer is under a system
    prompt that follows a constitution principle than under one that ignores it, in mean log-probability
    per token (`judge.contrast_scores`, the contrast judge of DESIGN.md).

    `scorer(prompts, completions) -> [float | None]`, one per completion; higher = the judge prefers it.
    The principle for each prompt is drawn from the constitution, seeded by the prompt's text, so the
    same prompt is judged under the same principle at every step.
    """

    def __init__(self, engine, constitution, *, seed: int = 0):
        self.engine, self.constitution, self.seed = engine, constitution, seed

    def __call__(self, prompts: Sequence[list[Message]], completions: Sequence[str]) -> list[float | None]:
        from cai.judge import contrast_scores

        items, rows = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if not completion.strip():
                continue
            key = hashlib.sha1(repr(prompt).encode()).hexdigest()[:12]
            principle = self.constitution.sample_judge_principles(key, 1, self.seed)[0]
            items.append((principle, prompt, completion))
            rows.append(i)
        scores: list[float | None] = [None] * len(completions)
        for i, score in zip(rows, contrast_scores(self.engine, items), strict=True):
            scores[i] = score
        return scores


@dataclass
class Thresholds:
    """When the monitors warn (see `hacking_warnings`)."""

    length_growth: float = 0.5  # mean response length grew by more than this share of its start
    kl: float = 0.5  # KL to the start policy above this (nats per token, as trl reports it)
    boilerplate: float = 0.5  # over this share of a step's responses repeat one sentence
    truncated: float = 0.5  # over this share of recent answers stopped at the token limit
    min_steps: int = 4  # fewer steps than this: too short for trends


def _thirds(values: list[float]) -> tuple[float, float]:
    third = max(1, len(values) // 3)
    return sum(values[:third]) / third, sum(values[-third:]) / third


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def hacking_warnings(history: Sequence[dict[str, Any]], thresholds: Thresholds = Thresholds()) -> list[str]:
    """Read per-step metrics (`metrics.jsonl` records) and say what looks like reward hacking.

    - response length trending up (its last third's mean against its first third's);
    - most recent answers cut off at the token limit (the rewards then judge unfinished text);
    - KL to the start policy above the threshold;
    - one sentence repeated across a large share of the responses (mean over the last third of steps);
    - the PM reward rising (last third above first third by more than half its step-to-step spread) while
      the held-back judge's score does not rise.
    """
    warnings: list[str] = []
    if len(history) < 1:
        return warnings

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in history if r.get(key) is not None]

    lengths = series("mean_length")
    if len(lengths) >= thresholds.min_steps:
        first, last = _thirds(lengths)
        if first > 0 and (last - first) / first > thresholds.length_growth:
            warnings.append(f"response length rising: {first:.0f} -> {last:.0f} tokens (slope {slope(lengths):+.1f}/step)"
                            " -- the reward may favour length; try --reward length:W or a larger --beta")
    clipped = series("clipped_ratio")
    if clipped:
        third = max(1, len(clipped) // 3)
        recent = sum(clipped[-third:]) / third
        if recent > thresholds.truncated:
            warnings.append(f"{recent:.0%} of recent answers hit the token limit -- rewards are judging cut-off "
                            "answers; raise --max-new-tokens or add --reward format:W")
    kls = series("kl")
    if kls and kls[-1] > thresholds.kl:
        warnings.append(f"KL to the start policy is {kls[-1]:.2f} (> {thresholds.kl}) -- the policy is drifting "
                        "far; raise --beta or lower --lr")
    shares = series("boilerplate_share")
    if len(shares) >= 2:
        third = max(1, len(shares) // 3)
        recent = sum(shares[-third:]) / third
        if recent > thresholds.boilerplate:
            sentence = next((r.get("boilerplate_sentence") for r in reversed(history) if r.get("boilerplate_sentence")),
                            "")
            warnings.append(f"{recent:.0%} of recent responses repeat one sentence ({sentence!r:.80}) -- "
                            "a stock answer may be gaming the PM")
    pm = series("reward_pm")
    judge = series("judge_score")
    if len(pm) >= thresholds.min_steps and len(judge) >= 2:
        pm_first, pm_last = _thirds(pm)
        judge_first, judge_last = _thirds(judge)
        if pm_last - pm_first > 0.5 * _std(pm) and judge_last <= judge_first:
            warnings.append(f"PM reward rose ({pm_first:+.2f} -> {pm_last:+.2f}) while the held-back judge's score "
                            f"did not ({judge_first:+.3f} -> {judge_last:+.3f}) -- the policy may be exploiting the PM")
    return warnings


@dataclass
class StepSignals:
    """Monitor values computed from one step's reward batch (see `step_signals`)."""

    boilerplate_share: float
    boilerplate_sentence: str | None
    part_means: dict[str, float | None] = field(default_factory=dict)
    judge_score: float | None = None


def step_signals(batch: RewardBatch, judge: HeldBackScorer | None = None) -> StepSignals:
    """The hacking signals of one reward batch: boilerplate share, each reward part's mean, and the
    held-back judge's mean score when a judge is given."""
    share, sentence = boilerplate_share(batch.completions, batch.prompts)
    judge_mean = None
    if judge is not None:
        judge_mean = _mean(judge(batch.prompts, batch.completions))
    return StepSignals(boilerplate_share=share, boilerplate_sentence=sentence,
                       part_means={name: _mean(values) for name, values in batch.parts.items()},
                       judge_score=judge_mean)
