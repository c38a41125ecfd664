"""Time the BBBC038 conversion of stage1_train.zip (target: at most 60 s on 2 cores).

    python bench/convert_bbbc038.py [--src ../shared/data/bbbc038/stage1_train.zip] [--workers 2]

Converts into a fresh temporary folder (a full run: every image and mask written), prints the
wall time, images/s and the equivalent command line.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from cellrcnn.data.converters import bbbc038
from cellrcnn.data.converters.common import default_workers

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc038" / "stage1_train.zip"


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children (the pool)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    if not args.src.is_file():
        raise SystemExit(f"{args.src}: not found (give --src stage1_train.zip)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bbbc038"
        start, cpu0 = time.perf_counter(), _cpu()
        bbbc038.convert(args.src, out, workers=args.workers)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
        summary = json.loads((out / "conversion.json").read_text())
    n = summary["images_written"]
    print(f"\nbbbc038 {args.src.name}: {n} images, {summary['instances_written']:,} instances in {seconds:.1f} s "
          f"wall ({n / seconds:.1f} images/s, {args.workers} workers; {cpu:.1f} CPU s in all processes, "
          f"so about {cpu / args.workers:.1f} s on {args.workers} idle cores)")
    print(f"command: python -m cellrcnn.data.convert bbbc038 --src {args.src} --out DIR --workers {args.workers}")


if __name__ == "__main__":
    main()
