"""The code sandbox (cai/rewards/sandbox.py): honest solutions pass, and each attack below fails.

Every attack here is one a sandbox without namespaces let through: a program started with
`_posixsubprocess.fork_exec` (no audit event), writes outside, the trainer killed, processes outliving
the timeout, the network, the parent's environment, and two reward hacks (an always-equal object, a
shadowed builtin). Tests that need bubblewrap fail, not skip, when CI is set and it is missing.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from cai.errors import MissingDependency
from cai.rewards import CodeReward, extract_code, run_tests, sandbox_problem
from cai.rewards import sandbox as sandbox_module


def sandbox_or_skip() -> None:
    """Skip where bubblewrap cannot run, except in CI (`CI` set), where that is a failure."""
    problem = sandbox_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the sandbox tests, but {problem} -- apt-get install bubblewrap")
    pytest.skip(f"{problem} (apt-get install bubblewrap)")


@pytest.fixture(autouse=True)
def sandbox(request):
    if "without_bwrap" not in request.fixturenames:
        sandbox_or_skip()


@pytest.fixture
def without_bwrap(monkeypatch):
    """As on a machine where bubblewrap is not installed."""
    monkeypatch.setattr(sandbox_module, "_find_bwrap", lambda: None)
    sandbox_problem.cache_clear()
    yield
    sandbox_problem.cache_clear()


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


PROMPT = [{"role": "user", "content": "Write add(a, b)."}]

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def fenced(code: str) -> str:
    return f"Here is the function:\n\n```python\n{code}\n```\n"


def test_code_passing_solution_scores_one():
    assert run_tests("def add(a, b):\n    return a + b\n", TESTS).outcome == "passed"


def test_code_failing_solution_scores_zero():
    result = run_tests("def add(a, b):\n    return a - b\n", TESTS)
    assert (result.outcome, result.score) == ("failed", 0.0)


def test_code_infinite_loop_is_stopped_at_the_limit():
    result = run_tests("def add(a, b):\n    while True:\n        pass\n", TESTS, timeout_s=1.0)
    assert (result.outcome, result.score) == ("timeout", 0.0)


def test_code_opening_a_network_socket_scores_zero_even_if_it_catches_the_error():
    code = ("import socket\ndef add(a, b):\n    return a + b\n"
            "try:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 9))\n"
            "except Exception:\n    pass\n")
    result = run_tests(code, TESTS)
    assert (result.outcome, result.score) == ("blocked", 0.0)
    assert "socket" in result.detail


@pytest.mark.parametrize("target", ["{outside}/escaped.txt", "../escaped.txt"])
def test_code_writing_outside_its_directory_scores_zero(tmp_path, target):
    path = target.format(outside=tmp_path)
    code = (f"def add(a, b):\n    return a + b\ntry:\n    open({path!r}, 'w').write('x')\n"
            "except Exception:\n    pass\n")
    result = run_tests(code, TESTS)
    assert (result.outcome, result.score) == ("blocked", 0.0)
    assert not (tmp_path / "escaped.txt").exists()


def test_code_may_write_inside_its_own_directory():
    code = "open('scratch.txt', 'w').write('ok')\ndef add(a, b):\n    return a + b\n"
    assert run_tests(code, TESTS).outcome == "passed"


def test_code_that_exits_early_does_not_pass():
    assert run_tests("import os\nos._exit(0)\n", TESTS).score == 0.0
    assert run_tests("import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)\n", TESTS).score == 0.0


@pytest.mark.parametrize("hack", [
    # the secret that proves the tests ran, printed without running them
    "import __main__, os\nos.write(1, ('\\n' + getattr(__main__, 'nonce', '') + '\\n').encode())\nos._exit(0)\n",
    # the tests swapped for ones that pass
    "import __main__\n__main__.tests = compile('pass', 'tests.py', 'exec')\n",
    # the runner's frame reached from the solution's, for its secret
    "import sys, os\nf = sys._getframe()\nwhile f.f_back: f = f.f_back\n"
    "os.write(1, ('\\n' + str(f.f_locals.get('nonce')) + '\\n').encode())\nos._exit(0)\n",
    # every live object searched for it
    "import gc, os\nfor o in gc.get_objects():\n    pass\nos._exit(0)\n",
    # a tracer that skips the failing assert
    "import sys\nsys.settrace(lambda *a: None)\n",
    # the secret read from standard input before the runner reads it
    "import sys, os\nos.write(1, ('\\n' + sys.stdin.readline()).encode())\nos._exit(0)\n",
    # builtins the runner relies on replaced
    "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    # the runner's own functions replaced before the tests start
    "import __main__\nfor name in dir(__main__):\n    if callable(getattr(__main__, name)):\n"
    "        setattr(__main__, name, lambda *a, **k: [x.append('ok') for x in a if isinstance(x, list)])\n",
    # every list on the stack marked finished from inside a test, then the tests stopped
    "import sys\ndef add(a, b):\n    f = sys._getframe()\n    while f:\n"
    "        for v in list(f.f_locals.values()):\n            if isinstance(v, list):\n                v.append('ok')\n"
    "        f = f.f_back\n    raise SystemExit(0)\n",
])
def test_code_cannot_forge_a_pass(hack):
    assert run_tests(hack, "assert False").outcome != "passed"


@pytest.mark.parametrize("hack", [
    "import os\nfd = os.open({outside!r}, os.O_RDONLY)\nos.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
    "import sqlite3\nsqlite3.connect({outside!r} + '/escaped').execute('create table t(x)')\n",
    "import sqlite3\nsqlite3.connect('file:' + {outside!r} + '/escaped?mode=rwc', uri=True).execute('create table t(x)')\n",
])
def test_code_cannot_write_outside_through_a_directory_handle_or_sqlite(tmp_path, hack):
    result = run_tests(hack.format(outside=str(tmp_path)), "pass")
    # The audit hook stops what it sees (blocked); a path the sandbox does not mount is not there (error).
    assert result.outcome in ("blocked", "error") and not (tmp_path / "escaped").exists()


def test_code_flooding_its_output_does_not_grow_the_parent():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_tests("import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)\n", "pass", timeout_s=2.0)
    assert result.score == 0.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 100 * 1024  # KiB: under 100 MB


def test_a_passing_solution_may_print_more_than_the_file_size_limit():
    code = "import sys\nsys.stdout.write('x' * (20 << 20))\ndef add(a, b):\n    return a + b\n"
    assert run_tests(code, TESTS, max_file_mb=16).outcome == "passed"


def test_ordinary_code_still_runs_in_the_sandbox():
    """What the guards must not stop: namedtuples, dataclasses and enums (they read the caller's frame),
    tracebacks, threads, sqlite in memory and files in its own directory."""
    code = ("import collections, dataclasses, enum, threading, traceback, sqlite3\n"
            "P = collections.namedtuple('P', 'x y')\n"
            "@dataclasses.dataclass\nclass D:\n    x: int\n"
            "class E(enum.Enum):\n    A = 1\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    text = traceback.format_exc()\n"
            "out = []\nt = threading.Thread(target=lambda: out.append(1)); t.start(); t.join()\n"
            "sqlite3.connect(':memory:').execute('select 1')\n"
            "sqlite3.connect('local.db').execute('create table t(x)')\n"
            "def add(a, b):\n    return P(a, b).x + D(b).x + E.A.value - 1 + len(out) - 1\n")
    assert run_tests(code, TESTS).outcome == "passed"


def test_code_exceeding_the_memory_limit_scores_zero():
    code = "blob = bytearray(1 << 31)\ndef add(a, b):\n    return a + b\n"
    assert run_tests(code, TESTS, memory_mb=256).score == 0.0


def test_extract_code_takes_the_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```bash\nls\n```\nfinally\n```python\ndef f():\n    return 2\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("no code here") is None


def test_code_reward_scores_and_counts_outcomes():
    reward = CodeReward(timeout_s=1.0)
    completions = [answer(fenced("def add(a, b):\n    return a + b")), answer(fenced("def add(a, b):\n    return 0")),
                   answer("I would add them."), answer("no tests for this one")]
    scores = reward([PROMPT] * 4, completions, tests=[TESTS, TESTS, TESTS, None])
    assert scores == [1.0, 0.0, 0.0, None]
    assert reward.counts == {"passed": 1, "failed": 1, "no-code": 1}




# ----------------------------------------------------------------------------- attacks past the audit hook

# Starts a program with no audit event (subprocess.Popen raises one, `_posixsubprocess.fork_exec` none).
SPAWN = '''
import _posixsubprocess, os
def spawn(*argv, wait=True):
    read_end, write_end = os.pipe()
    args = [[a.encode() for a in argv], [argv[0].encode()], True, (write_end,), None, None,
            -1, -1, -1, -1, -1, -1, read_end, write_end, True, False, -1, None, None, None, -1, None]
    try:
        pid = _posixsubprocess.fork_exec(*args, False)
    except TypeError:  # Python versions without the trailing allow_vfork argument
        pid = _posixsubprocess.fork_exec(*args)
    os.close(write_end)
    os.close(read_end)
    if wait:
        os.waitpid(pid, 0)
    return pid
'''


def test_a_program_started_without_an_audit_event_cannot_write_outside(tmp_path):
    code = SPAWN + f"spawn('/bin/sh', '-c', 'echo x > {tmp_path}/escaped')\n"
    run_tests(code, "pass")
    assert not (tmp_path / "escaped").exists()


def test_scratch_is_the_only_place_a_program_can_write():
    paths = ["/escaped", "/usr/escaped", "/dev/escaped", "/dev/shm/escaped", "/scratch/made"]
    code = SPAWN + f"spawn('/bin/sh', '-c', 'for p in {' '.join(paths)}; do echo x > $p; done')\nimport os\n"
    tests = "\n".join(f"assert os.path.exists({p!r}) == {p.startswith('/scratch/')}" for p in paths)
    assert run_tests(code, "import os\n" + tests).outcome == "passed"


def in_trainer(code: str, tests: str, **env: str) -> subprocess.CompletedProcess:
    """`run_tests` called from a process of its own (standing in for the RL trainer), with `env` planted."""
    script = ("import sys\nfrom cai.rewards import run_tests\n"
              "result = run_tests(sys.argv[1], sys.argv[2], timeout_s=5)\nprint(result.outcome)\n")
    return subprocess.run([sys.executable, "-c", script, code, tests], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_the_code_cannot_kill_the_process_that_runs_it():
    # $PPID is the runner; the runner's parent is whoever called run_tests.
    code = SPAWN + "spawn('/bin/sh', '-c', 'kill -9 $(cut -d\" \" -f4 /proc/$PPID/stat)')\nimport time\ntime.sleep(0.3)\n"
    trainer = in_trainer(code, "pass")
    assert trainer.returncode == 0, trainer.stderr
    assert trainer.stdout.strip() in ("passed", "error", "crashed")


def test_the_code_cannot_kill_a_process_outside():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        run_tests(SPAWN + f"spawn('/bin/sh', '-c', 'kill -9 {victim.pid}')\n", "pass")
        time.sleep(0.2)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_code_cannot_read_the_environment_of_the_process_that_runs_it():
    code = ("import os\nfound = False\n"
            "for pid in ['self', str(os.getppid()), '1'] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    try:\n        found = found or b'CAI_PLANTED_SECRET=' in open(f'/proc/{pid}/environ', 'rb').read()\n"
            "    except OSError:\n        pass\n")
    trainer = in_trainer(code, "assert found is False", CAI_PLANTED_SECRET="hunter2")
    assert trainer.stdout.strip() == "passed", trainer.stderr


def processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("ending", ["timeout", "exit"])
def test_no_process_the_code_starts_outlives_the_run(ending):
    marker = f"cai-outlive-{os.getpid()}-{ending}"
    count = 200 if ending == "timeout" else 20  # 20: under the process limit, so the tests still run
    code = SPAWN + (f"for i in range({count}):\n    try:\n"
                    f"        spawn('/usr/bin/setsid', '/bin/sh', '-c', 'sleep 60', '{marker}', wait=False)\n"
                    "    except OSError:\n        break\n"
                    + ("import time\ntime.sleep(60)\n" if ending == "timeout" else ""))
    result = run_tests(code, "pass", timeout_s=2.0)
    assert result.outcome == ("timeout" if ending == "timeout" else "passed")
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


def test_the_code_cannot_start_more_than_its_process_limit():
    # Small stacks and a large address space: the process limit, not memory, is what stops it.
    code = ("import threading\nthreading.stack_size(1 << 16)\nstop = threading.Event()\ntry:\n"
            "    for _ in range(200):\n        threading.Thread(target=stop.wait).start()\nfinally:\n    stop.set()\n")
    result = run_tests(code, "pass", memory_mb=4096)
    assert result.outcome == "error" and "thread" in result.detail


@pytest.mark.parametrize("call", [
    "import os, stat\nos.mknod('{outside}/escaped', 0o600 | stat.S_IFIFO)\n",
    "import os\nos.setxattr('{outside}/target', 'user.cai', b'escaped')\n",
])
def test_mknod_and_setxattr_cannot_write_outside(tmp_path, call):
    target = tmp_path / "target"
    target.write_text("x")
    try:
        os.setxattr(target, "user.probe", b"1")
        os.removexattr(target, "user.probe")
    except OSError:
        if "setxattr" in call:
            pytest.skip("this file system has no user extended attributes")
    run_tests(call.format(outside=tmp_path), "pass")
    assert not (tmp_path / "escaped").exists()
    assert "user.cai" not in os.listxattr(target)


def test_the_code_cannot_reach_a_listener_on_the_loopback_address():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        run_tests(SPAWN + f"spawn('/bin/bash', '-c', 'echo hello > /dev/tcp/127.0.0.1/{port}')\n", "pass")
        server.settimeout(0.2)  # the program was waited for: a connection it made is queued by now
        with pytest.raises(TimeoutError):
            server.accept()[0].close()


# ----------------------------------------------------------------------------- reward hacks


@pytest.mark.parametrize("test", [
    "assert f(5) == [1, 2]",
    "assert [1, 2] == f(5)",
    "assert not (f(5) != [1, 2])",
])
def test_an_object_equal_to_everything_does_not_pass(test):
    code = "class Anything:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n" \
           "        return False\n    __hash__ = object.__hash__\ndef f(n):\n    return Anything()\n"
    assert run_tests(code, test).outcome == "failed"
    inside = code.replace("return Anything()", "return [Anything(), Anything()]")
    assert run_tests(inside, test).outcome == "failed"


@pytest.mark.parametrize("cheat", [
    "def len(x):\n    return 30\n",
    "import builtins\nbuiltins.len = lambda x: 30\n",
])
def test_a_solution_cannot_redefine_the_builtins_the_tests_use(cheat):
    code = cheat + "def f(n):\n    return [0]\n"
    assert run_tests(code, "assert len(f(30)) == 30").outcome == "failed"


def test_mbpp_style_asserts_pass_with_equal_values_of_builtin_types():
    code = ("import math\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
            "def area(r):\n    return 4\ndef pairs(n):\n    return {i: [i, (i, str(i))] for i in range(n)}\n"
            "def circle(r):\n    return math.pi * r * r\n")
    tests = ("assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))\n"
             "assert area(2) == 4.0\nassert area(2) != 5\n"
             "assert pairs(2) == {0: [0, (0, '0')], 1: [1, (1, '1')]}\n"
             "assert math.isclose(circle(1), 3.14159, rel_tol=0.001)\n")
    assert run_tests(code, tests).outcome == "passed"
    assert run_tests(code, tests.replace("'1')]}", "'2')]}")).outcome == "failed"
    # A comparison inside an expression keeps Python's meaning: `(a == b)` here is an object with .all().
    elementwise = ("class Vector(list):\n    def __eq__(self, other):\n        return Vector(x == y for x, y in zip(self, other))\n"
                   "    def all(self):\n        return all(self)\n")
    assert run_tests(elementwise, "assert (Vector([1, 2]) == [1, 2]).all()").outcome == "passed"


def test_a_test_module_with_test_functions_runs_each_of_them():
    tests = ("from solution import add\nimport solution\n\n"
             "def test_add():\n    assert add(2, 3) == 5\n\n"
             "def test_module():\n    assert solution.add(-1, 1) == 0\n")
    assert run_tests("def add(a, b):\n    return a + b\n", tests).outcome == "passed"
    failing = tests + "\ndef test_wrong():\n    assert add(1, 1) == 3\n"
    result = run_tests("def add(a, b):\n    return a + b\n", failing)
    assert result.outcome == "failed" and "tests.py:11" in result.detail


# ----------------------------------------------------------------------------- no bubblewrap


def test_code_rewards_refuse_without_bubblewrap_naming_what_to_install(without_bwrap):
    with pytest.raises(MissingDependency, match=r"not installed -- install it \(apt-get install bubblewrap\), or "
                                                r"\(cai rl\) pass --unsafe-run-code"):
        CodeReward()
    with pytest.raises(MissingDependency):
        run_tests("def add(a, b):\n    return a + b\n", TESTS)


def test_unsafe_run_code_runs_unsandboxed_and_says_so(without_bwrap):
    reward = CodeReward(unsafe_run_code=True)
    assert not reward.sandboxed and "UNSANDBOXED" in reward.warning
    completions = [answer(fenced("def add(a, b):\n    return a + b")), answer(fenced("def add(a, b):\n    return 0"))]
    assert reward([PROMPT] * 2, completions, tests=[TESTS, TESTS]) == [1.0, 0.0]


def test_a_bubblewrap_that_cannot_start_a_sandbox_counts_as_none(monkeypatch, without_bwrap):
    monkeypatch.setattr(sandbox_module, "_find_bwrap", lambda: "/bin/false")
    assert "cannot start a sandbox" in sandbox_problem()
    with pytest.raises(MissingDependency, match="cannot start a sandbox"):
        CodeReward()


def test_sandbox_tests_fail_in_ci_rather_than_skip(monkeypatch, without_bwrap):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the sandbox tests"):
        sandbox_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        sandbox_or_skip()
