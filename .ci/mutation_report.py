"""The mutation score per module, from the results mutmut left in mutants/ (`make mutation`).

A mutant is *detected* when a test failed (killed) or when it ran past mutmut's CPU time
limit (timeout: the mutant looped). Survivors and mutants no selected test executes count
against the score, and so does a mutant whose tests could not be run (exit 255: mutmut's
worker caught an error, such as a test id pytest could not find; mutmut itself files these
under "timeout") or were not run yet ("not run"); the last column leaves those out. With
``--min P`` the exit status is 1 when a module scores below P % (all mutants counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

DETECTED = {"killed", "timeout"}
# mutmut's exit codes (mutmut/stats.py); anything else is "suspicious".
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "error",
    None: "not checked",
}


def results(root: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every module mutmut mutated."""
    by_module: dict[str, dict[str, str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        module = str(meta.relative_to(root)).removesuffix(".meta")
        by_module[module] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return by_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mutants", type=Path)
    parser.add_argument("--min", type=float, default=None, help="fail below this score (%%)")
    parser.add_argument("--survivors", action="store_true", help="list what was not detected")
    args = parser.parse_args(argv)

    by_module = results(args.root)
    if not by_module:
        print(f"no mutmut results under {args.root}/: run `make mutation`", file=sys.stderr)
        return 2
    print(
        "| module | mutants | killed | timeout | survived | no tests | not run | score "
        "| score of those run |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    low = []
    for module, statuses in by_module.items():
        count = Counter(statuses.values())
        counted = len(statuses) - count["skipped"]
        detected = sum(count[s] for s in DETECTED)
        other = counted - detected - count["survived"] - count["no tests"]
        score = 100.0 * detected / counted if counted else 100.0
        ran = counted - other
        of_run = 100.0 * detected / ran if ran else 100.0
        if args.min is not None and score < args.min:
            low.append(module)
        print(
            f"| {module} | {counted} | {count['killed']} | {count['timeout']} "
            f"| {count['survived']} | {count['no tests']} | {other} | {score:.1f} % "
            f"| {of_run:.1f} % |"
        )
    if args.survivors:
        for statuses in by_module.values():
            for name, status in statuses.items():
                if status not in DETECTED | {"skipped"}:
                    print(f"{status}: {name}")
    if low:
        print(f"below {args.min:g} %: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
