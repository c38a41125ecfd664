"""Nuclei models compared per source on the images each source holds out.

    python bench/generalist.py --model shipped=cellrcnn/weights/nuclei.ckpt --model mix=outputs/.../calibrated.ckpt \
        [--diameters null,auto] [--split test] [--out bench/results/generalist]

Runs ``evaluate.py`` (``data=nuclei_mix``, every source: DSB2018, S-BSST265, MoNuSeg) for each
model and ``diameter`` setting and writes ``generalist.json`` (every metric, per source and per
acquisition group) and ``generalist.md`` (dsb_score / f1@0.5 / pq@0.5 per source). A checkpoint
that recorded its training images is checked against them: a source's images it trained on are
reported, never silently scored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOWN = ("dsb_score", "f1@0.5", "pq@0.5")


def evaluate(ckpt: str, diameter: str, split: str, out: Path, extra: list[str], threads: int) -> dict:
    from cellrcnn.config import compose_config
    from cellrcnn.evaluate import run

    overrides = [f"ckpt_path={ckpt}", "data=nuclei_mix", f"split={split}", f"diameter={diameter}",
                 "overlays=0", f"threads={threads}", "extra_metrics=true", *extra]
    start = time.perf_counter()
    metrics = run(compose_config("evaluate", overrides, out))
    result = json.loads((out / "metrics.json").read_text())
    return {"pooled": metrics, "by_group": result["by_group"], "seen_in_training": len(result["seen_in_training"]),
            "seconds": round(time.perf_counter() - start, 1)}


def table(results: dict) -> list[str]:
    """Rows: each source and the pooled set; columns: each model × diameter."""
    runs = list(results)
    sources = sorted({r["group"] for res in results.values() for r in res["by_group"] if r["field"] == "source"})
    lines = ["| images | " + " | ".join(runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for source in [*sources, "all"]:
        cells, n = [], 0
        for res in results.values():
            row = res["pooled"] if source == "all" else next(
                (r for r in res["by_group"] if r["field"] == "source" and r["group"] == source), None)
            n = int(row["n_images"]) if row else n
            cells.append(" / ".join(f"{row[k]:.3f}" for k in SHOWN) if row else "–")
        lines.append(f"| {source} ({n}) | " + " | ".join(cells) + " |")
    return lines


def error_table(results: dict) -> list[str]:
    """Where each run loses accuracy, per source: the share of objects found at IoU 0.5 and the
    mean IoU of those found (outline quality), per object size, and split / merged objects."""
    from cellrcnn.evaluation.matching import size_bin_names

    bins = size_bin_names()
    lines = ["| source | run | " + " | ".join(f"{b} px: n, found, IoU" for b in bins) + " | split | merged |",
             "|" + "---|" * (len(bins) + 4)]
    for key, res in results.items():
        for row in res["by_group"]:
            if row["field"] != "source" or "sq@0.5" not in row:
                continue
            cells = [f"{int(row[f'n_gt_{b}'])}, {row[f'recall@0.5_{b}']:.2f}, " + (
                     "–" if math.isnan(row[f"sq@0.5_{b}"]) else f"{row[f'sq@0.5_{b}']:.2f}")
                     if row[f"n_gt_{b}"] else "–" for b in bins]
            lines.append(f"| {row['group']} | {key} | " + " | ".join(cells) +
                         f" | {int(row['n_splits'])} | {int(row['n_merges'])} |")
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT (repeatable)")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="instead of evaluating: one table from earlier runs' generalist.json files")
    p.add_argument("--diameters", default="null,auto", help="diameter settings to compare (null, auto, gt, px)")
    p.add_argument("--split", default="test")
    p.add_argument("--source", action="append", default=[],
                   help="data.sources override, e.g. data.sources.monuseg=null (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="settings",
                   help="an evaluate.py option for every run, e.g. precision=float32 (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generalist")
    args = p.parse_args(argv)
    if args.merge:
        merged = {k: v for path in args.merge for k, v in json.loads(path.read_text()).items()}
        write(args.out, merged, "python bench/generalist.py --merge " + " ".join(map(str, args.merge)), args.split)
        return
    if not args.model:
        p.error("give --model NAME=CHECKPOINT (or --merge)")
    results = {}
    for spec in args.model:
        name, _, ckpt = spec.partition("=")
        for diameter in args.diameters.split(","):
            key = f"{name}, diameter={diameter}"
            print(f"[generalist] {key}", flush=True)
            results[key] = evaluate(ckpt, diameter, args.split, args.out / f"{name}_{diameter}",
                                    [*args.source, *args.settings], args.threads)
            results[key]["checkpoint"] = ckpt
    command = "python bench/generalist.py " + " ".join(f"--model {m}" for m in args.model) + \
        f" --diameters {args.diameters} --split {args.split}" + "".join(f" --source {o}" for o in args.source) + \
        "".join(f" --set {o}" for o in args.settings)
    write(args.out, results, command, args.split)


def write(out: Path, results: dict, command: str, split: str) -> None:
    """``generalist.json`` and ``generalist.md`` (the per-source table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalist.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    md = [f"# Nuclei models per source ({split} split of each source)", "",
          "dsb_score / f1@0.5 / pq@0.5 per source; `all` pools every image.", "", *table(results), "",
          f"Command: `{command}`"]
    errors = error_table(results)
    if errors:
        md += ["", "Where accuracy is lost: per object size (equivalent diameter at native resolution), the "
               "number of annotated objects, the share found (IoU >= 0.5) and the mean IoU of those found; "
               "objects split in two or more, predictions merging two or more.", "", *errors]
    seen = {k: r["seen_in_training"] for k, r in results.items() if r["seen_in_training"]}
    if seen:
        md += ["", f"Images these checkpoints trained on (scores optimistic): {seen}"]
    (out / "generalist.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
