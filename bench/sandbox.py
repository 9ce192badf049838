"""What the code-reward sandbox costs: one answer scored in bubblewrap against the same runner unsandboxed.

Same answer (an MBPP-style function), same tests (three asserts), same runner process, same limits;
the baseline runs it as a plain child process (what `--unsafe-run-code` does), cai runs it inside
bubblewrap. Both score `--runs` answers one after another, then `--runs` at a time through
`CodeReward`'s worker pool. Times are wall-clock per answer; the ratio is sandboxed / unsandboxed.

    python bench/sandbox.py [--runs 20] [--json]
"""

import argparse
import json
import os
import time

from cai.rewards import CodeReward, run_tests, sandbox_problem

SOLUTION = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
TESTS = ("assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\n"
         "assert similar_elements((1, 2, 3, 4), (5, 4, 3, 7)) == (3, 4)\n"
         "assert similar_elements((11, 12, 14, 13), (17, 15, 14, 13)) == (13, 14)\n")
ANSWER = [{"role": "assistant", "content": f"```python\n{SOLUTION}```"}]


def serial(runs: int, sandboxed: bool) -> float:
    started = time.perf_counter()
    for _ in range(runs):
        assert run_tests(SOLUTION, TESTS, sandboxed=sandboxed).outcome == "passed"
    return (time.perf_counter() - started) / runs


def pooled(runs: int, sandboxed: bool) -> float:
    reward = CodeReward(unsafe_run_code=not sandboxed)
    reward.sandboxed = sandboxed
    started = time.perf_counter()
    assert reward([[]] * runs, [ANSWER] * runs, tests=[TESTS] * runs) == [1.0] * runs
    return (time.perf_counter() - started) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (problem := sandbox_problem()) is not None:
        raise SystemExit(f"bench/sandbox.py: {problem} -- apt-get install bubblewrap")
    serial(2, True), serial(2, False)  # warm the page cache for both
    rows = {}
    for name, measure in (("one at a time", serial), (f"{os.cpu_count()} cores, pooled", pooled)):
        plain, boxed = measure(args.runs, False), measure(args.runs, True)
        rows[name] = {"unsandboxed_ms": round(plain * 1000, 1), "sandboxed_ms": round(boxed * 1000, 1),
                      "ratio": round(boxed / plain, 2)}
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'per answer':<22}{'unsandboxed':>14}{'bubblewrap':>14}{'ratio':>8}")
    for name, row in rows.items():
        print(f"{name:<22}{row['unsandboxed_ms']:>11.1f} ms{row['sandboxed_ms']:>11.1f} ms{row['ratio']:>7.2f}x")


if __name__ == "__main__":
    main()
