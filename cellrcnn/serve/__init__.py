"""Serve a model over HTTP: a JSON/file API and a web page where an image is dropped in a browser.

    python -m cellrcnn.serve                       # http://127.0.0.1:8000, the shipped models
    cellrcnn serve --host 0.0.0.0 --port 8080 --model path/to/model.ckpt --workers 2

The model is loaded once at start-up; images are segmented in ``--workers`` threads with at most
``--max-queue`` more waiting (503 with ``Retry-After`` beyond that). Uploads above
``--max-upload-mb`` are refused while they stream in (413), images above ``--max-megapixels``
before they are decoded (422). FastAPI's OpenAPI page is at ``/docs``.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cellrcnn serve", description=__doc__.split("\n\n")[0],
        epilog="example: cellrcnn serve --port 8000, then open http://127.0.0.1:8000 and drop an image",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model", default="auto",
                   help="auto (the shipped model that suits each image), a shipped model name (GET /models "
                        "lists them) or a .ckpt path")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest request body in MB")
    p.add_argument("--max-megapixels", type=float, default=50.0, help="largest image in megapixels")
    p.add_argument("--workers", type=int, default=1, help="images segmented at the same time (threads)")
    p.add_argument("--max-queue", type=int, default=8, help="images allowed to wait for a worker")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU cores / workers)")
    p.add_argument("--upload-timeout", type=float, default=60.0,
                   help="seconds an upload may send nothing before it is dropped (408)")
    p.add_argument("--cache-megapixels", type=float, default=32.0,
                   help="label images of recent requests kept in memory, so downloads do not segment again (0: off)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="larger images are predicted in tiles of this size (default: the model's own)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the options, load the model and run uvicorn until interrupted; returns the exit code."""
    args = parser().parse_args(argv)
    from cellrcnn.cli import yielding_threads

    yielding_threads()  # before torch loads OpenMP: a busy core must not stall every request
    import torch
    import uvicorn

    from cellrcnn.serve.app import ServeSettings, create_app

    if args.workers < 1 or args.max_queue < 0 or args.max_upload_mb <= 0 or args.max_megapixels <= 0 \
            or args.cache_megapixels < 0 or args.upload_timeout <= 0:
        parser().error("--workers must be >= 1, --max-queue and --cache-megapixels >= 0, and the limits positive")
    settings = ServeSettings(max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels,
                             workers=args.workers, max_queue=args.max_queue, tile_size=args.tile_size,
                             cache_megapixels=args.cache_megapixels, upload_idle_timeout_s=args.upload_timeout)
    try:
        app = create_app(args.model, settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cellrcnn serve: {exc}")
        return 2
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.workers))
    print(f"cellrcnn serve: model {app.state.registry.default!r}; open http://{args.host}:{args.port}/ "
          f"(API documentation: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
