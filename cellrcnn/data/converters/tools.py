"""Operations on converted folders: merge several into one, and dataset statistics with the
anchor sizes and detection limits they suggest for Mask R-CNN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cellrcnn.data.converters.common import (
    SPLITS,
    check_output_folder,
    check_relative_name,
    inside,
    recorded_images,
    remove_stale_images,
    run_id,
    write_bytes,
    write_together,
)
from cellrcnn.data.converters.validate import load_split_files


def merge(out: str | Path, dirs: list[str | Path], force: bool = False) -> Path:
    """Merge converted folders into ``out``: split by split, images copied to
    ``images/<source>/<file>`` and tagged with ``source``, categories united by name, all ids
    renumbered (images, then annotations, in argument order).

    Every ``info.source`` and ``file_name`` must be a plain relative name (no ``..``, no absolute
    path): they become paths under ``out``. ``out`` must be new, empty or an earlier output of
    this project unless ``force``."""
    out = Path(out)
    check_output_folder(out, force)
    docs = []
    names: list[str] = []
    for d in dirs:
        d = Path(d)
        if d.resolve() == out.resolve():
            raise ValueError(f"{d}: cannot merge a folder into itself")
        split_docs = load_split_files(d)
        if not split_docs:
            raise ValueError(f"{d}: no annotations/*.json (not a converted folder)")
        info = next(iter(split_docs.values())).get("info") or {}
        name = check_relative_name(str(info.get("source") or d.name), f"{d}: info.source")
        if "/" in name:
            raise ValueError(f"{d}: info.source {name!r} must be a single folder name")
        for split, doc in split_docs.items():
            for img in doc.get("images", []):
                check_relative_name(img.get("file_name") if isinstance(img, dict) else img,
                                    f"{d}/annotations/{split}.json: file_name")
        while name in names:  # two folders of one source stay apart
            name += "_2"
        names.append(name)
        docs.append((d, name, info, split_docs))
    cat_ids: dict[str, int] = {}
    for _, _, _, split_docs in docs:
        for doc in split_docs.values():
            for cat in sorted(doc["categories"], key=lambda c: c["id"]):
                cat_ids.setdefault(cat["name"], len(cat_ids) + 1)
    categories = [{"id": i, "name": n, "supercategory": "cell"} for n, i in cat_ids.items()]
    info = {"description": "merged by cellrcnn", "source": "+".join(names),
            "licence": "; ".join(f"{n}: {i.get('licence', 'unknown')}" for _, n, i, _ in docs),
            "sources": [{"source": n, "licence": i.get("licence"), "url": i.get("url"), "folder": str(d)}
                        for d, n, i, _ in docs],
            "annotation_only": any(i.get("annotation_only", False) for _, _, i, _ in docs)}
    image_id = ann_id = 0
    written: set[str] = set()
    recorded = recorded_images(out)
    files, merged_docs = {}, {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        merged = {"info": {**info, "split": split}, "licenses": [], "categories": categories,
                  "images": [], "annotations": []}
        for d, name, src_info, split_docs in docs:
            doc = split_docs.get(split)
            if doc is None:
                continue
            cat_map = {c["id"]: cat_ids[c["name"]] for c in doc["categories"]}
            id_map = {}
            for img in doc["images"]:
                image_id += 1
                id_map[img["id"]] = image_id
                file_name = f"{name}/{img['file_name']}"
                merged["images"].append({**img, "id": image_id, "file_name": file_name, "source": name,
                                         "source_image_id": img["id"]})
                if not src_info.get("annotation_only", False):
                    data = inside(d / "images", img["file_name"]).read_bytes()
                    write_bytes(inside(out / "images", file_name), data)
                    written.add(file_name)
            for ann in doc["annotations"]:
                ann_id += 1
                merged["annotations"].append({**ann, "id": ann_id, "image_id": id_map[ann["image_id"]],
                                              "category_id": cat_map[ann["category_id"]]})
        merged_docs[split] = merged
    run = run_id(merged_docs)
    for split, merged in merged_docs.items():
        merged["info"]["run"] = run
        text = json.dumps(merged, separators=(",", ":"), ensure_ascii=False) + "\n"
        files[out / "annotations" / f"{split}.json"] = text.encode("utf-8")
    write_together(files)
    remove_stale_images(out, recorded, written)
    print(f"merged {len(docs)} folders ({', '.join(names)}): {image_id:,} images, {ann_id:,} instances -> {out}")
    return out


def stats(root: str | Path) -> dict:
    """Counts, object sizes and the Mask R-CNN settings they suggest.

    Size of an object = sqrt(box w × h) in px. Anchors: one size per FPN level (5 levels),
    powers of two doubling per level, placed so the 1st–99th percentile of sizes is covered
    with the median near the middle level; if the range is too wide, small objects win. Detections per image: the largest count per image plus 50 %,
    rounded up to a hundred (COCO's default 100 silently drops objects in dense fields)."""
    docs = load_split_files(Path(root))
    per_image, sizes, aspects, areas = [], [], [], []
    splits = {}
    for split, doc in docs.items():
        counts = {img["id"]: 0 for img in doc["images"]}
        for ann in doc["annotations"]:
            counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
            w, h = ann["bbox"][2], ann["bbox"][3]
            sizes.append(math.sqrt(w * h))
            aspects.append(h / w if w else 0.0)
            areas.append(ann["area"])
        per_image += counts.values()
        splits[split] = {"images": len(doc["images"]), "instances": len(doc["annotations"])}
    result = {"root": str(root), "splits": splits, "images": len(per_image), "instances": len(sizes),
              "objects_per_image": _summary(per_image) if per_image else {},
              "max_objects_per_image": int(max(per_image, default=0))}
    if sizes:
        result["object_size_px"] = _summary(sizes)
        result["object_area_px"] = _summary(areas)
        result["aspect_h_over_w"] = _summary(aspects)
        p1, p50, p99 = np.percentile(sizes, [1, 50, 99])
        lowest = 2 ** max(2, math.floor(math.log2(max(p1, 1.0))))  # finest level at or below p1
        needed = 2 ** math.ceil(math.log2(max(p99, 1.0))) / 16  # coarsest level (x16) at or above p99
        centred = 2 ** round(math.log2(max(p50 / 4, 1.0)))  # median on the middle level
        base = lowest if needed > lowest else min(max(centred, needed, 4), lowest)  # 4 px: the finest stride
        anchors = [int(base * 2**i) for i in range(5)]
        result["suggested"] = {
            "anchor_sizes": anchors,
            "aspect_ratios": [0.5, 1.0, 2.0],
            "covers_p99": bool(anchors[-1] * 1.5 >= np.percentile(sizes, 99)),
            "detections_per_img": int(max(100, math.ceil(max(per_image) * 1.5 / 100) * 100)),
        }
    return result


def _summary(values) -> dict:
    v = np.asarray(values, float)
    q = np.percentile(v, [1, 5, 50, 95, 99])
    return {"min": float(v.min()), "p1": float(q[0]), "p5": float(q[1]), "median": float(q[2]), "p95": float(q[3]),
            "p99": float(q[4]), "max": float(v.max()), "mean": float(v.mean())}


def format_stats(s: dict) -> str:
    """Human-readable table of :func:`stats`."""
    lines = [f"{s['root']}: {s['images']:,} images, {s['instances']:,} instances",
             "  " + ", ".join(f"{k}: {v['images']:,} images / {v['instances']:,} instances" for k, v in s["splits"].items())]
    if s.get("objects_per_image"):
        o = s["objects_per_image"]
        lines.append(f"  objects per image: mean {o['mean']:.1f}, median {o['median']:.0f}, max {s['max_objects_per_image']}")
    for key, label in (("object_size_px", "object size sqrt(w*h) px"), ("object_area_px", "object area px"),
                       ("aspect_h_over_w", "aspect h/w")):
        if key in s:
            v = s[key]
            lines.append(f"  {label}: min {v['min']:.4g}, p1 {v['p1']:.4g}, median {v['median']:.4g}, "
                         f"p99 {v['p99']:.4g}, max {v['max']:.4g}")
    if "suggested" in s:
        g = s["suggested"]
        lines.append(f"  suggested: anchor sizes {tuple(g['anchor_sizes'])} (one per FPN level), aspect ratios "
                     f"{tuple(g['aspect_ratios'])}, detections_per_img {g['detections_per_img']}"
                     + ("" if g["covers_p99"] else " (largest objects exceed the top anchor: consider a larger ladder)"))
    return "\n".join(lines)
