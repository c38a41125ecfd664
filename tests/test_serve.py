"""The HTTP service in-process (httpx over ASGI) with the shipped model: every endpoint and format,
each bad input's status and message, the bounded queue, and concurrent requests answering as
sequential ones do. Images are small disk fields whose object count is known."""

import asyncio
import io
import json
import re
import shutil
import subprocess
import zipfile

import httpx
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellrcnn.api import WEIGHTS_DIR
from cellrcnn.serve import main
from cellrcnn.serve.app import STATIC_DIR as STATIC
from cellrcnn.serve.app import ServeSettings, create_app
from cellrcnn.serve.jobs import InferencePool, QueueFull, ResultCache
from cellrcnn.serve.outputs import FORMATS
from cellrcnn.serve.uploads import safe_name, sniff_suffix

LIMIT_MB = 1.0


def disks_png(n: int, size: int = 128, value: int = 200) -> bytes:
    """PNG bytes of a size×size field with ``n`` (<= 4) separated disks of radius 9 px (≈ 254 px area)."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 20, np.uint8)
    for cy, cx in ((30, 30), (30, 90), (90, 30), (90, 90))[:n]:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = value
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The service over a weights folder with the shipped model twice (``nuclei``, ``nuclei_copy``);
    no result cache, so every request segments (a test swaps one in)."""
    weights = tmp_path_factory.mktemp("weights")
    for name in ("nuclei", "nuclei_copy"):
        for suffix in (".ckpt", ".json"):
            shutil.copy(WEIGHTS_DIR / f"nuclei{suffix}", weights / f"{name}{suffix}")
    settings = ServeSettings(max_upload_mb=LIMIT_MB, max_megapixels=0.1, workers=2, max_queue=2, cache_megapixels=0)
    app = create_app("nuclei", settings, weights_dir=weights)
    yield app
    app.state.pool.shutdown()  # what the server's shutdown does (ASGI lifespan is not run in-process)
    shutil.rmtree(app.state.temp_root)


def request(app, *calls):
    """Run ``(method, url, kwargs)`` calls concurrently against the app; returns the responses in order."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cellrcnn.test", timeout=300) as client:
            return await asyncio.gather(*(client.request(m, url, **kw) for m, url, kw in calls))

    return asyncio.run(go())


def post(app, data: bytes, filename="cells.png", fmt=None, **fields):
    url = "/segment" + (f"?format={fmt}" if fmt else "")
    return request(app, ("POST", url, {"files": {"file": (filename, data, "image/png")}, "data": fields}))[0]


def test_health_and_models(app):
    health, models = request(app, ("GET", "/health", {}), ("GET", "/models", {}))
    assert health.status_code == 200
    assert {k: health.json()[k] for k in ("status", "model")} == {"status": "ok", "model": "nuclei"}
    listed = {m["name"]: m for m in models.json()["models"]}
    assert listed["nuclei"]["default"] and listed["nuclei"]["card"]["module"] == "UNetModule"
    assert listed["nuclei"]["loaded"] and not listed["nuclei_copy"]["default"]


def test_auto_chooses_a_shipped_model_per_image(app):
    response = post(app, disks_png(2), model="auto")
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "nuclei" and "image" in body["model_choice"] and body["n_objects"] == 2
    listed = request(app, ("GET", "/models", {}))[0].json()["models"]
    assert listed[0]["name"] == "auto" and "nuclei_he" in listed[0]["card"]["description"]
    assert post(app, disks_png(2)).json()["model_choice"] is None  # the server's default: named nuclei


def test_a_request_names_another_model(app):
    response = post(app, disks_png(2), model="nuclei_copy")
    assert response.status_code == 200 and response.json()["model"] == "nuclei_copy"
    assert response.json()["n_objects"] == 2
    listed = {m["name"]: m for m in request(app, ("GET", "/models", {}))[0].json()["models"]}
    assert listed["nuclei_copy"]["loaded"]  # loaded on first use, then kept


def test_page_and_assets_are_served_locally(app):
    page, js, css, docs, api = request(app, ("GET", "/", {}), ("GET", "/static/app.js", {}),
                                       ("GET", "/static/style.css", {}), ("GET", "/openapi.json", {}),
                                       ("GET", "/docs", {}))
    assert page.status_code == js.status_code == css.status_code == api.status_code == 200
    assert "/static/app.js" in page.text and "/static/style.css" in page.text and "fetch(" in js.text
    for asset in (page, js, css):  # nothing from a CDN: the page works offline
        assert "http://" not in asset.text and "https://" not in asset.text
    assert not re.search(r'(src|href)="(https?:)?//', api.text)  # and so does the API's
    assert "multipart/form-data" in json.dumps(docs.json()["paths"]["/segment"])
    # the API page lists every request and the form fields of /segment, with their meaning
    for text in ("POST /segment", "GET /models", "GET /health", "<code>file</code> (required)", "<code>diameter</code>",
                 "<code>format</code>", "typical object diameter in pixels"):
        assert text in api.text, text


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_model_tooltips_say_what_each_model_learned_from(tmp_path):
    """The page's model list shows each card's training sources and licence, not ``[object Object]``."""
    js = (STATIC / "app.js").read_text()
    title = js[js.index("function modelTitle"):js.index("async function init")]
    card = {"licence": "CC BY-NC-SA 4.0: non-commercial use only", "trained_on": [
        {"source": "bbbc038", "images": 500, "licence": "CC0 1.0"}, {"source": "monuseg", "images": 23,
                                                                      "licence": "CC BY-NC-SA 4.0"}]}
    script = title + f"console.log(modelTitle({json.dumps(card)})); console.log(modelTitle({{description: 'auto'}}));"
    (tmp_path / "t.js").write_text(script)
    out = subprocess.run(["node", str(tmp_path / "t.js")], capture_output=True, text=True, timeout=60).stdout
    assert out == ("trained on bbbc038 (500 images, CC0 1.0), monuseg (23 images, CC BY-NC-SA 4.0)\n"
                   "CC BY-NC-SA 4.0: non-commercial use only\nauto\n")


def test_segment_json(app):
    response = post(app, disks_png(3), filename="three disks.png", pixel_size="0.5", include_overlay="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["n_objects"], body["width"], body["height"], body["model"]) == (3, 128, 128, "nuclei")
    assert len(body["cells"]) == 3 and body["summary"]["count"] == 3
    assert all(60 < cell["area_um2"] < 70 for cell in body["cells"])  # 249-257 px × 0.25 µm²
    assert body["cells"][0]["image"] == "three_disks.png"
    assert set(body["downloads"]) == set(FORMATS) and isinstance(body["warnings"], list)
    overlay = Image.open(io.BytesIO(__import__("base64").b64decode(body["overlay_png_base64"])))
    assert overlay.size == (128, 128) and overlay.mode == "RGB"
    assert body["seen_as"] == "as is"
    # the user's polarity reaches the model: bright disks said to be dark are inverted, and missed
    dark = post(app, disks_png(3), filename="dark.png", polarity="dark").json()
    assert dark["seen_as"] == "inverted" and dark["n_objects"] != 3
    assert post(app, disks_png(3), polarity="bright").json()["seen_as"] == "as is"


def test_every_format_is_a_file_of_the_same_segmentation(app):
    data = disks_png(4)
    files = {fmt: post(app, data, filename="field.png", fmt=fmt) for fmt in FORMATS}
    for fmt, response in files.items():
        assert response.status_code == 200, (fmt, response.text)
        assert response.headers["content-type"].startswith(FORMATS[fmt][0])
        assert response.headers["content-disposition"] == f'attachment; filename="field{FORMATS[fmt][1]}"'
    labels = tifffile.imread(io.BytesIO(files["tiff"].content))
    assert labels.dtype == np.uint16 and labels.shape == (128, 128) and labels.max() == 4
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(files["png"].content))), labels)
    assert len(files["geojson"].json()["features"]) == 4
    assert len(zipfile.ZipFile(io.BytesIO(files["imagej"].content)).namelist()) == 4
    table = pd.read_csv(io.BytesIO(files["csv"].content))
    assert list(table["label"]) == [1, 2, 3, 4] and table["area_px"].between(240, 270).all()
    assert Image.open(io.BytesIO(files["overlay"].content)).size == (128, 128)


def test_bad_inputs_get_4xx_saying_what_is_wrong(app):
    too_many_pixels = io.BytesIO()
    Image.fromarray(np.zeros((400, 400), np.uint8)).save(too_many_pixels, format="PNG")  # 0.16 MP > 0.1
    cases = [
        (post(app, b"a,b\n1,2\n", filename="table.csv"), 415, "table.csv: not an image"),
        (post(app, disks_png(1)[:60], filename="cut.png"), 422, "cut.png: cannot read image"),
        (post(app, too_many_pixels.getvalue(), filename="big.png"), 422, "400×400 pixels exceeds the limit of 0.1"),
        (post(app, disks_png(1), model="nuclei_../../x"), 422, "unknown model 'nuclei_../../x'; available: auto, nuclei"),
        (post(app, disks_png(1), fmt="jpeg"), 422, "unknown format 'jpeg'; choose from tiff, png"),
        (post(app, disks_png(1), diameter="-3"), 422, "diameter must be a positive number or auto or shrink or range or default or native"),
        (post(app, disks_png(1), pixel_size="nan"), 422, "pixel_size must be a positive number"),
        (post(app, disks_png(1), polarity="up"), 422, "polarity must be one of auto, bright, dark"),
        (post(app, b""), 422, "empty file"),
    ]
    no_file, not_multipart, declared_too_large = request(
        app,
        ("POST", "/segment", {"data": {"model": "nuclei"}, "files": {"other": ("x.txt", b"x")}}),
        ("POST", "/segment", {"content": disks_png(1), "headers": {"content-type": "image/png"}}),
        ("POST", "/segment", {"content": b"x", "headers": {"content-type": "multipart/form-data; boundary=B",
                                                           "content-length": str(5 * 2**20)}}),
    )
    cases += [(no_file, 422, "no 'file' field"), (not_multipart, 415, "multipart/form-data"),
              (declared_too_large, 413, "5.0 MB exceeds the limit of 1 MB")]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"]
    assert list(app.state.temp_root.iterdir()) == []  # every request's folder is gone, failures included


def test_upload_size_is_checked_while_streaming(app):
    """A body without Content-Length is cut off at the limit: the server stops reading it."""
    chunk, n_chunks, sent = b"\0" * 65536, 64, []  # 4 MB against a 1 MB limit

    async def body():
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n\r\n\x89PNG\r\n\x1a\n'
        for i in range(n_chunks):
            sent.append(i)
            yield chunk

    response = request(app, ("POST", "/segment", {
        "content": body(), "headers": {"content-type": "multipart/form-data; boundary=B"}}))[0]
    assert response.status_code == 413 and "limit of 1 MB" in response.json()["detail"]
    assert len(sent) <= LIMIT_MB * 2**20 / len(chunk) + 1 < n_chunks


def test_client_file_names_never_become_paths(app, tmp_path):
    response = post(app, disks_png(2), filename="../../../../tmp/evil name.png", fmt="csv")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="evil_name.csv"'
    assert list(app.state.temp_root.iterdir()) == []
    assert safe_name("..\\..\\a b.TIF") == "a_b.TIF" and safe_name("../") == "the upload"
    body = b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + disks_png(1) + b"\r\n--B--\r\n"
    unnamed = request(app, ("POST", "/segment", {"content": body, "headers": {
        "content-type": "multipart/form-data; boundary=B"}}))[0]  # curl -F file=<image.png sends no name
    assert unnamed.status_code == 200 and unnamed.json()["image"] == "image.png"


def test_concurrent_requests_answer_as_sequential_ones(app):
    images = {n: disks_png(n, value=100 + 30 * n) for n in (1, 2, 3, 4)}
    sequential = {n: post(app, data, filename=f"{n}.png").json() for n, data in images.items()}
    calls = [("POST", "/segment", {"files": {"file": (f"{n}.png", images[n], "image/png")}})
             for n in (4, 3, 2, 1)]  # four at once: two run, two wait in the queue
    concurrent = request(app, *calls)
    for n, response in zip((4, 3, 2, 1), concurrent, strict=True):
        assert response.status_code == 200 and response.json() == sequential[n]
        assert response.json()["n_objects"] == n


def test_full_queue_answers_503_with_retry_after(app):
    app.state.pool, default_pool = InferencePool(workers=1, max_queue=0), app.state.pool
    try:
        calls = [("POST", "/segment", {"files": {"file": ("a.png", disks_png(2), "image/png")}})] * 3
        statuses = sorted(r.status_code for r in request(app, *calls))
        busy = request(app, *calls[:2])[1]  # the first runs (>= 0.1 s), the second finds the queue full
    finally:
        app.state.pool.shutdown()
        app.state.pool = default_pool
    assert statuses == [200, 503, 503]
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
    assert "busy" in busy.json()["detail"]


def test_uploads_in_progress_hold_their_place_in_the_queue(app):
    """With room for one request, a slow upload still streaming in makes the next request a 503:
    bodies in memory are bounded by the queue, not only running jobs."""
    app.state.pool, default_pool = InferencePool(workers=1, max_queue=0), app.state.pool
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n\r\n'

    async def go():
        release = asyncio.Event()

        async def slow_body():
            yield head
            await release.wait()
            yield disks_png(1) + b"\r\n--B--\r\n"

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cellrcnn.test", timeout=300) as client:
            slow = asyncio.ensure_future(client.post("/segment", content=slow_body(), headers={
                "content-type": "multipart/form-data; boundary=B"}))
            await asyncio.sleep(0.2)
            second = await client.post("/segment", files={"file": ("b.png", disks_png(2), "image/png")})
            release.set()
            return await slow, second

    try:
        slow, second = asyncio.run(go())
    finally:
        app.state.pool.shutdown()
        app.state.pool = default_pool
    assert second.status_code == 503
    assert slow.status_code == 200 and slow.json()["n_objects"] == 1


def test_a_stalled_upload_gives_its_place_back(app):
    app.state.settings.upload_idle_timeout_s, default = 0.3, app.state.settings.upload_idle_timeout_s

    async def stalled_body():
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n\r\n'
        await asyncio.sleep(5)
        yield b"never read"

    try:
        response = request(app, ("POST", "/segment", {"content": stalled_body(), "headers": {
            "content-type": "multipart/form-data; boundary=B"}}))[0]
    finally:
        app.state.settings.upload_idle_timeout_s = default
    assert response.status_code == 408 and "no data for 0.3 s" in response.json()["detail"]
    assert app.state.pool.admitted == 0


def test_tiff_jpeg_channel_and_plane_uploads(app):
    yy, xx = np.mgrid[:128, :128]
    disks = ((yy - 40) ** 2 + (xx - 40) ** 2 < 81) | ((yy - 90) ** 2 + (xx - 80) ** 2 < 81)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.where(disks, 3000, 400).astype(np.uint16))  # 16-bit
    jpeg = io.BytesIO()
    Image.fromarray(np.where(disks, 200, 30).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    noise = np.random.default_rng(0).integers(0, 80, (128, 128, 3)).astype(np.uint8)
    noise[..., 1] = np.where(disks, 220, 20)  # the nuclei are in channel 1 only
    rgb = io.BytesIO()
    Image.fromarray(noise).save(rgb, format="PNG")
    assert post(app, tiff.getvalue(), filename="deep.tif").json()["n_objects"] == 2
    assert post(app, jpeg.getvalue(), filename="photo.jpg").json()["n_objects"] == 2
    assert post(app, rgb.getvalue(), filename="rgb.png", channel="1").json()["n_objects"] == 2
    bad = post(app, rgb.getvalue(), filename="rgb.png", channel="7")
    assert bad.status_code == 422 and "channel" in bad.json()["detail"]
    stack = io.BytesIO()  # a z-stack of three pages, nuclei in focus in the last one only
    tifffile.imwrite(stack, np.stack([np.full((128, 128), 400, np.uint16)] * 2
                                     + [np.where(disks, 3000, 400).astype(np.uint16)]), photometric="minisblack")
    assert post(app, stack.getvalue(), filename="stack.tif", plane="2").json()["n_objects"] == 2
    unspecified = post(app, stack.getvalue(), filename="stack.tif")
    assert unspecified.status_code == 422 and "plane" in unspecified.json()["detail"]
    assert "plane must be an index" in post(app, stack.getvalue(), plane="top").json()["detail"]


def test_pool_admits_at_most_workers_plus_queue():
    import threading

    release = threading.Event()

    async def go():
        pool = InferencePool(workers=1, max_queue=1)
        running = [asyncio.ensure_future(pool.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await pool.run(release.wait)
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        assert (pool.admitted, pool.completed) == (0, 2)
        pool.shutdown()

    asyncio.run(go())


def test_sniffing_and_command_line_errors(capsys):
    assert sniff_suffix(disks_png(1)) == ".png" and sniff_suffix(b"II*\0rest") == ".tif"
    assert sniff_suffix(b"%PDF-1.4") is None
    assert main(["--model", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'; available: auto, nuclei" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--max-upload-mb" in capsys.readouterr().out


def test_downloads_reuse_the_labels_just_computed(app):
    data = disks_png(3)
    fresh = post(app, data, fmt="csv").content  # no cache: segmented for this request
    app.state.cache, no_cache = ResultCache(max_megapixels=1), app.state.cache
    try:
        assert post(app, data).json()["n_objects"] == 3
        assert post(app, data, fmt="csv").content == fresh  # the same labels, not segmented again
        assert post(app, data, fmt="csv", diameter="17").status_code == 200  # other settings: segmented
        assert app.state.cache.stats() | {"megapixels": 0} == {"entries": 2, "megapixels": 0, "hits": 1, "misses": 2}
    finally:
        app.state.cache = no_cache


def test_result_cache_is_bounded_by_pixels():
    cache = ResultCache(max_megapixels=0.05)  # 50,000 label pixels
    for i in range(4):
        cache.put(("image", i), np.zeros((100, 150), np.uint16), np.zeros(0), {})  # 15,000 each
    assert cache.stats()["entries"] == 3 and cache.get(("image", 0)) is None and cache.get(("image", 3)) is not None
    cache.put(("huge",), np.zeros((300, 300), np.uint16), np.zeros(0), {})  # larger than the whole cache
    assert cache.get(("huge",)) is None


@pytest.mark.slow
def test_load_benchmark_smoke(tmp_path):
    """bench/serve_load.py against a real server process: every request answered, figures written."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("bench_serve_load", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--clients", "1,2", "--requests", "3", "--time-limit", "120", "--threads", "1",
                       "--out", str(tmp_path / "load")]) == 0
    runs = json.loads((tmp_path / "load.json").read_text())["runs"]
    assert [(r["clients"], r["ok"], r["errors"]) for r in runs] == [(1, 3, 0), (2, 3, 0)]
    assert all(r["p95_s"] >= r["p50_s"] > 0 and r["peak_rss_mb"] > 100 for r in runs)
    assert "| 2 | 3 |" in (tmp_path / "load.md").read_text()


def test_registry_takes_a_checkpoint_path_or_a_shipped_name(tmp_path):
    from cellrcnn.serve.jobs import ModelRegistry

    ckpt = tmp_path / "my_model.ckpt"
    shutil.copy(WEIGHTS_DIR / "nuclei.ckpt", ckpt)
    registry = ModelRegistry(str(ckpt))
    assert registry.default == "my_model.ckpt" and registry.names[:3] == ["auto", "my_model.ckpt", "nuclei"]
    assert [c["card"] for c in registry.cards()][1] == {}  # no card beside the checkpoint
    assert ModelRegistry("nuclei").default == "nuclei"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        ModelRegistry(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="unknown model 'nucleus'; available: auto, nuclei"):
        ModelRegistry("nucleus")
