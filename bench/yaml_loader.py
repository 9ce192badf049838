"""Constitution loading: PyYAML's pure-Python loader (the baseline) against its C loader (what cai uses
where libyaml is present), on the bundled default constitution's principles repeated to about 1 MB (the
size limit `cai.constitution` allows). Both compose the same text in the same run; prints seconds each
and the ratio.

    python bench/yaml_loader.py [--megabytes 1.0]
"""

import argparse
import time

import yaml

from cai.paths import bundled


def sized_constitution(megabytes: float) -> str:
    text = bundled("constitutions/default.yaml").read_text()
    head, _, principles = text.partition("critique_principles:\n")
    entries, copy = [], 0
    while sum(map(len, entries)) < megabytes * 2**20:
        entries.append(principles.split("\njudge_principles:")[0].replace("id: ", f"id: c{copy}-") + "\n")
        copy += 1
    return head + "critique_principles:\n" + "".join(entries)


def seconds(text: str, loader) -> float:
    start = time.perf_counter()
    yaml.compose(text, Loader=loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    args = parser.parse_args()
    if not yaml.__with_libyaml__:
        raise SystemExit("PyYAML here was built without libyaml: no C loader to measure")
    text = sized_constitution(args.megabytes)
    pure, fast = seconds(text, yaml.SafeLoader), seconds(text, yaml.CSafeLoader)
    print(f"{len(text) / 2**20:.2f} MB, {text.count('- id: ')} entries: pure-Python loader {pure:.2f} s, "
          f"C loader {fast:.2f} s, {pure / fast:.1f}x")


if __name__ == "__main__":
    main()
