"""Running a code answer against its tests in a bubblewrap sandbox (`run_tests`, `CodeReward`).

Each run is one Python process inside bubblewrap (`bwrap`): new PID, network, mount, IPC and UTS
namespaces (and a user namespace, unless cai runs as root), so it sees no network, no host process and
only these host files, read-only: /usr, the library links, and the interpreter's own directories. Its
one writable place is a size-capped tmpfs at /scratch. It starts with an empty environment, no
capabilities, a session of its own, and limits on CPU seconds, address space, file size and process
count; started by root it runs as a uid no user has. At the timeout bubblewrap is killed, which ends the
sandbox's PID namespace and with it every process inside, those that called setsid included.
docs/sandbox.md has the table of what this stops and what it does not.

Inside, the answer is imported as the module `solution`; the tests run as a module of their own, which
sees the solution's public names but the builtins as they were before the solution ran (so `def len`
in the answer does not change `len` in the tests), and whose `assert a == b` and `assert a != b`
compare with exact types (so an object whose `__eq__` is always True does not equal `[1, 2]`). Test
functions named `test_*` run after the module's own statements.

Where bubblewrap is missing or cannot make namespaces, the code reward refuses to run
(`MissingDependency`), unless asked to run code unsandboxed (`--unsafe-run-code`): the same runner then
runs as a plain child process, with its limits and its audit hook but no isolation at all.
"""

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cai.errors import MissingDependency
from cai.rewards.combined import completion_text

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
SANDBOX_OUTCOMES = ("passed", "failed", "error", "timeout", "crashed", "blocked", "no-code")
_BLOCKED_EXIT = 97  # the audit hook stopped the code doing something forbidden
_FAILED_EXIT = 98  # a test assertion failed
_ERROR_EXIT = 99  # the solution or the tests raised
SCRATCH = "/scratch"  # the sandbox's only writable directory, and its working directory
SCRATCH_MB = 64  # size of that tmpfs, MiB
MAX_PROCESSES = 64  # processes and threads a sandboxed run may have at once
SANDBOX_UIDS = (3_000_000_000, 3_100_000_000)  # the uids a sandbox started by root runs as (no user has them)
INSTALL_HINT = "apt-get install bubblewrap"


def extract_code(text: str) -> str | None:
    """The last ```python (or ```py / unlabelled) block of a response; None if it has none."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [body for lang, body in blocks if lang in wanted]
        if chosen:
            return chosen[-1]
    return None


# The runner, run as `python -I -B -c _RUNNER LIMITS... PROOF_FD`, reads a JSON document from stdin
# (the secret, the solution, the tests), sets its limits and then an audit hook that ends the process
# (exit 97) on any socket, subprocess, ctypes or signal use and on any write, delete or rename outside
# its working directory. In the sandbox bubblewrap is the wall and the hook names what was tried (the
# `blocked` outcome); code that bypasses the hook (`_posixsubprocess.fork_exec` raises no audit event)
# still meets the namespaces. Limits are set here, not in a `preexec_fn`, which is unsafe to run
# between fork and exec in a parent with threads (a torch trainer has many).
#
# A pass is proved by the secret, written to the proof descriptor only once the tests have run. Code
# under test shares the interpreter, so the secret is kept where it cannot reach: read before the
# solution loads, stdin closed after it, the process made undumpable (a child it starts cannot read its
# memory through /proc), held in the main thread's frame only, while the solution and then the tests run
# in threads of their own (a frame's f_back never leads to another thread's frames; the calls that do,
# sys._current_frames and gc's object walks, are denied, and so are tracing hooks that could skip an
# assert). Everything the runner calls after the code has run is bound before it runs (default
# arguments), and nothing it calls then is the code's: such a call would have the main frame as its
# f_back. Code run in a thread cannot install signal handlers (Python allows that in the main thread only).
_RUNNER = r'''
import _thread, ast, builtins, collections, itertools, json, operator, os, resource, sys, time, types
def _guarded(call, args, _write=os.write, _exit=os._exit, _repr=repr, _name=type, _str=str,
             _failed=AssertionError, _any=BaseException):
    try:
        call(*args)
    except _failed as exc:
        line, tb = 0, exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "tests.py":
                line = tb.tb_lineno
            tb = tb.tb_next
        _write(2, ("cai-sandbox: test failed at tests.py:" + _str(line) + " " + _repr(exc)[:300] + "\n").encode())
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
class _Strict(ast.NodeTransformer):
    """`assert a == b` and `assert a != b` (also under `and`, `or`, `not`) become
    `assert __cai_compare__(("Eq",), a, b)`; a comparison inside a call, as in `(a == b).all()`, stays."""
    def visit_Assert(self, node):
        node.test = self.strict(node.test)
        return node
    def strict(self, node):
        if isinstance(node, ast.BoolOp):
            node.values = [self.strict(value) for value in node.values]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            node.operand = self.strict(node.operand)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = ast.Tuple([ast.Constant(type(op).__name__) for op in node.ops], ast.Load())
            call = ast.Call(ast.Name("__cai_compare__", ast.Load()), [names, node.left, *node.comparators], [])
            return ast.copy_location(call, node)
        return node
def _comparisons(_type=type, _len=len, _zip=zip, _bool=bool, _isinstance=isinstance, _dict=dict, _deque=collections.deque,
                 _ops={"Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt, "GtE": operator.ge, "Is": operator.is_,
                       "IsNot": operator.is_not, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}):
    numbers = (int, float, complex, bool)
    scalars = numbers + (str, bytes, type(None))
    def one_of(t, types):  # by identity: a metaclass can make `==` between classes lie
        for candidate in types:
            if t is candidate:
                return True
        return False
    def plain(x):  # exact builtin scalars, and tuples / frozensets of them: their == cannot be redefined
        t = _type(x)
        if t is tuple or t is frozenset:
            for item in x:
                if not plain(item):
                    return False
            return True
        return one_of(t, scalars)
    def matched(a, b):  # every item of a has a strictly equal item in b (same sizes)
        for x in a:
            for y in b:
                if equal(x, y):
                    break
            else:
                return False
        return True
    def equal(a, b):
        ta, tb = _type(a), _type(b)
        if one_of(ta, numbers) and one_of(tb, numbers):
            return a == b  # builtin numbers by value, as Python has it: 2 == 2.0
        if ta is not tb:
            return False
        if ta is list or ta is tuple or ta is _deque:
            if _len(a) != _len(b):
                return False
            for x, y in _zip(a, b):
                if not equal(x, y):
                    return False
            return True
        if _isinstance(a, _dict):
            if _len(a) != _len(b):
                return False
            if all_plain(a) and all_plain(b):
                if _dict.keys(a) != _dict.keys(b):
                    return False
                for key in a:
                    if not equal(_dict.__getitem__(a, key), _dict.__getitem__(b, key)):
                        return False
                return True
            return matched(_dict.items(a), _dict.items(b))
        if ta is set or ta is frozenset:
            if _len(a) != _len(b):
                return False
            return a == b if all_plain(a) and all_plain(b) else matched(a, b)
        return _bool(a == b)  # the same exact type on both sides: that type's own ==
    def all_plain(items):
        for item in items:
            if not plain(item):
                return False
        return True
    def compare(ops, left, *rights):
        for op, right in _zip(ops, rights):
            if op == "Eq":
                ok = equal(left, right)
            elif op == "NotEq":
                ok = not equal(left, right)
            else:
                ok = _ops[op](left, right)
            if not ok:
                return False
            left = right
        return True
    return compare
def _exec_solution(code, module, _exec=exec):
    _exec(code, module.__dict__)
def _run_tests(code, module, builtins_before, compare, _exec=exec, _list=list, _callable=callable, _str=str,
               _type=type):
    namespace = {"__name__": "tests", "__builtins__": builtins_before, "__cai_compare__": compare}
    for name, value in _list(module.__dict__.items()):
        if _type(name) is _str and not name.startswith("_") and name not in builtins_before:
            namespace[name] = value
    _exec(code, namespace)
    for name in _list(namespace):
        if name.startswith("test_") and _callable(namespace[name]):
            namespace[name]()
def main(_guarded=_guarded, _hook=_hook, _write=os.write, _exit=os._exit, _start=_thread.start_new_thread,
         _count=_thread._count, _deque=collections.deque, _chain=itertools.chain, _map=map, _sleep=time.sleep,
         _exec_solution=_exec_solution, _run_tests=_run_tests):
    user, memory, cpu_seconds, max_file, processes, proof = (int(a) for a in sys.argv[1:7])
    if user:  # started as root: become a uid of its own, which drops every capability
        os.setgroups([])
        os.setresgid(user, user, user)
        os.setresuid(user, user, user)
    limits = [(resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, max_file),
              (resource.RLIMIT_CORE, 0)] + ([(resource.RLIMIT_NPROC, processes)] if processes else [])
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))
    payload = json.loads(sys.stdin.buffer.read())
    nonce = payload["nonce"]
    os.close(0)
    sys.stdin = open(os.devnull)  # input() reads an end of file, as with no input
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no other process reads this memory
    except Exception:
        pass
    try:
        solution = compile(payload["solution"], "solution.py", "exec")
        tree = _Strict().visit(ast.parse(payload["tests"], "tests.py"))
        tests = compile(ast.fix_missing_locations(tree), "tests.py", "exec")
    except (SyntaxError, ValueError) as exc:
        _write(2, ("cai-sandbox: raised " + type(exc).__name__ + " " + str(exc)[:300] + "\n").encode())
        _exit(99)
    del payload
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    builtins_before = dict(builtins.__dict__)  # the tests' builtins, whatever the solution does to its own
    compare = _comparisons()
    sys.addaudithook(_hook(os.path.realpath(os.getcwd())))
    for call, args in ((_exec_solution, (solution, module)), (_run_tests, (tests, module, builtins_before, compare))):
        done, before = [], _count()
        # The thread runs C calls only around the code (a deque draining chained maps): no Python frame
        # between the thread's start and the code holds `done`, so code walking f_back from its own frame
        # cannot mark itself finished; only the second map does, once the first has returned.
        _start(_deque, (_chain(_map(_guarded, (call,), (args,)), _map(done.append, ("ok",))),), {"maxlen": 0})
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


@dataclass(frozen=True)
class SandboxResult:
    outcome: str  # one of SANDBOX_OUTCOMES
    detail: str = ""  # the last line of stderr, for a person reading why

    @property
    def score(self) -> float:
        return 1.0 if self.outcome == "passed" else 0.0


def _find_bwrap() -> str | None:
    return shutil.which("bwrap")


def _interpreter_dirs() -> list[str]:
    """The interpreter's directories outside /usr (a virtualenv, its base install), outermost first."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    dirs: list[str] = []
    for path in sorted(candidates, key=len):
        if not (path == "/usr" or path.startswith("/usr/") or any(path.startswith(d + "/") for d in dirs)):
            dirs.append(path)
    return dirs


def _bwrap_command(bwrap: str, as_root: bool) -> list[str]:
    """The bubblewrap command line that starts the runner.

    As a user, bubblewrap makes a user namespace too (`--unshare-all`). As root it makes the others
    only and keeps two capabilities, CAP_SETUID and CAP_SETGID, with which the runner becomes an unused
    uid before it reads the code: root in the sandbox would be exempt from the process limit.
    """
    namespaces = (["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
                  if as_root else ["--unshare-all"])
    caps = ["--cap-drop", "ALL"] + (["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if as_root else [])
    command = [bwrap, *namespaces, *caps, "--die-with-parent", "--new-session", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", SCRATCH,
               "--setenv", "TMPDIR", SCRATCH, "--ro-bind", "/usr", "/usr",
               "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: the same links inside
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    for path in _interpreter_dirs():
        parents = [parent for parent in Path(path).parents if parent != Path("/")][::-1]
        for parent in parents:  # walkable by the sandbox's user (bubblewrap as root makes them 0700)
            command += ["--perms", "0755", "--dir", str(parent)]
        command += ["--ro-bind", path, path]
    return command + ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(SCRATCH_MB << 20),
                      "--tmpfs", SCRATCH,
                      "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SCRATCH, "--"]


def run_tests(code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_file_mb: int = 16,
              sandboxed: bool = True) -> SandboxResult:
    """Run `code` as the module `solution`, then `tests` (asserts, and `test_*` functions) as a module of
    their own, and say how it went.

    `sandboxed` (the default): inside bubblewrap, as the module docstring says; MissingDependency where it
    cannot run. `sandboxed=False` runs the same process unisolated, in a temporary directory: only for a
    user who asked for it (`--unsafe-run-code`). Both have a wall-clock limit (`timeout_s`), a CPU limit,
    an address-space limit of `memory_mb` and a file-size limit of `max_file_mb`. Only a run that
    reaches the end of the tests and writes the secret it was given counts as passed, so `os._exit(0)`
    in the solution fails.
    """
    if sandboxed:
        require_sandbox()
    return _run(code, tests, timeout_s=timeout_s, memory_mb=memory_mb, max_file_mb=max_file_mb, sandboxed=sandboxed)


def _run(code: str, tests: str, *, timeout_s: float, memory_mb: int, max_file_mb: int,
         sandboxed: bool) -> SandboxResult:
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "solution": code, "tests": tests}).encode()
    # No pipes the parent buffers: what the code prints goes nowhere (printing is no part of passing,
    # and a flood cannot fill the parent's memory); its errors, and the secret that proves a pass (on a
    # descriptor of its own), go to unnamed files the parent made, capped by the file-size limit.
    workdir_context = nullcontext(SCRATCH) if sandboxed else tempfile.TemporaryDirectory(prefix="cai-sandbox-")
    with workdir_context as workdir, tempfile.TemporaryFile() as proof_file, tempfile.TemporaryFile() as stderr_file:
        as_root = sandboxed and os.geteuid() == 0
        # A uid no one uses, fresh for each run: the process limit counts a uid's processes machine-wide.
        user = SANDBOX_UIDS[0] + secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) if as_root else 0
        limits = [str(user), str(memory_mb << 20), str(max(1, math.ceil(timeout_s)) + 1), str(max_file_mb << 20),
                  str(MAX_PROCESSES if sandboxed else 0), str(proof_file.fileno())]
        runner = [sys.executable, "-I", "-B", "-c", _RUNNER, *limits]
        options: dict = {"stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL, "stderr": stderr_file,
                         "start_new_session": True}
        if sandboxed:
            # bubblewrap clears the environment inside; its own process gets none of cai's either.
            options.update(cwd="/", env={"PATH": os.defpath}, pass_fds=(proof_file.fileno(),))
            command = _bwrap_command(_find_bwrap() or "bwrap", as_root) + runner
        else:
            options.update(cwd=workdir, env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir,
                                             "TMPDIR": workdir}, pass_fds=(proof_file.fileno(),))
            command = runner
        process = subprocess.Popen(command, **options)
        try:
            process.communicate(input=payload, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)  # bubblewrap's death ends its PID namespace and everything in it
            process.wait()
            return SandboxResult("timeout", f"no result after {timeout_s:g} s")
        finally:
            if process.poll() is None:
                _kill_group(process)
                process.wait()
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


@lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why code cannot run sandboxed here, or None when bubblewrap works. Probed once per process."""
    if _find_bwrap() is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        probe = _run("x = 1", "assert x == 1", timeout_s=30, memory_mb=512, max_file_mb=1, sandboxed=True)
    except OSError as exc:
        return f"bubblewrap did not start ({exc})"
    if probe.outcome != "passed":
        return f"bubblewrap cannot start a sandbox here ({probe.detail or probe.outcome})"
    return None


def require_sandbox(unsafe: bool = False) -> str | None:
    """Raise MissingDependency, naming what to install, where code cannot run sandboxed; with `unsafe`,
    return the warning to show instead (None when the sandbox works, `unsafe` or not)."""
    problem = sandbox_problem()
    if problem is None:
        return None
    if not unsafe:
        raise MissingDependency(f"the code reward runs answers in a sandbox, but {problem} -- install it "
                                f"({INSTALL_HINT}), or (cai rl) pass --unsafe-run-code to run model-written code "
                                "with no isolation at all")
    return (f"WARNING: --unsafe-run-code and {problem}: model-written code runs UNSANDBOXED with this user's "
            "rights (its files, network and processes); use a throwaway machine or container")


class CodeReward:
    """trl reward: 1.0 if the answer's code block passes the record's `tests`, 0.0 if not (no code, a
    failed assert, an exception, a hang, a crash, a blocked action); None for records without tests.

    Sandboxed (see `run_tests`); refuses at construction where no sandbox can run, unless `unsafe_run_code`
    (then `warning` says so, for the caller to show). Completions run in parallel (`workers` at a time).
    `counts` accumulates each outcome over the whole run, so hangs and crashes are counted and reported,
    never hidden in a zero.
    """

    __name__ = "code"

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, workers: int | None = None,
                 unsafe_run_code: bool = False):
        self.warning = require_sandbox(unsafe_run_code)
        self.sandboxed = self.warning is None
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.counts: Counter[str] = Counter()

    def score_one(self, response: str, tests: str) -> SandboxResult:
        code = extract_code(response)
        if code is None:
            return SandboxResult("no-code", "no ```python block in the answer")
        return run_tests(code, tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb, sandboxed=self.sandboxed)

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
