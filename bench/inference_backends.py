"""One U-Net view of a shipped model on each inference backend this machine could use.

    python bench/inference_backends.py [--model nuclei] [--side 1024] [--threads 2] \
        [--backends autocast,bf16,float32,compile,onnxruntime] [--out bench/results/predict_speed]

Times the network alone (one forward of a ``side``² image, best of ``--repeats`` after a warm-up)
as ``predict.py`` runs it (bfloat16 autocast, channels-last) and as the alternatives would:

- ``autocast``: the shipped path (:func:`cellrcnn.models.unet.predict_maps`' per-view forward);
- ``bf16``: the whole network cast to bfloat16 (normalisation too), no autocast;
- ``float32``: no reduced precision;
- ``compile``: ``torch.compile`` (inductor, C++ code generation) of the bfloat16 network, with the
  seconds its first call takes (paid again by every new process and image size);
- ``onnxruntime``: the network exported to ONNX (``torch.onnx.export``) and run by ONNX Runtime's
  CPU provider in float32 (skipped when ``onnxruntime`` is not installed).

Each row also gives the largest difference of the class probabilities from float32, so a faster
backend is checked for agreement. Results: ``<out>/backends.json`` and ``<out>/backends.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def probabilities(out) -> torch.Tensor:
    logits = out["logits"] if isinstance(out, dict) else torch.as_tensor(out[0])
    return logits.float().softmax(dim=1)


def backends(net: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> a builder returning the forward to time (builders run lazily: compile is slow)."""

    def autocast():
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x)
        return run

    def whole_bf16(compiled: bool = False):
        net16, x16 = copy.deepcopy(net).to(torch.bfloat16), x.to(torch.bfloat16)
        fn = torch.compile(net16) if compiled else net16

        def run():
            with torch.inference_mode():
                return fn(x16)
        return run

    def float32():
        def run():
            with torch.inference_mode():
                return net(x)
        return run

    def onnxruntime():
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "unet.onnx"
        torch.onnx.export(net, (x.contiguous(),), str(path), input_names=["x"], output_names=["logits", "distance"],
                          dynamo=False, opset_version=18)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.contiguous().numpy()}
        return lambda: session.run(None, feed)

    return {"autocast": autocast, "bf16": whole_bf16, "float32": float32,
            "compile": lambda: whole_bf16(compiled=True), "onnxruntime": onnxruntime}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nuclei", help="a shipped model's name or a checkpoint file")
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="autocast,bf16,float32,compile,onnxruntime")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict_speed")
    args = p.parse_args(argv)

    from cellrcnn.api import checkpoint_path
    from cellrcnn.modules.base import load_module

    torch.set_num_threads(args.threads)
    net = load_module(checkpoint_path(args.model)).net.eval()
    x = torch.rand(1, net.in_channels, args.side, args.side, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = probabilities(net(x))
    builders = backends(net, x)
    rows = {}
    for name in args.backends.split(","):
        try:
            start = time.perf_counter()
            run = builders[name]()
            first = run()
            setup = time.perf_counter() - start
        except ImportError as err:
            print(f"{name}: skipped ({err})", flush=True)
            continue
        seconds = best_of(run, args.repeats)
        diff = float((probabilities(first) - reference).abs().max())
        rows[name] = {"s_per_view": round(seconds, 3), "mp_per_s": round(args.side**2 / 1e6 / seconds, 2),
                      "setup_and_first_call_s": round(setup, 1), "max_prob_diff_vs_float32": round(diff, 4)}
        print(name, rows[name], flush=True)

    command = "python bench/inference_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
               f"{args.threads} threads")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends.json").write_text(json.dumps({"command": command, "machine": machine, "model": args.model,
                                                         "side": args.side, "rows": rows}, indent=1) + "\n")
    lines = [f"# One U-Net view ({args.model}, {args.side}², network only) per inference backend", "",
             f"Command: `{command}`", "", f"Machine: {machine}.", "",
             "| backend | s per view | MP/s | set-up + first call (s) | max class-probability difference vs float32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['s_per_view']} | {r['mp_per_s']} | {r['setup_and_first_call_s']} | "
              f"{r['max_prob_diff_vs_float32']} |" for k, r in rows.items()]
    (args.out / "backends.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
