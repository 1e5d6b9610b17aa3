"""Write docs/bad-input.md by running every case of tests/bad_input_cases.py.

    python tests/scripts/bad_input_doc.py [OUT.md]

Each case runs in a fresh temporary folder, as tests/test_bad_input.py runs it; a case that misbehaves (more
than one line, another exit code, a traceback, a changed file) stops the script, so the doc shows only what
the commands really print.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bad_input_cases as bic  # noqa: E402

HEAD = """# Bad input: what each command says

Every case below is a command run in a folder holding `profile.json` (a stored real profile, gpt-125m),
`plan.yaml` (a plan for it, `run.script: tiny_train.py`), `tiny_train.py` and a text file `notes.txt`, plus
what the case sets up (a symlink, a named pipe, an edited copy of the profile...). Each prints one line on
stderr and exits 1 (130 on Ctrl-C), without a traceback unless the user's own script raised, and no file in
the folder changes, `--force` or not: outputs are checked before anything runs, and memtune replaces only
regular files (never a symlink, a device or a folder). `<dir>` is the folder, `N` a count that depends on
the machine's speed, `<digest>` the profile's hash.

The table is generated: `python tests/scripts/bad_input_doc.py` runs every case of
`tests/bad_input_cases.py` and writes this file; `tests/test_bad_input.py` runs the same cases (checking the
exit code, the single line, no traceback, no changed file) and fails when this table is not what they print.

What is not a one-line refusal is tested in `tests/test_robustness.py`: a relative `run.script` or
`provenance.profile` is read beside the plan file first (then from the current folder, where tune's
verification runs); `report` takes the plan's profile from beside the plan, never a same-named file of the
current folder; a resumed `tune` says `resuming N trials of study ...` on stderr and its `--timeout` bounds the
whole search, writes to the study included (verification comes on top); Ctrl-C inside the search keeps every
trial run so far and the same command resumes them; as root, `--force` onto a character device node (as
`/dev/full`) is refused; without root, a folder without write permission is refused before the run; every
option of every command has help.

"""


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else bic.ROOT / "docs" / "bad-input.md"
    rows = []
    with tempfile.TemporaryDirectory(prefix="memtune-bad-input-") as tmp:
        for case in bic.CASES:
            d = Path(tmp) / case.id
            d.mkdir()
            o = bic.run_case(case, d)
            bad = bic.problems(case, o, d)
            if bad:
                sys.exit(f"case {case.id} ({case.what}): {bad}")
            rows.append((case, o, d))
            print(f"{case.id}  exit {o.code}  {o.message(d)[:100]}", flush=True)
        table = bic.render_table(rows)
    out.write_text(HEAD + table)
    print(f"wrote {out} ({len(rows)} cases)")


if __name__ == "__main__":
    main()
