"""The README's main job, as the README writes it: print its commands, or run them.

    python .ci/readme_job.py            # print the commands of README.md's "The main job" block
    python .ci/readme_job.py --run [N]  # run them in order, N times (default 1), from the repository root

The commands are the first fenced block after the heading `## The main job`, one a line, `#` comments
dropped; they run without a shell (split as a shell would split them), each failing run stopping the job.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main_job(readme: Path = ROOT / "README.md") -> list[list[str]]:
    text = readme.read_text()
    m = re.search(r"^## The main job[^\n]*\n(.*?)^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    if m is None:
        raise SystemExit(f"{readme}: no fenced block after '## The main job'")
    cmds = [shlex.split(line, comments=True) for line in m.group(2).splitlines()]
    return [c for c in cmds if c]


def main() -> None:
    cmds = main_job()
    if "--run" not in sys.argv:
        for c in cmds:
            print(shlex.join(c))
        return
    rest = sys.argv[sys.argv.index("--run") + 1:]
    times = int(rest[0]) if rest else 1
    for n in range(1, times + 1):
        for c in cmds:
            print(f"+ [{n}/{times}] {shlex.join(c)}", flush=True)
            t = time.perf_counter()
            r = subprocess.run(c, cwd=ROOT)
            print(f"  exit {r.returncode} in {time.perf_counter() - t:.1f} s", flush=True)
            if r.returncode != 0:
                raise SystemExit(f"the README's main job failed at: {shlex.join(c)}")


if __name__ == "__main__":
    main()
