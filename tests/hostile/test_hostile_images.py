"""Images and label images a careless or hostile user might give: non-finite pixels, z-stacks and
channels stored as pages, 2-channel TIFFs, huge PNGs, uint64 label ids, pickled ``_seg.npy``."""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
import tifffile

from cellrcnn.evaluation.__main__ import main as score_main
from cellrcnn.io import ImageReadError, NonFiniteWarning, load_image, read_image, read_label_image

from .conftest import run_limited


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_one_bad_pixel_does_not_spoil_the_normalised_image(tmp_path, bad):
    rng = np.random.default_rng(0)
    image = rng.uniform(100, 200, (32, 32)).astype(np.float32)
    tifffile.imwrite(tmp_path / "clean.tif", image)
    image[5, 7] = bad
    tifffile.imwrite(tmp_path / "bad.tif", image)
    if np.isfinite(bad):
        out = load_image(tmp_path / "bad.tif", channels=1)
    else:
        with pytest.warns(NonFiniteWarning, match="bad.tif: 1 non-finite pixel"):
            out = load_image(tmp_path / "bad.tif", channels=1)
    clean = load_image(tmp_path / "clean.tif", channels=1)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1e4
    others = np.ones((32, 32), bool)
    others[5, 7] = False
    assert np.allclose(out[0][others], clean[0][others], atol=0.01)  # the rest normalised as before


def test_all_nan_image_is_an_error_naming_it(tmp_path):
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ImageReadError, match="nan.tif: every pixel is NaN"):
        read_image(tmp_path / "nan.tif")


def test_z_stack_needs_a_plane(tmp_path):
    stack = np.stack([np.full((8, 9), z, np.uint16) for z in range(5)])
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "pages.tif", stack)  # pages without metadata
    for name in ("z.tif", "pages.tif"):
        with pytest.raises(ImageReadError, match=rf"{name}: 5 (pages|z-planes or time points).*set plane=K"):
            read_image(tmp_path / name)
        assert np.all(read_image(tmp_path / name, plane=3) == 3)
    with pytest.raises(ImageReadError, match="plane=7 but the file has 5 planes"):
        read_image(tmp_path / "z.tif", plane=7)


def test_channels_stored_as_pages_or_samples_need_a_channel(tmp_path):
    two = np.stack([np.full((8, 9), 10, np.uint16), np.full((8, 9), 20, np.uint16)])
    tifffile.imwrite(tmp_path / "cyx.tif", two, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "yxs.tif", np.moveaxis(two, 0, -1), photometric="minisblack", planarconfig="contig")
    for name in ("cyx.tif", "yxs.tif"):
        with pytest.raises(ImageReadError, match=rf"{name}: 2 channels that are not colour.*set channel=K"):
            read_image(tmp_path / name)
        assert np.all(read_image(tmp_path / name, channel=1) == 20)  # the second channel is kept, not dropped


def test_extra_sample_marked_alpha_is_dropped(tmp_path):
    grey_alpha = np.stack([np.full((8, 9), 7, np.uint16), np.full((8, 9), 65535, np.uint16)], axis=-1)
    tifffile.imwrite(tmp_path / "ga.tif", grey_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    assert read_image(tmp_path / "ga.tif").shape == (8, 9) and np.all(read_image(tmp_path / "ga.tif") == 7)


def test_hyperstack_needs_channel_and_plane(tmp_path):
    data = np.arange(3 * 2 * 4 * 5, dtype=np.uint16).reshape(3, 2, 4, 5)
    tifffile.imwrite(tmp_path / "zc.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageReadError, match="set channel=K"):
        read_image(tmp_path / "zc.tif")
    assert np.array_equal(read_image(tmp_path / "zc.tif", channel=1, plane=2), data[2, 1])


def test_scoring_a_stack_says_so_instead_of_using_plane_0(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = np.zeros((2, 16, 16), np.uint16)
    labels[0, 2:6, 2:6] = 1
    labels[1, 8:12, 8:12] = 1
    tifffile.imwrite(gt / "s.tif", labels)
    tifffile.imwrite(pred / "s.tif", labels[::-1].copy())  # plane 0 of one is plane 1 of the other
    assert score_main([str(pred), str(gt), "--no-coco", "--quiet"]) == 2
    assert "set plane=K" in capsys.readouterr().err


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # 4 rows of a grey image: the rest is missing
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_one_pixel_limit_for_png_and_tiff(tmp_path, monkeypatch):
    # 14000 × 14000 (196 MP): Pillow's own guard refused this PNG as a decompression bomb while the
    # same TIFF read; now only the common limit applies (the rows missing from the file read as 0)
    (tmp_path / "big.png").write_bytes(_png_header_only(14000, 14000))
    try:
        assert read_image(tmp_path / "big.png").shape == (14000, 14000)
    except ImageReadError as exc:  # a Pillow that refuses truncated data: still no bomb error
        assert "DecompressionBomb" not in str(exc) and "limit" not in str(exc)
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((40, 50), np.uint8))
    from PIL import Image

    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "p.png")
    monkeypatch.setattr("cellrcnn.io.MAX_IMAGE_PIXELS", 1999)
    for name in ("t.tif", "p.png", "big.png"):
        with pytest.raises(ImageReadError, match=rf"{name}: .*above the limit of 1,999.*CELLRCNN_MAX_IMAGE_PIXELS"):
            read_image(tmp_path / name)


@pytest.mark.slow
def test_real_14000_px_png_reads_within_a_memory_budget(tmp_path):
    path = tmp_path / "big.png"
    width = height = 14000
    body = zlib.compressobj(1)
    row = b"\x00" + bytes(width)
    data = b"".join(body.compress(row) for _ in range(height)) + body.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    proc = run_limited(f"""
        from cellrcnn.io import read_image
        limit_memory(1200)  # the image is 196 MB; Pillow decodes it once, the array view shares it
        image = read_image({str(path)!r})
        print(image.shape, image.dtype, int(image.max()))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(14000, 14000) uint8 0" in proc.stdout


def test_label_ids_above_int64_stay_apart_and_positive(tmp_path):
    labels = np.zeros((4, 4), np.uint64)
    labels[0, 0] = 2**63 + 5
    labels[1, 1] = 2**64 - 1
    labels[2, 2] = 7
    np.save(tmp_path / "l.npy", labels)
    out = read_label_image(tmp_path / "l.npy")
    assert out.min() == 0 and sorted(np.unique(out).tolist()) == [0, 1, 2, 3]
    assert out[2, 2] < out[0, 0] < out[1, 1]  # value order kept


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates a file: code ran


def test_seg_npy_is_not_unpickled_without_consent(tmp_path, capsys):
    marker = tmp_path / "pwned"
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    tifffile.imwrite(gt / "a.tif", np.eye(8, dtype=np.uint16))
    np.save(pred / "a_seg.npy", np.array({"masks": _Exploit(str(marker))}, dtype=object), allow_pickle=True)
    assert pickle.loads(pickle.dumps(0)) == 0
    with pytest.raises(ImageReadError, match="a_seg.npy: a Cellpose _seg.npy is a pickle.*allow_pickle"):
        read_label_image(pred / "a_seg.npy")
    assert score_main([str(pred), str(gt), "--no-coco", "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()
    # with explicit trust a genuine Cellpose file is read
    np.save(pred / "a_seg.npy", np.array({"masks": np.eye(8, dtype=np.uint16)}, dtype=object), allow_pickle=True)
    assert score_main([str(pred), str(gt), "--no-coco", "--quiet", "--allow-pickle"]) == 0
