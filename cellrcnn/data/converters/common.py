"""Shared machinery of every converter: per-image results, the report, the worker pool and
the deterministic COCO writer.

A converter lists its images as small picklable tasks, maps a module-level worker over them
(:func:`run_tasks`, a multiprocessing pool with a progress bar) and hands the resulting
:class:`ImageResult` list to :func:`write_coco`. Problems are collected per file: the run goes
on and lists them at the end, or stops at the first one with ``strict=True``.

Output (see INTERFACES.md): ``<out>/images/<file_name>`` and ``<out>/annotations/{train,val,test}.json``
(all three always written), plus ``<out>/conversion.json`` (counts and skipped files).
Ids are assigned after sorting by a stable key, JSON is written compactly with a fixed key
order and no timestamps, so a re-run produces byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cellrcnn.data.splits import DEFAULT_FRACTIONS, SPLITS, assign_split, hash_unit, split_salt


class ConversionError(RuntimeError):
    """A conversion stopped (``--strict``) or cannot start; the message names the file."""


@dataclass
class ImageResult:
    """What a worker made of one source image. ``ok=False``: the image is not written."""

    key: str
    file_name: str = ""
    height: int = 0
    width: int = 0
    annotations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    split: str | None = None
    n_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    ok: bool = True
    is_image: bool = True  # False for a placeholder that only carries instances lost before reading

    @contextlib.contextmanager
    def guard(self, name: str, fatal: bool = True):
        """Turn any exception in the block into a reported problem naming ``name``;
        ``fatal`` ones drop the whole image, others only the file (e.g. one mask)."""
        try:
            yield
        except Exception as exc:  # every decoder raises its own type; report them alike
            reason = str(exc) if str(exc).startswith(name) else f"{type(exc).__name__}: {exc}"
            self.problems.append((name, reason.replace(f"{name}: ", "", 1)))
            if fatal:
                self.ok = False

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


@dataclass
class Report:
    """Problems met while converting; raises at the first one when ``strict``."""

    strict: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)

    def problem(self, name: str, reason: str) -> None:
        self.problems.append((name, reason))
        if self.strict:
            raise ConversionError(f"{name}: {reason} (stopped by --strict)")


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # macOS/Windows
        return max(1, min(os.cpu_count() or 1, 8))


def run_tasks(
    worker: Callable[[object], ImageResult],
    tasks: Sequence,
    report: Report,
    workers: int | None = None,
    desc: str = "images",
) -> list[ImageResult]:
    """Map ``worker`` (a module-level function) over ``tasks`` with a progress bar.

    Problems found by workers go to ``report`` as results arrive, so ``strict`` stops early.
    """
    from tqdm import tqdm

    workers = default_workers() if workers is None else max(1, workers)
    results: list[ImageResult] = []
    bar = tqdm(total=len(tasks), desc=desc, unit="img", mininterval=0.5, file=sys.stderr)

    def collect(stream: Iterable[ImageResult]) -> None:
        for res in stream:
            results.append(res)
            bar.update(1)
            for name, reason in res.problems:
                report.problem(name, reason)

    try:
        if workers == 1 or len(tasks) < 2:
            collect(map(worker, tasks))
        else:
            import multiprocessing

            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            with multiprocessing.get_context().Pool(workers) as pool:
                collect(pool.imap_unordered(worker, tasks, chunksize=chunk))
    finally:
        bar.close()
    return results


def encode_mask(mask: np.ndarray) -> dict:
    """H×W mask (non-zero = object) -> compressed COCO RLE, identical to
    ``pycocotools.mask.encode(np.asfortranarray(mask))`` but computed on the columns the object
    spans: a full-image column-major copy per mask cost more than decoding its PNG."""
    mask = np.asarray(mask)
    h, w = mask.shape
    u8 = mask.view(np.uint8) if mask.dtype == bool else mask
    x, _, bw, _ = cv2.boundingRect(u8 if u8.dtype == np.uint8 else (mask != 0).astype(np.uint8))
    if bw == 0:
        return mask_utils.frPyObjects({"size": [h, w], "counts": [h * w]}, h, w)
    flat = np.ascontiguousarray((mask[:, x : x + bw] != 0).T).ravel()  # column-major of the span
    edges = np.flatnonzero(np.diff(flat.view(np.int8), prepend=0, append=0)) + x * h
    bounds = np.concatenate(([0], edges, [h * w] if edges[-1] < h * w else []))  # no empty last run
    return mask_utils.frPyObjects({"size": [h, w], "counts": np.diff(bounds).tolist()}, h, w)


def mask_annotation(mask: np.ndarray, category_id: int = 1, **extra) -> dict | None:
    """H×W binary mask -> COCO annotation (compressed RLE, area, xywh bbox); None if empty."""
    rle = encode_mask(mask)
    area = int(mask_utils.area(rle))
    if area == 0:
        return None
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    seg = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"category_id": category_id, "segmentation": seg, "area": area, "bbox": bbox, "iscrowd": 0, **extra}


def box_annotation(x: float, y: float, w: float, h: float, category_id: int, **extra) -> dict:
    """Box-only COCO annotation (no ``segmentation`` key), area = box area in px²."""
    return {"category_id": category_id, "area": float(w * h), "bbox": [float(x), float(y), float(w), float(h)],
            "iscrowd": 0, **extra}


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = "") -> str:
    """Split of an image by the project's one split rule (:mod:`cellrcnn.data.splits`) on its own key."""
    return assign_split(key, fractions, salt)


def parse_fractions(text: str | Sequence[float] | None) -> tuple[float, float, float]:
    """``"80,10,10"`` (percent or fractions) -> normalised (train, val, test) fractions."""
    if text is None:
        return DEFAULT_FRACTIONS
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"--splits needs three non-negative numbers train,val,test; got {text!r}")
    return tuple(v / sum(values) for v in values)  # type: ignore[return-value]


def choose_split(res: ImageResult, fractions: Sequence[float], carve_val: bool = False, salt: str = "") -> str:
    """Official split when the source has one, else by hash (``salt``: the source's, see
    :func:`cellrcnn.data.splits.split_salt`). ``carve_val``: the source is split only into
    train/test, so validation images come by hash from train (val share = val / (train + val))."""
    if res.split is None:
        return hash_split(res.key, fractions, salt)
    if carve_val and res.split == "train" and fractions[1] > 0:
        return hash_split(res.key, (fractions[0], fractions[1], 0.0), salt)
    return res.split


def check_relative_name(name: object, what: str = "file_name") -> str:
    """``name`` if it is a safe relative posix path (what COCO ``file_name`` and a merge's source
    folder must be), else ValueError: absolute paths, drive letters, backslashes, ``..`` or empty
    parts and control characters would place a file outside the dataset folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} {name!r} is not a non-empty string")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":")
            or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in name)):
        raise ValueError(f"{what} {name!r} is not a plain relative path inside the dataset folder")
    return name


def inside(root: Path, rel: str, what: str = "file_name") -> Path:
    """``root / rel`` for a safe ``rel`` (:func:`check_relative_name`) that also stays inside
    ``root`` once symlinks are resolved."""
    path = Path(root) / check_relative_name(rel, what)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"{what} {rel!r} leads outside {root} (through a symbolic link)")
    return path


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically; leave an identical existing file untouched (cheap, safe re-runs).
    A path with a ``..`` part (a hostile archive member name) is refused."""
    if ".." in Path(path).parts:
        raise ValueError(f"{path}: refusing to write through '..'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_coco(
    out: str | Path,
    results: list[ImageResult],
    *,
    source: str,
    licence: str,
    url: str,
    categories: list[dict],
    report: Report,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    options: dict | None = None,
    annotation_only: bool = False,
    carve_val: bool = False,
    ensure_val: bool = False,
) -> Path:
    """Assign ids and splits, write the three annotation files and the report; print the counts.
    ``ensure_val``: with 3 or more images and none in ``val`` by hash, move one train image there
    (see :func:`ensure_one_val`)."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    recorded = recorded_images(out)  # what the previous conversion here wrote, read before replacing it
    kept = sorted((r for r in results if r.ok), key=lambda r: r.key)
    seen: dict[str, str] = {}
    for res in kept:
        if res.file_name in seen:
            report.problem(res.file_name, f"written by two source images ({seen[res.file_name]}, {res.key})")
        seen[res.file_name] = res.key
    info = {"description": f"{source} converted to COCO by cellrcnn", "source": source, "licence": licence,
            "url": url, "converter": f"cellrcnn.data.converters ({source})",
            "annotation_only": annotation_only, "options": options or {}}
    docs = {s: {"info": {**info, "split": s}, "licenses": [{"id": 1, "name": licence, "url": url}],
                "categories": categories, "images": [], "annotations": []} for s in SPLITS}
    ann_id = 0
    chosen = [choose_split(res, fractions, carve_val, split_salt(source)) for res in kept]
    if ensure_val and fractions[1] > 0:
        ensure_one_val(kept, chosen, source)
    for image_id, (res, split) in enumerate(zip(kept, chosen, strict=True), start=1):
        doc = docs[split]
        doc["images"].append({"id": image_id, "file_name": res.file_name, "height": res.height,
                              "width": res.width, "source": source, **res.extra})
        for ann in res.annotations:
            ann_id += 1
            doc["annotations"].append({"id": ann_id, "image_id": image_id, **ann})
    run = run_id(docs)
    files = {}
    for split, doc in docs.items():
        doc["info"]["run"] = run
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n"
        files[out / "annotations" / f"{split}.json"] = text.encode("utf-8")
    write_together(files)
    removed = remove_stale_images(out, recorded, {r.file_name for r in kept} if not annotation_only else set())

    n_read = sum(r.n_read for r in results)
    dropped: dict[str, int] = {}
    for res in results:
        for reason, count in res.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    lost = sum(r.n_read - len(r.annotations) - sum(r.dropped.values()) for r in results if r.ok)
    lost += sum(r.n_read for r in results if not r.ok)
    summary = {"source": source, "images_read": sum(r.is_image for r in results), "images_written": len(kept),
               "instances_read": n_read, "instances_written": ann_id, "dropped": dict(sorted(dropped.items())),
               "instances_in_skipped_files": lost,
               "splits": {s: {"images": len(d["images"]), "instances": len(d["annotations"])} for s, d in docs.items()},
               "skipped": [{"file": n, "reason": r} for n, r in report.problems], "run": run,
               "removed_stale_images": removed,
               "images_without_annotations": sorted(r.file_name for r in kept if not r.annotations)}
    write_bytes(out / "conversion.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    print_summary(summary)
    return out


def ensure_one_val(kept: list[ImageResult], chosen: list[str], source: str) -> None:
    """A small set (a user's 5-20 images) can leave ``val`` empty by hash, and training would
    then run without validation. With >= 3 images and none in val, the hash-split train image
    nearest the val share (largest hash unit) moves to val; official splits and test never move,
    so held-out test images stay those of the split rule. Says so when it moves one, and when
    ``test`` is empty."""
    if kept and "test" not in chosen:
        print(f"{source}: no image fell in test by hash ({len(kept)} images): score on val, or use more images "
              "or --splits with a larger test share")
    if len(kept) < 3 or "val" in chosen:
        return
    movable = [i for i, (res, split) in enumerate(zip(kept, chosen, strict=True))
               if split == "train" and res.split in (None, "train")]
    if not movable:
        return
    pick = max(movable, key=lambda i: (hash_unit(kept[i].key, split_salt(source)), kept[i].key))
    chosen[pick] = "val"
    print(f"{source}: no image fell in val by hash ({len(kept)} images); moved {kept[pick].file_name} "
          "from train to val so that validation is not empty")


def run_id(docs: dict[str, dict]) -> str:
    """Identity of one conversion run, written into every split's ``info.run``: a hash of the
    options and of which images and annotation ids each split holds (deterministic, so a re-run
    stays byte-identical). ``validate`` checks that all splits carry the same one."""
    digest = hashlib.sha256()
    for split in sorted(docs):
        doc = docs[split]
        info = {k: v for k, v in doc["info"].items() if k not in ("split", "run")}
        digest.update(json.dumps([split, info, [(im["id"], im["file_name"]) for im in doc["images"]],
                                  [a["id"] for a in doc["annotations"]]], sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:16]


def write_together(files: dict[Path, bytes]) -> None:
    """Write several files as one step as far as a file system allows: every temporary file is
    complete before the first rename, so an interruption while writing leaves the old set whole."""
    temps = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            temps.append((tmp, path))
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()


def _is_cellrcnn_doc(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    info = doc.get("info") if isinstance(doc, dict) else None
    return doc if isinstance(info, dict) and "cellrcnn" in str(info.get("description", "")) else None


def recorded_images(out: Path) -> set[str]:
    """Image files an earlier conversion (or merge) of this project recorded in ``out``: the
    ``file_name`` of every image of its ``annotations/{train,val,test}.json``."""
    names: set[str] = set()
    for split in SPLITS:
        doc = _is_cellrcnn_doc(out / "annotations" / f"{split}.json")
        for img in (doc or {}).get("images", []):
            if isinstance(img, dict) and isinstance(img.get("file_name"), str):
                names.add(img["file_name"])
    return names


def is_previous_output(out: Path) -> bool:
    """Whether ``out`` holds a conversion or merge written by this project."""
    return (out / "conversion.json").is_file() or any(
        _is_cellrcnn_doc(out / "annotations" / f"{s}.json") is not None for s in SPLITS
    )


def check_output_folder(out: str | Path, force: bool = False) -> None:
    """Refuse an output folder that holds anything but an earlier output of this project, unless
    ``force`` (its other files are then kept: only recorded files are ever removed)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")
    if force or not any(out.iterdir()) or is_previous_output(out):
        return
    raise ConversionError(
        f"--out {out} is not empty and holds no earlier conversion; choose an empty or new folder, "
        "or pass --force to write into it (files that no conversion recorded are never removed)"
    )


def remove_stale_images(out: Path, recorded: set[str], keep: set[str]) -> list[str]:
    """Remove the images an earlier run recorded (``recorded``) that this run did not write
    (``keep``): they would be orphans. Files nobody recorded are left alone. Returns and prints
    the removed names."""
    root = out / "images"
    removed = []
    for name in sorted(recorded - keep):
        try:
            path = inside(root, name)
        except ValueError:
            continue  # a hostile name in an old file: never followed
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
            parent = path.parent
            while parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    if removed:
        print(f"removed {len(removed)} image(s) of the earlier conversion that this one no longer writes: "
              + ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))
    return removed


def print_summary(s: dict) -> None:
    """``621 images, 24,006 instances read; 24,006 written`` plus drops, splits and skipped files."""
    extra = ", ".join(f"{n:,} {why}" for why, n in s["dropped"].items())
    print(f"{s['source']}: {s['images_read']:,} images, {s['instances_read']:,} instances read; "
          f"{s['instances_written']:,} written" + (f" ({extra} dropped by rule)" if extra else ""))
    print("  splits: " + ", ".join(f"{k} {v['images']:,} images / {v['instances']:,} instances"
                                   for k, v in s["splits"].items()))
    if s["images_written"] != s["images_read"] or s["instances_in_skipped_files"]:
        print(f"  {s['images_read'] - s['images_written']:,} images and "
              f"{s['instances_in_skipped_files']:,} instances not written because of the files below")
    empty = s.get("images_without_annotations", [])
    if empty and len(empty) == s["images_written"]:
        print(f"  WARNING: none of the {len(empty):,} images written has an annotation: the masks or labels "
              "were not found (check the source layout) or the images hold no objects", file=sys.stderr)
    elif empty:
        print(f"  warning: {len(empty):,} of {s['images_written']:,} images have no annotations: "
              + ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    if s["skipped"]:
        print(f"  skipped {len(s['skipped'])} file(s):")
        for item in s["skipped"]:
            print(f"    {item['file']}: {item['reason']}")
