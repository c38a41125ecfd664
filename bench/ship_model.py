"""Package the best DSB2018 benchmark model as the shipped nuclei model.

    python bench/ship_model.py [--results bench/results/dsb2018.json] [--model maskrcnn|unet]
                               [--dst cellrcnn/weights/nuclei.ckpt] [--max-mb 25] [--benchmark-command "..."]

Keeps only what :func:`cellrcnn.modules.base.load_module` needs (the weights, the hyper-parameters
and the module class; no optimiser state, no callbacks), stores the weights as float16 when
float32 would exceed ``--max-mb`` (they load back into the float32 model), and writes a model card
(``nuclei.json`` and ``README.md`` next to the weights) with the command that trained it and its
held-out metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from cellrcnn.data.sizes import annotation_diameter

REPO = Path(__file__).resolve().parents[1]
CARD_METRICS = ("dsb_score", "segm_AP", "segm_AP50", "f1@0.5", "f1@0.7", "precision@0.5", "recall@0.5",
                "pq@0.5", "dice", "infer_s_per_image")


class Int8Weight:
    """A weight stored as int8 with one float32 scale per output channel (symmetric).

    It pickles as ``torch.mul(values, scale)``, so ``torch.load`` (``weights_only=False``, as in
    ``load_module``) hands back an ordinary float32 tensor: no loader changes are needed.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        flat = w.reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.values = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
        self.scale = scale.reshape(-1, *[1] * (w.ndim - 1))

    def __reduce__(self):
        return (torch.mul, (self.values, self.scale))


def strip_checkpoint(src: Path, dtype: torch.dtype, int8_keys: frozenset[str] = frozenset(),
                     hparams: dict | None = None) -> dict:
    """A Lightning checkpoint reduced to ``state_dict`` (floating tensors cast to ``dtype``),
    ``hyper_parameters`` (updated with ``hparams``) and ``cellrcnn_module``."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    if "cellrcnn_module" not in ckpt:
        raise SystemExit(f"{src}: not a cellrcnn checkpoint (no 'cellrcnn_module' entry)")
    state = {k: Int8Weight(v) if k in int8_keys else (v.to(dtype) if v.is_floating_point() else v).clone()
             for k, v in ckpt["state_dict"].items()}
    return {"state_dict": state, "hyper_parameters": {**ckpt.get("hyper_parameters", {}), **(hparams or {})},
            "cellrcnn_module": ckpt["cellrcnn_module"], "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch"), "pytorch-lightning_version": ckpt.get("pytorch-lightning_version")}


def save_stripped(src: Path, dst: Path, max_mb: float, hparams: dict | None = None) -> str:
    """Write the most faithful copy that fits ``max_mb``: float32, else float16, else float16 with
    the largest conv/linear weights in int8 (per-channel scales). Returns a description."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for dtype in (torch.float32, torch.float16):
        torch.save(strip_checkpoint(src, dtype, hparams=hparams), dst)
        if dst.stat().st_size <= max_mb * 1e6:
            return str(dtype).removeprefix("torch.")
    state = torch.load(src, map_location="cpu", weights_only=False)["state_dict"]
    big = sorted((k for k, v in state.items() if v.is_floating_point() and v.ndim >= 2),
                 key=lambda k: -state[k].numel())
    excess = dst.stat().st_size - max_mb * 1e6
    chosen, saved = [], 0
    for k in big:  # int8 halves a float16 weight: convert the biggest until the file fits
        if saved > excess * 1.05:
            break
        chosen.append(k)
        saved += state[k].numel()
    torch.save(strip_checkpoint(src, torch.float16, frozenset(chosen), hparams), dst)
    if dst.stat().st_size > max_mb * 1e6:
        raise SystemExit(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB, above {max_mb} MB")
    return f"float16, with {len(chosen)} largest weight tensors in int8 (per-output-channel scales): " + ", ".join(chosen)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "dsb2018.json")
    p.add_argument("--model", default=None, help="maskrcnn or unet (default: the higher dsb_score)")
    p.add_argument("--dst", type=Path, default=REPO / "cellrcnn" / "weights" / "nuclei.ckpt")
    p.add_argument("--max-mb", type=float, default=25.0)
    p.add_argument("--benchmark-command", default=None,
                   help="the bench/dsb2018.py command that trained it, for the model card "
                        "(default: python bench/dsb2018.py --budget-min <budget> --models maskrcnn,unet)")
    p.add_argument("--train-annotations", type=Path,
                   default=REPO / "datasets" / "coco" / "bbbc038" / "annotations" / "dsb_train90.json",
                   help="the model's training annotations (object size, for checkpoints that lack it)")
    args = p.parse_args(argv)
    bench = json.loads(args.results.read_text())
    trained = {k: v for k, v in bench["results"].items() if "checkpoint" in v}
    name = args.model or max(trained, key=lambda k: trained[k]["dsb_score"])
    metrics = trained[name]
    src = Path(metrics["checkpoint"])
    hparams = torch.load(src, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    # the training objects' size, for predict.py diameter=... (train.py records it in new runs)
    update = {} if hparams.get("object_diameter") else {"object_diameter": annotation_diameter(args.train_annotations)}
    dtype = save_stripped(src, args.dst, args.max_mb, update)

    from cellrcnn.modules.base import load_module

    model = load_module(args.dst)  # the shipped file must load on its own
    n_params = sum(p.numel() for p in model.parameters())
    training = bench["meta"].get("training", {}).get(name, {})
    meta = bench["meta"]
    card = {
        "file": args.dst.name, "size_MB": round(args.dst.stat().st_size / 1e6, 2), "stored_dtype": dtype,
        "module": type(model).__name__, "parameters": n_params,
        "input_channels": int(dict(model.hparams).get("net", {}).get("in_channels", 3)),
        "invert_bright": model.invert_bright,
        "object_diameter_px": round(model.object_diameter, 1),
        "trained_on": f"BBBC038 / DSB2018 stage1_train (community-fixed masks), {meta['n_train']} images "
                      f"(90 % by sha256('{meta['split_salt']}:'+ImageId)), from scratch",
        "training_command": "python " + re.sub(r"(=)/\S*/(outputs|datasets)/", r"\1\2/",
                                               training.get("command", "train.py experiment=bbbc038_" + name)),
        "benchmark_command": args.benchmark_command
        or f"python bench/dsb2018.py --budget-min {meta['budget_min']:g} --models maskrcnn,unet",
        "training_budget_min": meta["budget_min"], "global_step": metrics.get("global_step"),
        "heldout_images": meta["n_val"],
        "heldout_metrics": {k: round(float(metrics[k]), 4) for k in CARD_METRICS if k in metrics},
        "decision_thresholds": (metrics.get("calibration") or {}).get("chosen"),
        "calibration_images": (metrics.get("calibration") or {}).get("n_images"),
        "created": time.strftime("%Y-%m-%d"),
    }
    (args.dst.parent / "nuclei.json").write_text(json.dumps(card, indent=1) + "\n")
    thresholds_note = (
        f", chosen after training on {card['calibration_images']} full training images by "
        "`python -m cellrcnn.evaluation.calibrate`" if card["decision_thresholds"] else ""
    )
    inversion_note = ("; images with a bright background, such as brightfield and H&E, are inverted"
                      if card["invert_bright"] else "")
    packing_note = ("" if dtype == "float32" else
                    " (the packed copy differs by at most ~0.4 % of a tensor's largest value)")
    results_md = os.path.relpath(args.results.with_suffix(".md").resolve(), REPO)
    rows = "\n".join(f"| {k} | {v} |" for k, v in card["heldout_metrics"].items())
    (args.dst.parent / "README.md").write_text(f"""# Shipped nuclei model (`nuclei.ckpt`)

`python predict.py input=FILE_OR_DIR output=DIR` uses this model when no `ckpt_path` is given.

- Model: {card['module']} ({n_params / 1e6:.1f} M parameters), {card['input_channels']}-channel input
  (RGB images are averaged to grey; every image is percentile-normalised{inversion_note}).
- Trained on: {card['trained_on']}.
- Training: `{card['training_command']}`
  ({card['training_budget_min']:g} min wall-clock budget on a CPU, {card['global_step']} optimiser steps),
  run by `{card['benchmark_command']}`.
- Decision thresholds: {card['decision_thresholds'] or 'as configured'}{thresholds_note}.
- Object size: the training nuclei have a median diameter of {card['object_diameter_px']} px. For images whose
  nuclei are much larger or smaller, add `diameter=auto` (measured per image) or `diameter=<px>` to `predict.py`.
- File: {card['size_MB']} MB, weights stored as {dtype} (optimiser state removed; loaded as float32).

Held-out 10 % of the DSB2018 stage-1 training set ({card['heldout_images']} full-size images):

| metric | value |
|---|---|
{rows}

These are the float32 weights' metrics before packing{packing_note}; `bench/results/heldout_predict.md` scores the packed file through
`predict.py`. `infer_s_per_image` is CPU wall time per image. `{results_md}` compares it
with the other models of its run and with Otsu + watershed (the README's Results section with all
runs): check that comparison before relying on this model. Expect lower scores on modalities absent from DSB2018 (e.g. phase
contrast, whole cells); for those, train on your own annotations with `train.py`.
""")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
