"""CPU throughput: Mask R-CNN cell preset vs U-Net vs torchvision's stock Mask R-CNN, in one run.

    python bench/speed.py [--batch 4] [--warmup 2] [--iters 5] [--threads N] [--out bench/results]
                          [--maskrcnn-ckpt CKPT] [--unet-ckpt CKPT]

Measures, on synthetic nuclei fields (``cellrcnn.data.synthetic.render_image``):
- training images/s: forward + backward + AdamW step on batches of ``--batch`` 256×256 crops,
  ``--warmup`` iterations excluded;
- inference ms per 256×256 image and per megapixel (a ``--big``×``--big`` field), the U-Net
  including its watershed post-processing, the Mask R-CNNs including mask pasting.

The models: the cell preset as ``cellrcnn/conf/model/maskrcnn_cell.yaml`` composes it, the U-Net as
``cellrcnn/conf/model/unet.yaml``, and ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None,
weights_backbone=None)`` with its default settings (it resizes inputs to min_size 800).

Detections: with random weights a detector's score threshold decides how much mask-head work it
does, so by default both Mask R-CNNs run *saturated*: score threshold 0, i.e. the stock model
returns its cap of 100 detections and the cell preset its cap of ``box_detections_per_img``
(>= 1000, checked) — the worst case for the cell preset. With ``--maskrcnn-ckpt`` the cell preset
uses trained weights and its own threshold instead (realistic counts). Detections per image are
recorded. Writes ``speed.json`` and ``speed.md`` (with torch threads, CPU and ``uptime`` load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from cellrcnn.config import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def synthetic_sample(seed: int, size: int, channels: int = 3) -> tuple[torch.Tensor, dict]:
    """One synthetic nuclei field: float32 image C×H×W in about [0, 1] and a Target."""
    from cellrcnn.data.masks import masks_to_boxes_xyxy
    from cellrcnn.data.synthetic import render_image
    from cellrcnn.data.target import make_target
    from cellrcnn.io import prepare_image

    raw, masks, _ = render_image(np.random.default_rng(seed), size)
    masks = np.stack(masks).astype(np.uint8) if masks else np.zeros((0, size, size), np.uint8)
    n = len(masks)
    target = make_target(masks_to_boxes_xyxy(masks), np.ones(n, np.int64), masks, np.ones(n, bool), seed)
    return torch.from_numpy(prepare_image(raw, channels)), target


def compose_model(name: str, channels: int = 3):
    """Instantiate ``cellrcnn/conf/model/<name>.yaml`` exactly as ``train.py`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", "data=synthetic", f"data.channels={channels}"])
    return instantiate(cfg.model)


class Runner:
    """Uniform train-step / predict interface over a cellrcnn module or the stock torchvision model."""

    def __init__(self, name: str, model, stock: bool = False) -> None:
        self.name, self.model, self.stock = name, model, stock
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.n_params = sum(p.numel() for p in params)
        # a grey (1-channel) checkpoint gets the grey version of the 3-channel synthetic fields
        self.channels = 3 if stock else int(dict(model.hparams).get("net", {}).get("in_channels", 3))

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=0, keepdim=True) if self.channels == 1 and image.shape[0] == 3 else image

    def train_step(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        self.model.train()
        if self.stock:
            batch = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]} for t in targets]
            losses = self.model(images, batch)
        else:
            losses = self.model.compute_losses([self._input(im) for im in images], targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> int:
        """Run inference on one image; returns the number of detections/instances."""
        self.model.eval()
        if self.stock:
            out = self.model([image])[0]
            binary = out["masks"] > 0.5  # threshold the pasted probabilities as a user would
            return int(binary.shape[0])
        return int(len(self.model.predict_instances([self._input(image)])[0]["scores"]))


def build_runners(names: list[str], args: argparse.Namespace) -> list[Runner]:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from cellrcnn.modules.base import load_module

    runners = []
    for name in names:
        if name == "cell":
            if args.maskrcnn_ckpt:
                module = load_module(args.maskrcnn_ckpt)
            else:
                module = compose_model("maskrcnn_cell")
                module.score_threshold = 0.0  # saturated: the mask head sees every kept detection
            cap = int(module.net.roi_heads.detections_per_img)
            if cap < 1000:
                raise SystemExit(f"cell preset returns at most {cap} detections per image; the target is >= 1000")
            runners.append(Runner("maskrcnn_cell", module))
        elif name == "unet":
            module = load_module(args.unet_ckpt) if args.unet_ckpt else compose_model("unet")
            runners.append(Runner("unet", module))
        elif name == "stock":
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
            if not args.maskrcnn_ckpt:
                model.roi_heads.score_thresh = 0.0  # saturated, like the cell preset above
            runners.append(Runner("stock_maskrcnn_r50_fpn", model, stock=True))
        else:
            raise SystemExit(f"unknown model {name!r}: choose cell, unet, stock")
    return runners


def time_training(runner: Runner, batches: list[tuple[list, list]], warmup: int) -> float:
    """Images per second over the batches after the first ``warmup``."""
    for images, targets in batches[:warmup]:
        runner.train_step(images, targets)
    start = time.perf_counter()
    for images, targets in batches[warmup:]:
        runner.train_step(images, targets)
    seconds = time.perf_counter() - start
    return sum(len(b[0]) for b in batches[warmup:]) / seconds


def time_inference(runner: Runner, images: list[torch.Tensor], warmup: int) -> tuple[float, float]:
    """(mean ms per image, mean detections per image) over the images after ``warmup`` runs."""
    for image in images[:warmup]:
        runner.predict(image)
    counts, start = [], time.perf_counter()
    for image in images[warmup:]:
        counts.append(runner.predict(image))
    return 1000 * (time.perf_counter() - start) / len(counts), float(np.mean(counts))


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {"torch_threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "uptime": uptime}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env_start = environment()
    n_train = (args.warmup + args.iters) * args.batch if args.iters > 0 else 0
    crops = [synthetic_sample(1000 + i, args.crop) for i in range(n_train)]
    batches = [tuple(map(list, zip(*crops[i : i + args.batch], strict=True))) for i in range(0, n_train, args.batch)]
    small = [synthetic_sample(2000 + i, args.crop)[0] for i in range(args.warmup + args.infer_iters)]
    big = [synthetic_sample(3000 + i, args.big)[0] for i in range(1 + args.big_iters)]
    rows = {}
    for runner in build_runners(args.models.split(","), args):
        print(f"[speed] {runner.name} ({runner.n_params / 1e6:.1f} M parameters)", flush=True)
        row = {"params_M": runner.n_params / 1e6}
        row["train_img_per_s"] = time_training(runner, batches, args.warmup) if args.iters > 0 else float("nan")
        row["infer_ms_256"], row["dets_256"] = time_inference(runner, small, args.warmup)
        ms_big, row["dets_big"] = time_inference(runner, big, 1)
        row["infer_ms_per_MP"] = ms_big / (args.big * args.big / 1e6)
        if not runner.stock:
            row["max_detections"] = int(getattr(getattr(runner.model, "net", None), "roi_heads", None).detections_per_img
                                        if hasattr(getattr(runner.model, "net", None), "roi_heads") else -1)
        else:
            row["max_detections"] = int(runner.model.roi_heads.detections_per_img)
        rows[runner.name] = row
        print(f"[speed]   {json.dumps({k: round(v, 3) for k, v in row.items()})}", flush=True)
        del runner
    ratios = {}
    stock = rows.get("stock_maskrcnn_r50_fpn")
    if stock:
        for name, row in rows.items():
            if name != "stock_maskrcnn_r50_fpn":
                ratios[name] = {
                    "train": row["train_img_per_s"] / stock["train_img_per_s"] if args.iters > 0 else float("nan"),
                    "infer_256": stock["infer_ms_256"] / row["infer_ms_256"],
                    "infer_MP": stock["infer_ms_per_MP"] / row["infer_ms_per_MP"],
                }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    return {"settings": settings, "env_start": env_start, "env_end": environment(), "rows": rows, "ratios": ratios}


def markdown(result: dict) -> str:
    s, rows = result["settings"], result["rows"]
    lines = [f"**CPU speed: training on {s['batch']}×{s['crop']}² crops ({s['warmup']} warm-up + {s['iters']} "
             f"timed iterations), inference on {s['crop']}² and {s['big']}² synthetic nuclei fields**", "",
             "| model | params (M) | train img/s | infer ms / 256² image | infer ms / megapixel | detections / "
             f"image (256², {s['big']}²) | max detections |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params_M']:.1f} | {r['train_img_per_s']:.2f} | {r['infer_ms_256']:.0f} | "
                     f"{r['infer_ms_per_MP']:.0f} | {r['dets_256']:.0f}, {r['dets_big']:.0f} | {r['max_detections']} |")
    if result["ratios"]:
        lines += ["", "| vs stock maskrcnn_resnet50_fpn | training | inference 256² | inference per MP |", "|---|---|---|---|"]
        for name, r in result["ratios"].items():
            lines.append(f"| {name} | {r['train']:.1f}× | {r['infer_256']:.1f}× | {r['infer_MP']:.1f}× |")
    e0, e1 = result["env_start"], result["env_end"]
    mode = "trained weights" if s.get("maskrcnn_ckpt") else "random weights, score threshold 0 (saturated)"
    lines += ["", f"Mask R-CNN detections: {mode}. torch {e0['torch']}, {e0['torch_threads']} thread(s), "
              f"CPU `{e0['cpu']}` ({e0['cpu_count']} cores); load at start `{e0['uptime']}`, at end `{e1['uptime']}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cell,unet,stock", help="comma list of cell, unet, stock")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--crop", type=int, default=256, help="training crop / small inference image side, px")
    p.add_argument("--big", type=int, default=1024, help="side of the megapixel inference image, px")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations excluded from the timing")
    p.add_argument("--iters", type=int, default=5, help="timed training iterations (0: inference only)")
    p.add_argument("--infer-iters", type=int, default=6, help="timed inference runs on small images")
    p.add_argument("--big-iters", type=int, default=2, help="timed inference runs on big images")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--maskrcnn-ckpt", default=None, help="trained cell-preset checkpoint (realistic detections)")
    p.add_argument("--unet-ckpt", default=None, help="trained U-Net checkpoint")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    result = run(args)
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=1))
    (args.out / "speed.md").write_text(table + "\n")
    print("\n" + table)
    return result


if __name__ == "__main__":
    main()
