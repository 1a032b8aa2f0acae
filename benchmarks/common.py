"""What the benchmark scripts share: the record of which commit was measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_describe() -> str:
    """The commit measured (and whether the tree had local changes), for the record in BENCHMARKS.md."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO)
        return f"commit {out.stdout.strip()}" if out.returncode == 0 else "commit unknown"
    except OSError:
        return "commit unknown"


def proc_status_kb(key: str) -> int:
    """A `/proc/self/status` field in kB (VmRSS, VmHWM: what the memory columns are read from)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")
