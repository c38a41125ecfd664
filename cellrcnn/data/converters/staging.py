"""A conversion committed as one step: written into a staging folder beside ``--out``, then
swapped in. An interrupted or failed conversion leaves ``--out`` exactly as it was (never
``train.json`` of the new run beside ``val.json`` of the old one).

The staging folder starts as hard links to every file of ``--out`` (a copy where links are not
possible), so an unchanged image stays the same file and a re-run still costs little. Converters
replace files only through :func:`cellrcnn.data.converters.common.write_bytes` (temporary file,
then rename), which breaks the link instead of writing into the file the old folder shares.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def begin(out: str | Path) -> Path:
    """A fresh staging folder ``.<name>.partial-<pid>`` beside ``out``, holding ``out``'s files."""
    out = Path(out)
    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        shutil.copytree(out, stage, symlinks=True, copy_function=_link_or_copy)
    else:
        stage.mkdir()
    return stage


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def commit(stage: Path, out: str | Path) -> None:
    """Swap the finished ``stage`` in as ``out`` (two renames; the old folder is removed after)."""
    out = Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(stage, out)
        shutil.rmtree(old)
    else:
        os.rename(stage, out)


def discard(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
