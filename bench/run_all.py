"""`make bench`: run every benchmark at its documented size and print the numbers.

Results are JSON lines after a "# machine:" line; docs/benchmarks.md records a run and the
method. Benchmarks report numbers; they do not pass or fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = [
    ["consume.py", "--concurrency", "1", "--seconds", "10"],
    ["consume.py", "--concurrency", "32", "--seconds", "10"],
    ["consume.py", "--concurrency", "32", "--seconds", "10", "--synchronous", "normal"],
    ["fanout.py", "--clients", "100", "--events", "200", "--rate", "20"],
    ["fanout.py", "--clients", "1000", "--events", "200", "--rate", "20"],
    ["cluster.py"],
]


def main() -> int:
    for args in RUNS:
        print(f"$ python bench/{' '.join(args)}", flush=True)
        result = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]])
        if result.returncode != 0:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
