"""Mutation check: does the suite catch plausible bugs in the estimators, the scaling, the
resume path, the fusion and the state-space code?

Each mutation replaces one exact snippet of one source file by a plausible wrong version,
runs the tests that should notice, and restores the file. A mutant is *caught* when those
tests fail. Mutants are applied in place, in the checkout the package imports from (an
editable install maps ``pvae.models`` and ``pvae.inference`` to this checkout, so a copy
elsewhere would test the original code). The original bytes are kept in a backup file next to
the mutated one and restored on exit, on Ctrl-C, and by the next run if a run was killed.

    python scripts/mutate.py            # all mutants, prints caught/total
    python scripts/mutate.py --list     # the mutants and the tests each runs
    python scripts/mutate.py -k free    # only mutants whose name contains "free"

Exit status 0 when every mutant is caught, 1 otherwise (2 on a stale or missing snippet).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKUP = ".mutate-backup"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths, relative to the root


# The mutants: filled in below, grouped by what they break.
MUTATIONS: list[Mutation] = []


def _restore_stale() -> None:
    for backup in ROOT.rglob(f"*{BACKUP}"):
        if ".venv" in backup.parts:
            continue
        target = backup.with_name(backup.name[: -len(BACKUP)])
        os.replace(backup, target)
        print(f"restored {target.relative_to(ROOT)} from a killed run", file=sys.stderr)


def _check(mutation: Mutation) -> str:
    text = (ROOT / mutation.path).read_text()
    count = text.count(mutation.old)
    if count != 1:
        return f"{mutation.name}: snippet found {count} times in {mutation.path} (expected once)"
    return ""


def _run(mutation: Mutation, python: str, timeout: float) -> tuple[bool, float, str]:
    path = ROOT / mutation.path
    backup = path.with_name(path.name + BACKUP)
    original = path.read_bytes()
    backup.write_bytes(original)
    start = time.perf_counter()
    try:
        path.write_text(original.decode().replace(mutation.old, mutation.new, 1))
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return True, time.perf_counter() - start, "timed out (counted as caught)"
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode == 5:
            raise SystemExit(f"{mutation.name}: the tests {mutation.tests} collected nothing")
        return proc.returncode != 0, time.perf_counter() - start, tail
    finally:
        path.write_bytes(original)
        backup.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    args = parser.parse_args(argv)
    _restore_stale()
    chosen = [m for m in MUTATIONS if args.k in m.name]
    stale = [problem for m in chosen if (problem := _check(m))]
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    caught = 0
    for m in chosen:
        killed, seconds, tail = _run(m, args.python, args.timeout)
        caught += killed
        print(f"{'caught ' if killed else 'MISSED '} {m.name:40s} {seconds:6.1f} s  {tail}")
        sys.stdout.flush()
    print(f"\nmutation score: {caught}/{len(chosen)} caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
