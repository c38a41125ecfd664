"""Uniform read access to a source given as a folder, a zip, or a folder of official zips.

Official archives are read in place (no extraction): a member ``images/a.tif`` of
``<src>/images.zip`` is listed as ``images/a.tif`` exactly as if it had been unzipped into
``<src>``. Directory entries, ``__MACOSX/`` trees and ``._name`` resource forks are skipped.

Files are addressed by a :data:`Ref` ``(zip_path or "", member or absolute path)`` so that a
task sent to a worker process is small and picklable; each process opens its own zip handle
(a handle inherited through ``fork`` shares its file offset with the parent).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

Ref = tuple[str, str]
# members are read whole into memory (images, masks, CSVs): a member declaring or decompressing to
# more than this is refused before it can exhaust memory (a zip bomb, or a wrong file in an archive)
MAX_MEMBER_BYTES = int(os.environ.get("CELLRCNN_MAX_MEMBER_BYTES", 2 << 30))
_JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_OPEN_ZIPS: dict[tuple[str, int], zipfile.ZipFile] = {}


def is_junk(name: str) -> bool:
    """True for directory entries and macOS/Windows metadata that are not data."""
    if name.endswith("/"):
        return True
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith("._") for p in parts) or parts[-1] in _JUNK_NAMES


def _zip(path: str) -> zipfile.ZipFile:
    key = (path, os.getpid())
    handle = _OPEN_ZIPS.get(key)
    if handle is None:
        handle = _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return handle


def read_ref(ref: Ref) -> bytes:
    """Bytes of a referenced file (zip member or plain file). Raises OSError/KeyError naming it."""
    archive, name = ref
    if archive:
        try:
            return _read_member(_zip(archive), name, f"{archive}:{name}")
        except KeyError as exc:
            raise FileNotFoundError(f"{archive}:{name}: no such member") from exc
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # corrupt member data
            raise OSError(f"{archive}:{name}: cannot read ({exc})") from exc
    size = Path(name).stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise OSError(f"{name}: {size:,} bytes, above the limit of {MAX_MEMBER_BYTES:,} (CELLRCNN_MAX_MEMBER_BYTES)")
    return Path(name).read_bytes()


def _read_member(handle: zipfile.ZipFile, name: str, where: str, limit: int | None = None) -> bytes:
    """A member's bytes, refusing one whose declared size exceeds ``limit`` (default
    :data:`MAX_MEMBER_BYTES`) before reading, and reading at most ``limit`` + 1 bytes, so a member
    whose header understates its size is reported as soon as it decompresses past the limit."""
    limit = MAX_MEMBER_BYTES if limit is None else limit
    info = handle.getinfo(name)
    if info.file_size > limit:
        raise OSError(f"{where}: declares {info.file_size:,} bytes uncompressed, above the limit of {limit:,} "
                      "(CELLRCNN_MAX_MEMBER_BYTES)")
    chunks, total = [], 0
    with handle.open(info) as member:  # in chunks: read(n) allocates n bytes up front
        while chunk := member.read(min(16 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(f"{where}: decompresses past the limit of {limit:,} bytes (CELLRCNN_MAX_MEMBER_BYTES)")
    return b"".join(chunks)


def ref_name(ref: Ref) -> str:
    """Human-readable location of a file, used in every report line."""
    return f"{ref[0]}:{ref[1]}" if ref[0] else ref[1]


def walk_files(root: Path) -> list[Path]:
    """Every file below ``root``, sorted, following symlinked folders (a user's data tree often
    links to the download); a folder reached twice through links is read once (no cycles)."""
    seen: set[str] = set()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(folder) / name for name in files)
    return sorted(found)


class SourceTree:
    """All data files below ``src`` (a folder or a ``.zip``), keyed by posix relative path."""

    def __init__(self, src: str | Path, mount_zips: bool = True):
        self.root = Path(src)
        self.files: dict[str, Ref] = {}
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root}: no such file or folder")
        if self.root.is_file():
            if not zipfile.is_zipfile(self.root):
                if self.root.suffix.lower() == ".zip":
                    raise ValueError(f"{self.root}: not a readable zip archive (truncated or corrupt: its "
                                     "central directory is missing; download it again)")
                raise ValueError(f"{self.root}: expected a folder or a .zip archive")
            self._mount(self.root)
            return
        for path in walk_files(self.root):
            rel = path.relative_to(self.root).as_posix()
            if not path.is_file() or is_junk(rel):
                continue
            if mount_zips and path.suffix.lower() == ".zip" and path.parent == self.root:
                self._mount(path)
            else:
                self.files[rel] = ("", str(path))

    def _mount(self, archive: Path) -> None:
        try:
            names = zipfile.ZipFile(archive).namelist()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{archive}: not a readable zip archive ({exc})") from exc
        for name in names:
            if not is_junk(name):
                # an extracted copy next to the zip wins: the user may have fixed files there
                self.files.setdefault(name, (str(archive), name))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> bytes:
        return read_ref(self.files[name])

    def find(self, suffix: str) -> str | None:
        """The shortest listed path equal to or ending with ``/suffix`` (None if absent)."""
        hits = [n for n in self.files if n == suffix or n.endswith("/" + suffix)]
        return min(hits, key=lambda n: (len(n), n)) if hits else None
