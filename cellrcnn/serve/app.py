"""The FastAPI application: ``/health``, ``/models``, ``POST /segment`` and the web page at ``/``.

Every request that carries an image gets its own temporary folder inside the server's temporary
root, deleted before the answer leaves (also on errors); the client's file name never becomes a
path. Client errors are 4xx with a JSON ``detail`` saying what is wrong; an unexpected failure of
one image is a 500 for that request only.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from cellrcnn import __version__
from cellrcnn.inference.scale import DEFAULT, MODES, NATIVE
from cellrcnn.serve.apidoc import api_page
from cellrcnn.serve.jobs import InferencePool, ModelRegistry, QueueFull, ResultCache
from cellrcnn.serve.outputs import FORMATS, formats_help, render_file, result_json
from cellrcnn.serve.uploads import (
    Upload,
    UploadError,
    image_pixels,
    read_multipart,
    safe_name,
    safe_stem,
    sniff_suffix,
)

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("cellrcnn.serve")


@dataclass
class ServeSettings:
    """Limits of the service (command-line options of ``cellrcnn serve``)."""

    max_upload_mb: float = 50.0  # request body, checked while it streams in
    max_megapixels: float = 50.0  # image size, checked from the file header before decoding
    workers: int = 1  # images segmented at the same time
    max_queue: int = 8  # further images admitted to wait; beyond: 503 + Retry-After
    tile_size: int | None = None  # None: the model's own (cellrcnn.api.Segmenter)
    tile_overlap: int | None = None  # None: from each large image's objects (cellrcnn.api.Segmenter)
    cache_megapixels: float = 32.0  # label images of recent requests kept in memory for their downloads
    upload_idle_timeout_s: float = 60.0  # an upload that sends nothing for this long is dropped (408)


def _parse_number(fields: dict[str, str], name: str, words: tuple[str, ...] = ()) -> float | str | None:
    """A positive number, one of ``words`` (lower case), or None when the field is empty."""
    value = fields.get(name, "").strip()
    if not value:
        return None
    if value.lower() in words:
        return value.lower()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise UploadError(422, f"{name} must be a positive number{''.join(f' or {w}' for w in words)}, got {value!r}")
    return number


def _parse_diameter(fields: dict[str, str]) -> float | str | None:
    """The diameter field: empty means the model's recommended mode, predict.py's default; native
    means no resizing."""
    value = _parse_number(fields, "diameter", (*MODES, DEFAULT, NATIVE))
    return DEFAULT if value is None else value  # the segmenter resolves default and native


def _parse_polarity(fields: dict[str, str]) -> str | None:
    """The polarity field: empty means the segmenter's own (auto)."""
    from cellrcnn.io import POLARITIES

    value = fields.get("polarity", "").strip().lower()
    if value and value not in POLARITIES:
        raise UploadError(422, f"polarity must be one of {', '.join(POLARITIES)}, got {value!r}")
    return value or None


def _parse_index(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name, "").strip()
    if value and not value.isdigit():
        raise UploadError(422, f"{name} must be an index (0, 1, ...), got {value!r}")
    return int(value) if value else None


SEGMENT_FORM = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "the image: PNG, TIFF, JPEG or BMP; 8/16-bit, grey or colour"},
                "model": {"type": "string", "description": "a name from GET /models (default: the server's model)"},
                "diameter": {"type": "string", "description": "typical object diameter in pixels, auto, native, "
                                                              "shrink, range, or default (empty: the model's "
                                                              "recommended mode: range, auto or shrink)"},
                "polarity": {"type": "string", "description": "bright (nuclei brighter than the background: "
                                                              "fluorescence), dark (brightfield) or auto (empty: "
                                                              "read from the image)"},
                "pixel_size": {"type": "number", "description": "µm per pixel: measurements in µm and µm²"},
                "channel": {"type": "integer", "description": "segment this channel of a multi-channel image"},
                "plane": {"type": "integer", "description": "segment this z-plane (page) of a multi-page TIFF"},
                "include_overlay": {"type": "boolean", "description": "JSON answer only: add the overlay PNG "
                                                                     "as overlay_png_base64"},
            },
        }}},
    }
}


def create_app(model: str = "auto", settings: ServeSettings | None = None,
               weights_dir: str | Path | None = None) -> FastAPI:
    """The application, with ``model`` (``auto``, a shipped model name or a checkpoint path) loaded now;
    ``weights_dir``: where the shipped models are (default ``cellrcnn/weights``)."""
    settings = settings or ServeSettings()
    registry = ModelRegistry(model, weights_dir, tile_size=settings.tile_size, tile_overlap=settings.tile_overlap)
    registry.warm()  # loaded once, before the first request; a broken checkpoint fails at start-up
    pool = InferencePool(settings.workers, settings.max_queue)
    temp_root = Path(tempfile.mkdtemp(prefix="cellrcnn-serve-"))
    job_seconds = [1.0]  # running mean of a job's duration, for Retry-After

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.pool.shutdown()
        shutil.rmtree(temp_root, ignore_errors=True)

    app = FastAPI(
        title="cellrcnn", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # their pages load from a CDN: /docs is served from here (apidoc.py)
        description="Instance segmentation of cells and nuclei. `POST /segment` an image; the answer is "
                    f"JSON, or with `?format=` one file: {formats_help()}. The server keeps no image: a "
                    "download sends the image again (the label images of recent requests stay in memory, "
                    "so it is not segmented twice).",
    )
    app.state.registry, app.state.pool, app.state.temp_root, app.state.settings = registry, pool, temp_root, settings
    app.state.cache = ResultCache(settings.cache_megapixels)  # read per request, like the pool

    def retry_after() -> str:
        pool = app.state.pool
        return str(max(1, math.ceil(job_seconds[0] * pool.capacity / pool.workers)))

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return JSONResponse({"detail": f"the server is busy: {exc}; retry later"}, status_code=503,
                            headers={"Retry-After": retry_after()})

    @app.get("/health", summary="liveness and the default model")
    def health() -> dict:
        pool = app.state.pool
        return {"status": "ok", "model": registry.default, "version": __version__,
                "queue": {"admitted": pool.admitted, "capacity": pool.capacity, "completed": pool.completed},
                "cache": app.state.cache.stats()}

    @app.get("/models", summary="the models a request may name, with their model cards")
    def models() -> dict:
        return {"default": registry.default, "models": registry.cards()}

    def segment_or_reuse(data: bytes, path: Path, model_name: str, diameter, channel, plane, pixel_size, name: str,
                         polarity: str | None = None):
        """The Segmenter's result for the file at ``path``, its labels reused from the cache when
        these very bytes were segmented with the same settings."""
        from cellrcnn.api import Result, Segmenter

        segmenter, cache = registry.get(model_name), app.state.cache
        key = (hashlib.sha256(data).hexdigest(), model_name, str(diameter), channel, plane, polarity)
        hit = cache.get(key)
        if hit is not None:
            labels, scores, info = hit
            return Result(labels, scores, Segmenter.read(path, channel, plane), name=name, pixel_size=pixel_size,
                          info=info)
        result = segmenter.segment(path, diameter=diameter, channel=channel, plane=plane, pixel_size=pixel_size,
                                   name=name, polarity=polarity)
        cache.put(key, result.labels, result.scores, result.info)
        return result

    def segment_job(upload: Upload, suffix: str, model_name: str, fmt: str | None, diameter, pixel_size,
                    channel: int | None, plane: int | None, include_overlay: bool, polarity: str | None = None):
        """Runs in a worker thread: decode, segment, answer; the temporary folder dies with it."""
        from cellrcnn.io import ImageReadError

        start = time.perf_counter()
        client_name = safe_name(upload.filename, f"image{suffix}")
        with tempfile.TemporaryDirectory(dir=temp_root) as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(upload.data)
            shape = image_pixels(path)
            if shape and shape[0] * shape[1] > settings.max_megapixels * 1e6:
                raise UploadError(422, f"{client_name}: {shape[1]}×{shape[0]} pixels exceeds the limit of "
                                       f"{settings.max_megapixels:g} megapixels")
            try:
                result = segment_or_reuse(upload.data, path, model_name, diameter, channel, plane, pixel_size,
                                          client_name, polarity)
            except ImageReadError as exc:  # the message names our temporary file: name the client's
                raise UploadError(422, str(exc).replace(str(path), client_name)) from exc
            except ValueError as exc:  # a diameter the model cannot use, a channel out of range, ...
                raise UploadError(422, f"{client_name}: {exc}") from exc
            if fmt is None:
                answer = result_json(result, model_name)
                if include_overlay:  # the web page shows it without a second request
                    png = render_file(result, "overlay", Path(tmp), "overlay")[0]
                    answer["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
            else:
                try:
                    answer = render_file(result, fmt, Path(tmp), safe_stem(upload.filename))
                except ValueError as exc:
                    raise UploadError(422, str(exc)) from exc
        job_seconds[0] = 0.8 * job_seconds[0] + 0.2 * (time.perf_counter() - start)
        return answer

    @app.post("/segment", summary="segment one image", openapi_extra=SEGMENT_FORM,
              response_description="JSON (n_objects, width, height, model, cells, summary, downloads), "
                                   "or the file asked for by format")
    async def segment(request: Request, format: str | None = Query(  # noqa: A002 - the public parameter name
            None, description=f"answer with one file instead of JSON: {', '.join(FORMATS)}")):
        if format is not None and format not in FORMATS:
            raise UploadError(422, f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
        pool = app.state.pool  # read per request: an operator (or a test) may swap in another pool
        with pool.slot():  # held from the upload's first byte: at most `capacity` bodies in memory
            try:
                upload = await read_multipart(request.headers.get("content-type", ""),
                                              request.headers.get("content-length"), request.stream(),
                                              int(settings.max_upload_mb * 2**20), settings.upload_idle_timeout_s)
            except ClientDisconnect:
                raise UploadError(400, "the connection closed before the upload was complete") from None
            fields = upload.fields
            model_name = fields.get("model") or registry.default
            if model_name not in registry.names:
                raise UploadError(422, f"unknown model {model_name!r}; available: {', '.join(registry.names)}")
            diameter = _parse_diameter(fields)
            polarity = _parse_polarity(fields)
            pixel_size = _parse_number(fields, "pixel_size")
            channel, plane = (_parse_index(fields, key) for key in ("channel", "plane"))
            include_overlay = fields.get("include_overlay", "").lower() in ("1", "true", "yes")
            suffix = sniff_suffix(upload.data[:16])
            if suffix is None:
                raise UploadError(415, f"{safe_name(upload.filename)}: not an image (PNG, TIFF, JPEG or BMP expected)")
            try:
                answer = await pool.execute(segment_job, upload, suffix, model_name, format, diameter, pixel_size,
                                            channel, plane, include_overlay, polarity)
            except UploadError:
                raise
            except Exception:  # one image's failure must not take the server down; the log has the trace
                log.exception("segmenting %s failed", upload.filename)
                return JSONResponse({"detail": "internal error while segmenting this image"}, status_code=500)
        if format is None:
            return JSONResponse(answer)
        data, media_type, filename = answer
        return Response(data, media_type=media_type,
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def api_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(api_page(app.openapi(), str(request.base_url)))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
