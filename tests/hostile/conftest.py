"""Shared helpers of the hostile-input suite: every test here is marked ``hostile``, and cases that
could exhaust memory run in a subprocess under ``RLIMIT_AS`` so a regression fails the test
instead of the machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.hostile)


PRELUDE = textwrap.dedent("""
    import resource


    def limit_memory(budget_mb):
        # address space now (after the imports) plus a budget: a 22 GB allocation fails with MemoryError
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        budget = size + budget_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
""")


def run_limited(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` (which calls ``limit_memory(MB)`` after its imports) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` (links not followed) -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}
