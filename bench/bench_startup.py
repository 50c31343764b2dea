"""Start-up time of the command line: `--help` and `search --help`, this tree against another
checkout (the commit before the lazy CLI), side by side in one run.

    python bench/bench_startup.py --baseline /tmp/old-site --repeats 5

``--baseline`` is a folder holding an importable ``simsiam_embed`` of the other version (its
``models`` and ``cli`` inside it, as they install). Reports the median wall time and the median
CPU time of the child (user + system: less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROBE = "import sys; from simsiam_embed.cli.main import main; sys.argv = ['simsiam-embed', *sys.argv[1:]]; main()"
#: For the baseline: this checkout's editable install hooks the import system; drop that hook so
#: PYTHONPATH's copy is the one imported.
UNHOOK = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]; "


def measure(args: list[str], pythonpath: str | None, repeats: int) -> tuple[float, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        probe = (UNHOOK if pythonpath else "") + PROBE
        # From a neutral folder: with -c, the working directory comes first on sys.path.
        subprocess.run([sys.executable, "-c", probe, *args], env=env, check=True, capture_output=True,
                       cwd=tempfile.gettempdir())
        walls.append(time.perf_counter() - began)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    print("| command | before: wall / CPU (s) | after: wall / CPU (s) |\n| --- | --- | --- |")
    for args in (["--help"], ["search", "--help"], ["pretrain", "--help"]):
        old = measure(args, options.baseline, options.repeats)
        new = measure(args, None, options.repeats)
        print(f"| `simsiam-embed {' '.join(args)}` | {old[0]:.2f} / {old[1]:.2f} | {new[0]:.2f} / {new[1]:.2f} |")


if __name__ == "__main__":
    main()
