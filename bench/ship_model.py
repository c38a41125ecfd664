"""Package a trained checkpoint as a shipped model (``cellrcnn/weights/<name>.ckpt`` + card).

    python bench/ship_model.py --checkpoint outputs/nuclei_unet/<run>/checkpoints/calibrated.ckpt \
        --name nuclei --results bench/results/generalist/generalist.json --run "mix, diameter=auto" \
        [--licence "CC0 1.0 training data"] [--max-mb 25]

Keeps only what :func:`cellrcnn.modules.base.load_module` needs (the weights, the hyper-parameters,
the module class, the training-image digests; no optimiser state, no callbacks), stores the
weights as float16 when float32 would exceed ``--max-mb`` (they load back into the float32 model),
adds the model's *training profile* (image count per modality and nucleus diameters as the
network saw them: the out-of-distribution warning compares new images with it), and writes the
model card ``<name>.json``; ``README.md`` next to the weights is regenerated from every card.

The run's data config (``.hydra/config.yaml`` of the run folder) says what it trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "cellrcnn" / "weights"
PROFILE_KEY = "cellrcnn_training_profile"
SHOWN = ("dsb_score", "f1@0.5", "precision@0.5", "recall@0.5", "pq@0.5", "segm_AP")


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
                     extra: dict | None = None, hparams: dict | None = None) -> dict:
    """A Lightning checkpoint reduced to ``state_dict`` (floating tensors cast to ``dtype``),
    ``hyper_parameters`` (updated with ``hparams``), ``cellrcnn_module``, the training-image
    digests and ``extra`` entries."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    if "cellrcnn_module" not in ckpt:
        raise SystemExit(f"{src}: not a cellrcnn checkpoint (no 'cellrcnn_module' entry)")
    state = {k: Int8Weight(v) if k in int8_keys else (v.to(dtype) if v.is_floating_point() else v).clone()
             for k, v in ckpt["state_dict"].items()}
    kept = {k: ckpt[k] for k in ("cellrcnn_training_images",) if k in ckpt}
    return {"state_dict": state, "hyper_parameters": {**ckpt.get("hyper_parameters", {}), **(hparams or {})},
            "cellrcnn_module": ckpt["cellrcnn_module"], "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch"), "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
            **kept, **(extra or {})}


def save_stripped(src: Path, dst: Path, max_mb: float, extra: dict | None = None, hparams: dict | None = None) -> str:
    """Write the most faithful copy that fits ``max_mb``: float32, else float16, else float16 with
    the largest conv/linear weights in int8 (per-channel scales). Returns a description."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for dtype in (torch.float32, torch.float16):
        torch.save(strip_checkpoint(src, dtype, extra=extra, hparams=hparams), dst)
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
    torch.save(strip_checkpoint(src, torch.float16, frozenset(chosen), extra, hparams), dst)
    if dst.stat().st_size > max_mb * 1e6:
        raise SystemExit(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB, above {max_mb} MB")
    return f"float16, with {len(chosen)} largest weight tensors in int8 (per-output-channel scales)"


def run_config(ckpt: Path) -> tuple[dict, list[str], dict]:
    """The config, command-line overrides and calibration report of the run that wrote ``ckpt``
    (``<run>/.hydra/config.yaml``, ``overrides.yaml``, ``calibration.json``)."""
    run = ckpt.resolve().parents[1]
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; ship checkpoints from a train.py run folder")
    overrides = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    calibration = run / "calibration.json"
    report = json.loads(calibration.read_text()) if calibration.is_file() else {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False), list(overrides), report


def training_data(cfg: dict) -> tuple[list[dict], dict]:
    """(per source: name, root, weight, image count, licence) and the training profile."""
    from hydra.utils import instantiate

    from cellrcnn.data.appearance import modality
    from cellrcnn.data.coco import load_coco_json
    from cellrcnn.data.sizes import equivalent_diameter
    from cellrcnn.inference.choice import training_profile

    datamodule = instantiate(OmegaConf.create(cfg).data)  # within the whole config: ${seed} resolves
    sources, kinds, diameters = [], [], []
    weights = {s.name: s.weight for s in getattr(datamodule, "sources", [])}
    for name, dataset, factors in datamodule.eval_sets("train"):
        info = load_coco_json(dataset.annotation_file).get("info", {})
        sources.append({"source": name, "images": len(dataset), "weight": weights.get(name, 1.0),
                        "licence": info.get("licence", "unknown"), "url": info.get("url", "")})
        for i, record in enumerate(dataset.images):
            kinds.append(modality(dataset.load_raw(i)))
            areas = [a["area"] for a in dataset._anns.get(record["id"], []) if a.get("area")]
            diameters += list(equivalent_diameter(areas) * float(factors[i]))
    return sources, training_profile(kinds, diameters)


def heldout(results: Path | None, run: str | None) -> dict:
    """Per-source held-out metrics of ``run`` in a ``bench/generalist.py`` results file."""
    if results is None or run is None:
        return {}
    res = json.loads(results.read_text())[run]
    rows = {r["group"]: r for r in res["by_group"] if r["field"] == "source"}
    rows["all"] = {**res["pooled"]}
    return {name: {"n_images": int(r["n_images"]), **{k: round(float(r[k]), 4) for k in SHOWN if k in r}}
            for name, r in rows.items()}


def input_note(card: dict) -> str:
    """How the card's model sees colour-stained and bright-background images, for its README line."""
    if card.get("hematoxylin"):
        return ("; colour-stained tissue (H&E, IHC) is fed as its hematoxylin density (colour deconvolution), "
                "other images with a bright background (brightfield) are inverted")
    return "; images with a bright background (brightfield, H&E) are inverted" if card.get("invert_bright") else ""


def diameter_note(default_diameter: str | None) -> str:
    """What ``diameter=default`` does with the card's model, for its README line."""
    if default_diameter == "auto":
        return ("By default (`diameter=default`, which this model sets to `auto`) a quick first pass measures "
                "the nuclei, and an image whose nuclei differ from that median by more than 30 % is resized so "
                "they have it (enlarged at most 2×); `diameter=shrink` only shrinks, `diameter=null` keeps the "
                "native size.")
    if default_diameter == "range":
        return ("By default (`diameter=default`, which this model sets to `range`) a quick first pass measures "
                "the nuclei; an image of nuclei beyond the training range below is shrunk into it, one of nuclei "
                "more than 30 % smaller than the training median is enlarged to it (at most 2×); "
                "`diameter=shrink` only shrinks, `diameter=null` keeps the native size.")
    return ("By default (`diameter=default`, `shrink` for this model) images of nuclei beyond the training "
            "range below are shrunk into it; `diameter=auto` or `diameter=<px>` also enlarge.")


def readme(cards: dict[str, dict]) -> str:
    """The weights folder's README: one section per shipped model, from its card."""
    parts = ["# Shipped models", "",
             "`cellrcnn predict input=DIR output=OUT` chooses one per image (`model=auto`, the default): "
             "colour-stained images (H&E) go to `nuclei_he` when it is installed, everything else to "
             "`nuclei`. `model=nuclei` / `model=nuclei_he` force one; `ckpt_path=` uses any checkpoint. "
             "Python: `Segmenter.from_pretrained(\"nuclei\")`.", ""]
    for name, card in cards.items():
        sources = ", ".join(f"{s['source']} ({s['images']} images, weight {s['weight']:g}, {s['licence']})"
                            for s in card.get("trained_on", []))
        legs = card.get("training_legs") or []
        budget = f"{card.get('training_budget_min', '?')} min wall-clock on a 2-core CPU"
        parts += [f"## `{name}` ({card['file']}, {card['size_MB']} MB, {card['stored_dtype']})", "",
                  f"- **Licence of the weights**: {card['licence']}",
                  f"- Model: {card['module']} ({card['parameters'] / 1e6:.1f} M parameters), "
                  f"{card['input_channels']}-channel input" + input_note(card),
                  f"- Trained (from scratch, no ImageNet weights; earlier legs as the command says) on: {sources}; each source's held-out split was never seen.",
                  f"- Training: `{card['training_command']}` ({budget}" + (
                      f" in {len(legs)} legs of {', '.join(f'{m:g}' for m in legs)} min; {card.get('global_step')} "
                      "optimiser steps in the last" if len(legs) > 1 else f", {card.get('global_step')} optimiser steps"
                  ) + ").",
                  f"- Decision thresholds: {card.get('decision_thresholds') or 'as configured'} " + (
                      f"(chosen on {card.get('calibration_images')} validation images, each at the size prediction "
                      f"gives it: `{card['calibration_command']}`)." if card.get("calibration_command")
                      else f"(chosen on {card.get('calibration_images') or 'the'} validation images by the calibration "
                      "the training command runs after training)."),
                  f"- Object size: it trained on nuclei of median diameter {card['object_diameter_px']} px "
                  "(images resized towards one size). " + diameter_note(card.get("default_diameter")),
                  "- Training profile (for the out-of-distribution warning): "
                  f"{card.get('training_profile', {}).get('modalities')} images by modality, diameters "
                  f"{card.get('training_profile', {}).get('object_diameter_px')} px.", ""]
        rows = card.get("heldout_metrics") or {}
        if rows:
            parts += [f"Held-out (`test`) images of each source, scored by `python bench/generalist.py` "
                      f"(`evaluate.py data=nuclei_mix split=test`; {card.get('heldout_run', '')}):", "",
                      "| source | images | " + " | ".join(SHOWN) + " |", "|" + "---|" * (len(SHOWN) + 2)]
            for source, r in rows.items():
                parts.append(f"| {source} | {r['n_images']} | " + " | ".join(
                    f"{r[k]:.3f}" if k in r and np.isfinite(r[k]) else "n/a" for k in SHOWN) + " |")
            parts.append("")
    parts += ["Expect lower scores on modalities none of these sets holds (phase contrast, whole cells); "
              "`predict.py` flags images that lie outside a model's training data. Train on your own "
              "annotations with `train.py` for those.", ""]
    return "\n".join(p for p in parts if p is not None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--name", required=True, help="model name: the file becomes cellrcnn/weights/<name>.ckpt")
    p.add_argument("--licence", required=True, help="licence note of the weights (follows the training data)")
    p.add_argument("--results", type=Path, help="bench/generalist.py results with this model's held-out rows")
    p.add_argument("--run", help="the key of this model's run in --results")
    p.add_argument("--budget-min", type=float, required=True, help="total training wall time, all legs")
    p.add_argument("--legs", default="", help="comma-separated minutes of each training leg")
    p.add_argument("--default-diameter", choices=("shrink", "auto", "range"),
                   help="the diameter mode diameter=default means for this model (measured on held-out images; "
                        "none: shrink)")
    p.add_argument("--max-mb", type=float, default=25.0)
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)

    cfg, overrides, calibration = run_config(args.checkpoint)
    sources, profile = training_data(cfg)
    dst = args.weights_dir / f"{args.name}.ckpt"
    recommended = {"default_diameter": args.default_diameter} if args.default_diameter else {}
    dtype = save_stripped(args.checkpoint, dst, args.max_mb, {PROFILE_KEY: profile}, recommended)

    from cellrcnn.modules.base import load_module

    model = load_module(dst)  # the shipped file must load on its own
    card = {
        "file": dst.name, "size_MB": round(dst.stat().st_size / 1e6, 2), "stored_dtype": dtype,
        "module": type(model).__name__, "parameters": sum(q.numel() for q in model.parameters()),
        "input_channels": int(dict(model.hparams).get("net", {}).get("in_channels", 3)),
        "invert_bright": model.invert_bright, "hematoxylin": model.hematoxylin,
        "object_diameter_px": round(float(model.object_diameter), 1),
        "default_diameter": args.default_diameter or "shrink",
        "licence": args.licence, "trained_on": sources, "training_images": len(model.training_images),
        "training_command": "python train.py " + " ".join(o for o in overrides if not o.startswith("callbacks.")),
        "training_budget_min": args.budget_min,
        "training_legs": [float(v) for v in args.legs.split(",") if v],
        "global_step": torch.load(dst, map_location="cpu", weights_only=False).get("global_step"),
        "decision_thresholds": calibration.get("chosen"),
        "calibration_images": calibration.get("n_images"),
        "training_profile": profile, "heldout_run": args.run,
        "heldout_metrics": heldout(args.results, args.run), "created": time.strftime("%Y-%m-%d"),
    }
    (args.weights_dir / f"{args.name}.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    cards = {c.stem: json.loads(c.read_text()) for c in sorted(args.weights_dir.glob("*.json"))
             if (args.weights_dir / f"{c.stem}.ckpt").is_file()}
    (args.weights_dir / "README.md").write_text(readme(cards))
    print(json.dumps(card, indent=1, default=float))


if __name__ == "__main__":
    main()
