"""``python predict.py [ckpt_path=...] input=FILE_OR_DIR output=DIR``: segment images.

Per image ``<stem>.tif`` (label image, uint16; uint32 above 65,535 objects), ``<stem>_overlay.png``
and the ``exports`` asked for (``geojson``: QuPath polygons, ``imagej``: Fiji ROI zip); for the
whole run ``coco_results.json`` (COCO results, ``image_id`` as in ``predictions.json``),
``predictions.json`` (images, object counts, skipped files) and with ``measure=true``
``measurements.csv`` (one row per cell, ``anomaly=true`` adds shape-anomaly scores) and
``summary.csv`` (per image). Images larger than ``tile_size`` are predicted in overlapping tiles. A file that cannot be read is reported by name and skipped; the other images
of a folder are still processed. Files of a folder that are not images, and its subfolders (not
searched), are reported on the console and in ``predictions.json`` (``ignored``). The output folder
may be the input folder: what an earlier run wrote there (its ``predictions.json`` names every file)
is not taken for an input again. A file of the output folder that no run of predict wrote (the
user's ground truth ``cells.tif``) is kept like an input: the outputs that would replace it get
``_pred`` (``kept`` in ``predictions.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .errors import UsageError
from .io import IMAGE_SUFFIXES, ImageReadError, atomic_write, is_protected, protect_inputs, read_image

SHIPPED_CHECKPOINT = Path(__file__).parent / "weights" / "nuclei.ckpt"
MIN_CELLS_FOR_ANOMALY = 30  # fewer cells cannot define what a typical shape is
RECORD = "predictions.json"
ALWAYS_WRITTEN = ("coco_results.json", RECORD)  # by every run, whatever its options
TABLES = ("measurements", "summary")  # measure=true: per cell, per image
TABLE_SUFFIXES = {"csv": ".csv", "parquet": ".parquet"}  # table_format
ANOMALY_MODEL = "shape_anomaly_model.pt"  # anomaly=true
NAMED = 4  # files named in a console line; the rest are counted
log = logging.getLogger(__name__)


class InputWouldBeReplaced(UsageError, FileExistsError):
    """An output of the run has the name of a file of the input folder (the run's output folder)."""


class UnrecordedFileWouldBeReplaced(UsageError, FileExistsError):
    """A file the run writes for all images (``coco_results.json``, ...) is already in the output
    folder, but no recorded run of predict wrote it: its record was deleted, or it is the user's."""


@contextlib.contextmanager
def notes_of_this_image():
    """The warnings cellrcnn raises while one image is read and segmented, as a list of messages
    for the report and predictions.json (instead of Python's warning lines, which quote the
    source); other libraries' warnings go on as usual. Prediction runs one image at a time here."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    package = str(Path(__file__).parent)
    for w in caught:
        if str(w.filename).startswith(package) and issubclass(w.category, UserWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def say(message: str) -> None:
    """Print a line of the run's report, and keep it in the run's log file (``predict.log``; the
    predict config keeps the log's console handler for warnings, so nothing prints twice)."""
    print(message)
    log.info(message)


def resolve_checkpoint(ckpt_path: str | Path | None) -> Path:
    """``ckpt_path``, or the shipped model when None; a clear error when there is neither."""
    if ckpt_path:
        return Path(ckpt_path)
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    raise FileNotFoundError(
        f"no ckpt_path given and no shipped model at {SHIPPED_CHECKPOINT}; "
        "pass ckpt_path=path/to/model.ckpt (written by train.py under outputs/<experiment>/.../checkpoints/)"
    )


def input_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(candidate images, other files) of a file or folder; hidden files are ignored."""
    path = Path(path)
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p not in images]


def subfolders(path: Path, out: Path) -> list[Path]:
    """The visible subfolders of a folder input, which are not searched; the one that is (or holds)
    the output folder is no input of anyone's and is left out."""
    if not path.is_dir():
        return []
    out = out.resolve()
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.resolve() != out and p.resolve() not in out.parents)


def read_record(path: Path) -> dict | None:
    """An earlier run's ``predictions.json``, or None where there is none or the file is not one
    (a user's own file of that name)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: no JSON, or no text at all
        return None
    if not isinstance(record, dict):
        return None
    images, skipped = record.get("images"), record.get("skipped", [])
    ours = isinstance(images, list) and isinstance(skipped, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("file"), str) for entry in [*images, *skipped]
    ) and all(isinstance(entry.get("labels"), str) for entry in images)
    return record if ours else None


def _names(value) -> set[str]:
    """File names (no folders: an entry may not lead out of the output folder) of a list in a record."""
    return {Path(str(v)).name for v in value} if isinstance(value, list) else set()


def recorded_outputs(record: dict) -> set[str]:
    """The files a run wrote into its output folder, by its ``predictions.json``: each image's and the
    run's ``outputs``, and the ``earlier_outputs`` of the runs before it that were still there. A
    record older than these keys names each image's label image, whose stem is that of its exports
    (free_stem chose it so that no input had any export's name), and the files every run writes."""
    from .inference.exports import EXPORT_SUFFIXES

    names = _names(record.get("outputs")) or set(ALWAYS_WRITTEN)
    names |= _names(record.get("earlier_outputs"))
    for entry in record["images"]:
        stem = Path(entry["labels"]).stem
        names |= _names(entry.get("outputs")) or {Path(stem + suffix).name for suffix in EXPORT_SUFFIXES}
    return names


def recorded_inputs(record: dict | None, folder: Path) -> set[str]:
    """The files of ``folder`` a run took as inputs (segmented or unreadable): an input stays one.
    An input that is still found in another folder (``input=`` elsewhere) names no file here: the
    earlier run's ``x.tif`` made from ``images/x.tif`` is an output. One no longer found could have
    been here, and is counted so (the file is then kept, not replaced)."""
    here = folder.resolve()
    names = set()
    for entry in [*record["images"], *record.get("skipped", [])] if record else []:
        path = Path(entry["file"])  # as given then, relative to that run's working directory
        if not (path.is_file() and path.resolve().parent != here):
            names.add(path.name)
    return names


def made_from(stem: str, source: Path) -> bool:
    """Whether predict names the outputs of image ``source`` ``stem``: its own stem, with ``_pred``,
    ``_pred2``... (free_stem: an input had the name) or with its suffix (a second image of that stem)."""
    own, suffix = source.stem, source.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return False
    renamed = re.fullmatch(re.escape(own) + r"_pred\d*", stem) is not None
    return renamed or stem in (own, f"{own}_{source.suffix.lstrip('.')}")


def output_pairs(files: list[Path], sources: list[Path] | tuple = ()) -> set[str]:
    """The label image and overlay pairs (``<stem>.tif``, ``<stem>_overlay.png``) of ``files`` (of one
    folder) made from another image among them or among ``sources`` (this run's images, when they
    are in another folder): what a run wrote that left no record (it crashed, or its
    predictions.json was deleted). Both names and a source are needed, so a user's own
    ``x_overlay.png`` or ``x.tif`` alone is still an input."""
    by_name = {p.name: p for p in files}
    found = set()
    for overlay in files:
        stem = overlay.name.removesuffix("_overlay.png")
        label = by_name.get(f"{stem}.tif")
        if stem == overlay.name or label is None:
            continue
        if any(made_from(stem, p) for p in [*files, *sources] if p not in (label, overlay)):
            found |= {label.name, overlay.name}
    return found


def earlier_outputs(folder: Path, files: list[Path], sources: list[Path] | tuple = ()) -> dict[str, list[Path]]:
    """The ``files`` of ``folder`` (the output folder, often the input folder too) that an earlier
    run of predict wrote, by how they are known: listed in its predictions.json, or paired as a run
    writes them (:func:`output_pairs`). A file a record names as an input is never one of them."""
    record = read_record(folder / RECORD)
    inputs = recorded_inputs(record, folder)
    listed = recorded_outputs(record) - inputs if record else set()
    paired = output_pairs(files, sources) - inputs - listed
    files = sorted(files)
    return {"that an earlier run of predict wrote here (listed in its predictions.json)":
            [p for p in files if p.name in listed],
            "that look like an earlier run's outputs (a <stem>.tif and <stem>_overlay.png pair beside "
            "the image they are named after)": [p for p in files if p.name in paired]}


def still_here(record: dict | None, out: Path, rewritten: set[str]) -> list[dict]:
    """The image entries of an earlier run's record (its own and those it carried) whose label
    image is still in ``out`` and was not rewritten by this run: outputs that stay beside this run's,
    kept in its record as ``earlier_images`` so that no file there is left without its story."""
    if not record:
        return []
    entries = [*record["images"], *(e for e in record.get("earlier_images", []) if isinstance(e, dict))]
    return [e for e in entries if isinstance(e.get("labels"), str) and (out / Path(e["labels"]).name).is_file()
            and not ({Path(e["labels"]).name, *_names(e.get("outputs"))} & rewritten)]


def _some(names: list[str]) -> str:
    return ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def gather_inputs(source: Path, out: Path) -> tuple[list[Path], list[Path], dict[str, list[str]]]:
    """(images to segment, other files, what predictions.json records as ``ignored`` and
    ``earlier_outputs``) of ``input=``; says on the console what was ignored and why."""
    images, others = input_files(source)  # a lone file is tried whatever its suffix
    earlier = {}
    if source.is_dir() and os.path.samefile(source, out):  # out exists: run() made it
        earlier = earlier_outputs(out, [*images, *others])
    theirs = {p for group in earlier.values() for p in group}
    images, others = [p for p in images if p not in theirs], [p for p in others if p not in theirs]
    folders = subfolders(source, out)
    for why, files in earlier.items():
        if files:
            say(f"ignored {_count(len(files), 'file')} {why}: {_some([p.name for p in files])}")
    if others and source.is_dir():
        verb = "is" if len(others) == 1 else "are"
        say(f"ignored {_count(len(others), 'file')} that {verb} not an image of a supported format "
            f"({', '.join(IMAGE_SUFFIXES)}): {_some([p.name for p in others])}")
    if folders:
        say(f"ignored {_count(len(folders), 'subfolder')}: {_some([p.name + '/' for p in folders])} "
            "(subfolders are not searched; give one as input= to segment it)")
    if theirs and not images:  # a run over nothing but its own results would rewrite them as empty
        raise UsageError(f"input={source}: no images to segment: its image files are outputs of an "
                         "earlier run of predict (see above)", "add the images, or give another input=")
    ignored = {"ignored": [str(p) for p in [*others, *sorted(theirs)]] + [str(p) + os.sep for p in folders],
               "earlier_outputs": sorted(p.name for p in theirs)}
    return images, others, ignored


def output_folder_files(out: Path, images: list[Path]) -> tuple[list[Path], list[Path]]:
    """(files of ``out`` an earlier run of predict wrote, files of ``out`` that no run of predict
    wrote and that are no input of this run), to be called once the inputs are protected. The
    second are the user's (ground truth ``cells.tif`` beside the predictions), or a run's that left no
    record and whose pairs are not recognised: this run must not replace them. Hidden files count
    (a lone hidden input's outputs are hidden too)."""
    files = sorted(p for p in out.iterdir() if p.is_file())
    here = out.resolve()
    sources = [p for p in images if p.resolve().parent != here]  # those in out are among files
    ours = {p for group in earlier_outputs(out, files, sources).values() for p in group}
    return [p for p in files if p in ours], [p for p in files if p not in ours and not is_protected(p)]


def output_like(names: list[str]) -> list[str]:
    """The visible ``names`` a run could write (its run files, or an export of some image): the files
    kept in the output folder worth naming; the user's notes or a hidden .DS_Store are not."""
    from .inference.exports import EXPORT_SUFFIXES

    run_names = names_of_run_files()
    return [n for n in names if not n.startswith(".") and (n in run_names or n.endswith(EXPORT_SUFFIXES))]


def names_of_run_files() -> set[str]:
    """Every name :func:`run_files` can give, whatever the options."""
    tables = {f"{t}{s}" for t in TABLES for s in TABLE_SUFFIXES.values()}
    return {*ALWAYS_WRITTEN, *tables, ANOMALY_MODEL}


def say_kept(out: Path, names: list[str]) -> None:
    """Say once which files of the output folder this run leaves alone, and what happens instead."""
    if names:
        its = "its name" if len(names) == 1 else "their names"
        say(f"kept {_count(len(names), 'file')} already in {out} that no run of predict wrote: "
            f"{_some(names)}; outputs that would have {its} get _pred")


def check_run_files_free(out: Path, names: list[str], unrecorded: set[str] = frozenset()) -> None:
    """Before any image is predicted: no file the run writes for all images would replace an input
    (one of the user's own tables in the input folder), which atomic_write refuses at the end, nor
    a file of the output folder that no recorded run wrote (``unrecorded``): such a file has no
    _pred name to fall back on (the record names these files), so the run stops."""
    for name in names:
        if name in unrecorded:
            raise UnrecordedFileWouldBeReplaced(
                f"{out / name}: refusing to replace a file that was not written by a recorded run of predict "
                f"(no predictions.json in {out} lists it)", "move it away or choose another output folder")
        if is_protected(out / name):
            raise InputWouldBeReplaced(f"{out / name}: refusing to overwrite an input file",
                                       "choose another output folder, or move that file out of the input one")


def run_files(cfg: DictConfig) -> list[str]:
    """The files a run writes besides each image's (``shape_anomaly_model.pt`` where it has the cells)."""
    names = list(ALWAYS_WRITTEN)
    if cfg.get("measure"):
        names += [f"{table}{table_suffix(cfg)}" for table in TABLES]
        names += [ANOMALY_MODEL] if cfg.get("anomaly") else []
    return names


def table_suffix(cfg: DictConfig) -> str:
    return TABLE_SUFFIXES["parquet" if cfg.get("table_format") == "parquet" else "csv"]


def write_measurements(out: Path, tables: list, shapes: dict[str, tuple[int, int]], cfg: DictConfig) -> tuple:
    """``measurements.csv`` (or .parquet with ``table_format=parquet``): one row per cell, with
    ``anomaly_score`` / ``is_anomalous`` from a shape autoencoder fitted on this run's cells when
    ``anomaly=true``; ``summary.csv``: count, mean area and density per image (zero-cell images included).
    Returns (the table, the names of the files written)."""
    import pandas as pd

    from .inference import fit_anomaly_model, score_anomalies, summarize, write_table

    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["image", "label", "area_px"])
    if cfg.get("anomaly") and len(table) >= MIN_CELLS_FOR_ANOMALY:
        model = fit_anomaly_model(table)
        table = score_anomalies(model, table)
        model.save(out / ANOMALY_MODEL)
    elif cfg.get("anomaly"):
        say(f"anomaly=true needs at least {MIN_CELLS_FOR_ANOMALY} cells to learn typical shapes; found {len(table)}")
    written = [f"{name}{table_suffix(cfg)}" for name in TABLES]
    write_table(table, out / written[0])
    write_table(summarize(table, image_shapes=shapes, pixel_size=cfg.get("pixel_size")), out / written[1])
    return table, written + ([ANOMALY_MODEL] if "anomaly_score" in table else [])


def flag_anomalies_in_exports(out: Path, images: list[dict], table, formats: set[str]) -> None:
    """Rewrite the GeoJSON / ROI exports with the anomaly flags, which exist only once the shape
    model has seen every image's cells (the label images are read back from ``<stem>.tif``)."""
    from .inference import write_exports
    from .io import read_label_image

    for entry in images:
        rows = table[table["image"] == Path(entry["file"]).name]
        labels = read_label_image(out / entry["labels"])
        write_exports(out, Path(entry["labels"]).stem, labels, formats=tuple(sorted(formats)), measurements=rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of ``cfg.input`` into ``cfg.output``; returns the summary dict."""
    try:
        return predict_all(cfg)
    finally:  # also after an error: the next run in this thread (a notebook, a server) guards its own
        protect_inputs([])


def predict_all(cfg: DictConfig) -> dict[str, Any]:
    """:func:`run`, while this run's inputs are protected from being written over."""
    from .api import Segmenter
    from .inference.exports import coco_results, free_stem, write_coco_results, write_exports
    from .inference.scale import check_diameter

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_record(out / RECORD)  # replaced at the end: what it says of files that stay is carried on
    images, others, ignored = gather_inputs(Path(cfg.input), out)  # an earlier run's outputs left out
    protect_inputs([*images, *others])  # no output may replace an input (same folder, symlinks)
    ours, kept = output_folder_files(out, images)
    unrecorded = {p.name for p in kept}
    if ignored["earlier_outputs"]:  # the input folder holds a run's outputs: a run-level file of it
        unrecorded |= {p.name for p in others}  # that no record lists is a leftover, not an input
    check_run_files_free(out, run_files(cfg), unrecorded)  # before the model loads, not after every image
    protect_inputs([*images, *others, *kept])  # the user's files in the output folder are kept too
    kept_names = output_like([p.name for p in kept])
    say_kept(out, kept_names)
    # carried on in the record, so that a later run still knows them when this one did not rewrite them
    ignored["earlier_outputs"] = sorted({*ignored["earlier_outputs"], *(p.name for p in ours)})
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"))
    # the model with its input preparation, object size, tiling and thresholds (cellrcnn.api);
    # without ckpt_path a shipped model, by default the one that suits each image (model=auto)
    overlap = cfg.get("tile_overlap")
    options = {"tile_size": cfg.get("tile_size"), "tile_overlap": None if overlap is None else int(overlap),
               "score_threshold": cfg.get("score_threshold"), "tta": cfg.get("tta"),
               "polarity": str(cfg.get("polarity") or "auto"),
               "precision": str(cfg.get("precision") or "auto")}
    if cfg.get("ckpt_path"):
        segmenter = Segmenter.from_checkpoint(ckpt_path, **options)
    else:
        segmenter = Segmenter.from_pretrained(str(cfg.get("model") or "auto"), **options)
    check_diameter(cfg.get("diameter"), segmenter.object_diameter, str(ckpt_path))

    summary: dict[str, Any] = {"checkpoint": str(cfg.get("ckpt_path") or ckpt_path), "model": segmenter.name,
                               "images": [], "skipped": [], **ignored, "kept": kept_names,
                               "outputs": list(ALWAYS_WRITTEN)}
    results, tables, stems, shapes = [], [], set(), {}
    for path in images:
        try:
            with notes_of_this_image() as notes:
                raw = read_image(path, channel=cfg.get("channel"), plane=cfg.get("plane"))
                result = segmenter.segment(raw, diameter=cfg.get("diameter"), name=path.name, progress=True)
        except ImageReadError as exc:
            if Path(cfg.input).is_file():
                raise  # a single input: the error (naming the file) is the answer
            summary["skipped"].append({"file": str(path), "error": str(exc)})
            say(f"skipped {exc}")
            continue
        labels, scores, scaling = result.labels, result.scores, {**result.info, "notes": notes}
        for note in notes:  # replaced NaN pixels, a resize limited, ...: said once, kept with the image
            say(f"{path.name}: {note.removeprefix(f'{path}: ')}")  # a reader's note names the file itself
        for reason in scaling.get("warnings", []):  # the count of such an image needs a look
            say(f"{path.name}: do not trust this result blindly: {reason}")
        if scaling["factor"] != 1.0:
            # diameter=shrink or auto measured the objects; diameter=<px> is the user's word for it
            given = scaling["diameter"] if isinstance(scaling["diameter"], int | float) else None
            measured = scaling.get("measured_diameter") or given
            sizes = (f"objects of {measured:.0f} px median diameter brought to {measured * scaling['factor']:.0f} px"
                     if measured else "objects brought to the model's size")
            say(f"{path.name}: predicted at {scaling['factor']:.3g}x size ({sizes})")
        stem = free_stem(out, path.stem if path.stem not in stems else f"{path.stem}_{path.suffix.lstrip('.')}", stems)
        stems.add(stem)
        image_id = len(summary["images"]) + 1
        objects = coco_results(labels, image_id, scores)
        results += objects
        table = None
        if cfg.get("measure"):  # pandas and scikit-image's region properties only when asked for
            from .inference.measurements import measure

            table = measure(labels, raw, path.name, scores, cfg.get("pixel_size"))
        if table is not None:
            tables.append(table)
        formats = ("tiff", *cfg.get("exports", ()), *(("overlay",) if cfg.get("overlays", True) else ()))
        # the files written are recorded, so that a rerun into the input folder leaves them out
        written = write_exports(out, stem, labels, image_raw=raw, scores=scores, formats=formats,
                                measurements=table)
        shapes[path.name] = labels.shape
        n = len(objects)
        summary["images"].append({"id": image_id, "file": str(path), "labels": f"{stem}.tif", "height": int(labels.shape[0]),
                                  "width": int(labels.shape[1]), "n_objects": n, **scaling,
                                  "outputs": sorted(p.name for p in written.values())})
        # a field filled by bright nuclei can pass for brightfield: say so where the user looks
        seen = (" (read as dark objects on a bright background; polarity=bright if they are bright)"
                if scaling.get("seen_as") == "inverted" and options["polarity"] == "auto" else "")
        by = f" by {scaling['model']}" if segmenter.name == "auto" else ""  # the model each image went to
        say(f"{path.name}: {n} objects{seen}{by} -> {out / (stem + '.tif')}")
    restricted = sorted({e["model_choice"] for e in summary["images"] if "non-commercial" in e.get("model_choice", "")})
    for reason in restricted:  # a licence is said on screen, not only in predictions.json
        went = [Path(e["file"]).name for e in summary["images"] if e.get("model_choice") == reason]
        say(f"{_count(len(went), 'image')} ({_some(went)}): {reason}")
    if not cfg.get("ckpt_path"):  # the shipped model(s) that predicted, not just the default one
        used = sorted({entry["checkpoint"] for entry in summary["images"]})
        summary["checkpoint"] = ", ".join(used) or summary["checkpoint"]
    write_coco_results(out / "coco_results.json", results)
    if cfg.get("measure"):
        table, tables_written = write_measurements(out, tables, shapes, cfg)
        summary["outputs"] += tables_written
        if "is_anomalous" in table and {"geojson", "imagej"} & set(cfg.get("exports") or ()):
            flag_anomalies_in_exports(out, summary["images"], table, {"geojson", "imagej"} & set(cfg.exports))
    earlier = still_here(previous, out, {name for entry in summary["images"] for name in entry["outputs"]})
    if earlier:
        summary["earlier_images"] = earlier
        say(f"{out} still holds the outputs of {_count(len(earlier), 'image')} an earlier run predicted "
            f"({_some([Path(e['file']).name for e in earlier])}): their records are kept in predictions.json "
            "under earlier_images, and coco_results.json lists this run's images only")
    atomic_write(out / RECORD, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    if summary["skipped"]:
        say(f"{len(summary['skipped'])} file(s) could not be read and were skipped:")
        for s in summary["skipped"]:
            say(f"  {s['error']}")
    if images and not summary["images"]:  # nothing was predicted: a failed run, not a success
        # the command line prints this without a traceback and exits non-zero
        raise ImageReadError(f"all {len(images)} input file(s) of {cfg.input} were skipped (see above)")
    return summary


if __name__ == "__main__":  # python -m cellrcnn.predict
    from cellrcnn.cli import predict_and_exit

    predict_and_exit()
