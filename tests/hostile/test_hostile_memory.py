"""The overlay export of a large prediction stays within a few bytes per pixel (it used to add
about 48: full-image float arrays), checked under an address-space limit."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cellrcnn.inference.exports import _normalised_hwc, overlay_outlines
from cellrcnn.viz import overlay_labels

from .conftest import run_limited


def test_chunked_overlay_equals_the_whole_image_drawing():
    rng = np.random.default_rng(1)
    shape = (1700, 1620)  # outlines 2 px wide: the chunk halo matters
    labels = np.zeros(shape, np.uint16)
    for k in range(1, 300):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        labels[max(0, y - 20) : y + 20, max(0, x - 15) : x + 15] = k
    raw = rng.integers(0, 4000, (*shape, 3)).astype(np.uint16)
    for alpha in (0.0, 0.35):
        whole = overlay_labels(_normalised_hwc(raw, shape), labels, alpha=alpha)
        assert np.array_equal(overlay_outlines(raw, labels, alpha=alpha, chunk_rows=97), whole)


def test_large_overlay_export_memory(tmp_path):
    n = 4000
    out = tmp_path / "overlay.png"
    proc = run_limited(f"""
        import cv2  # noqa: F401  (loaded before the limit: its libraries map address space)
        import numpy as np
        from cellrcnn.inference.exports import write_overlay_png

        n = {n}
        raw = np.empty((n, n), np.uint16)
        labels = np.zeros((n, n), np.uint16)
        for y in range(0, n, 40):  # rows of 30 × 30 px objects, ids up to about 10,000
            raw[y : y + 40] = (np.arange(n, dtype=np.uint16) % 4000)[None]
            for x in range(0, n, 40):
                labels[y + 5 : y + 35, x + 5 : x + 35] = (y // 40) * (n // 40) + x // 40 + 1

        def rss():
            return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

        open("/proc/self/clear_refs", "w").write("5")  # reset the peak
        base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        limit_memory(16 * n * n // 2**20)  # 16 bytes per pixel of address space at most
        write_overlay_png({str(out)!r}, raw, labels)
        print("BYTES_PER_PIXEL", (rss() - base) / (n * n))
    """, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_pixel = float(proc.stdout.split("BYTES_PER_PIXEL")[1].split()[0])
    assert per_pixel < 10.0, per_pixel  # 3 of them are the RGB result itself (whole-image floats: 48)
    with Image.open(out) as im:
        assert im.size == (n, n) and im.mode == "RGB"
