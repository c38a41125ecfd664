"""The Python API (cellrcnn.Segmenter) with the shipped model: same labels as predict.py, inputs as
arrays or files, channel selection, measurements and overlays."""

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellrcnn.api import Segmenter, as_image, available_models, model_card
from cellrcnn.config import compose_config
from cellrcnn.io import ImageReadError, read_label_image
from cellrcnn.predict import run as predict_run

DSB_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bbbc038" / "stage1_train.zip"
# a 256×256 fluorescence field of the DSB2018 training set (36 annotated nuclei)
DSB_IMAGE = "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1"


def disks_image(rows: int = 5, cols: int = 5, spacing: int = 50, radius: int = 9) -> np.ndarray:
    """uint8 256×256 field of ``rows × cols`` well separated bright disks (nuclei of the training size)."""
    yy, xx = np.mgrid[:256, :256]
    image = np.full((256, 256), 20, np.uint8)
    for r in range(rows):
        for c in range(cols):
            image[(yy - 30 - spacing * r) ** 2 + (xx - 30 - spacing * c) ** 2 < radius**2] = 200
    return image


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter.from_pretrained("nuclei")


def test_shipped_models_are_discovered_with_their_cards():
    models = available_models()
    assert "nuclei" in models and models["nuclei"].suffix == ".ckpt"
    assert model_card("nuclei")["module"] == "UNetModule"
    with pytest.raises(ValueError, match="unknown model 'nope'; available: .*nuclei"):
        Segmenter.from_pretrained("nope")


def test_available_models_lists_every_checkpoint_of_a_folder(tmp_path):
    for name in ("nuclei", "nuclei_he"):
        (tmp_path / f"{name}.ckpt").write_bytes(b"")
    (tmp_path / "nuclei_he.json").write_text('{"module": "UNetModule"}')
    assert list(available_models(tmp_path)) == ["nuclei", "nuclei_he"]
    assert model_card("nuclei_he", tmp_path) == {"module": "UNetModule"} and model_card("nuclei", tmp_path) == {}


def test_default_diameter_follows_the_checkpoint(segmenter, tmp_path):
    """A model that recommends diameter=auto (nuclei_he) gets it by default: small nuclei are
    measured and enlarged; the shipped nuclei recommends range, which enlarges them too; one that
    recommends nothing gets shrink, which never enlarges; an explicit mode wins."""
    import torch

    ckpt = torch.load(available_models()["nuclei"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["default_diameter"] == "range"
    ckpt["hyper_parameters"].pop("default_diameter")
    torch.save(ckpt, tmp_path / "nuclei_none.ckpt")
    ckpt["hyper_parameters"]["default_diameter"] = "auto"
    torch.save(ckpt, tmp_path / "nuclei_auto.ckpt")
    recommending = Segmenter.from_checkpoint(tmp_path / "nuclei_auto.ckpt")
    small = disks_image(rows=8, cols=8, spacing=30, radius=5)  # 10-px nuclei, the model's are 19 px
    result = recommending.segment(small)
    assert recommending.default_diameter == "auto" and result.info["diameter"] == "auto"
    assert result.info["factor"] > 1.3 and result.n_objects == 64
    assert result.info["measured_diameter"] == pytest.approx(10, abs=1.5)  # the quick pass's estimate
    assert result.info["median_diameter"] == pytest.approx(10, abs=1.5)  # of the objects returned
    explicit = recommending.segment(small, diameter="shrink").info  # shrink never enlarges
    assert explicit["diameter"] == "shrink" and explicit["factor"] == 1.0
    shipped = segmenter.segment(small).info
    assert segmenter.default_diameter == "range" and shipped["diameter"] == "range" and shipped["factor"] > 1.3
    silent = Segmenter.from_checkpoint(tmp_path / "nuclei_none.ckpt")
    assert silent.default_diameter == "shrink" and silent.segment(small).info["factor"] == 1.0


def test_segment_counts_separated_disks(segmenter):
    result = segmenter.segment(disks_image())
    assert result.n_objects == 25
    assert result.labels.shape == (256, 256) and result.labels.dtype == np.uint16
    assert sorted(np.unique(result.labels))[1:] == list(range(1, 26))
    assert len(result.table) == 25 and result.table["area_px"].between(150, 400).all()  # π·9² ≈ 254 px
    assert result.overlay.shape == (256, 256, 3) and result.overlay.dtype == np.uint8
    assert result.scores.shape == (25,) and result.info["factor"] == 1.0


@pytest.mark.slow
def test_api_equals_predict_cli_labels(segmenter, tmp_path):
    """Synthetic disks and (when ../shared/data is present) a real DSB2018 field: the API's label
    image is the CLI's label TIFF, pixel for pixel."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(disks_image(4, 3)).save(folder / "disks.png")
    if DSB_ZIP.is_file():
        with zipfile.ZipFile(DSB_ZIP) as z:
            (folder / "dsb.png").write_bytes(z.read(f"{DSB_IMAGE}/images/{DSB_IMAGE}.png"))
    out = tmp_path / "out"
    predict_run(compose_config("predict", [f"input={folder}", f"output={out}", "overlays=false"], tmp_path))
    for path in sorted(folder.iterdir()):
        cli = read_label_image(out / f"{path.stem}.tif")
        api = segmenter.segment(path).labels
        np.testing.assert_array_equal(api, cli)
        assert cli.max() > 0
    assert read_label_image(out / "disks.tif").max() == 12


@pytest.mark.realdata
def test_real_image_as_array_or_file(segmenter, tmp_path):
    if not DSB_ZIP.is_file():
        pytest.skip(f"{DSB_ZIP} is absent (real DSB2018 data)")
    with zipfile.ZipFile(DSB_ZIP) as z:
        (tmp_path / "dsb.png").write_bytes(z.read(f"{DSB_IMAGE}/images/{DSB_IMAGE}.png"))
    from_file = segmenter.segment(tmp_path / "dsb.png")
    rgba = np.asarray(Image.open(tmp_path / "dsb.png"))
    assert rgba.shape[-1] == 4  # the DSB PNGs are RGBA; the API drops alpha as the file reader does
    from_array = segmenter.segment(rgba)
    np.testing.assert_array_equal(from_file.labels, from_array.labels)
    assert from_file.table["image"].iloc[0] == "dsb.png" and from_file.n_objects > 10


def test_channel_or_plane_selects_one_image(segmenter):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 60, (160, 112, 5)).astype(np.uint16)
    stack[..., 3] = disks_image(3, 2)[:160, :112].astype(np.uint16) * 16  # 16-bit nuclei channel, 6 nuclei
    by_channel = segmenter.segment(stack, channel=3)
    assert by_channel.n_objects == 6
    np.testing.assert_array_equal(by_channel.labels, segmenter.segment(stack[..., 3]).labels)
    with pytest.raises(ValueError, match="channel=..."):
        segmenter.segment(stack)  # 5 planes: which one is the nuclei is the user's choice
    with pytest.raises(ValueError, match="out of range"):
        segmenter.segment(stack, channel=5)
    planes = np.moveaxis(stack, -1, 0)  # as a Z×H×W stack: plane=3 is the nuclei
    np.testing.assert_array_equal(segmenter.segment(planes, plane=3).labels, by_channel.labels)
    # the same array as channels first (what tifffile.imread gives a multi-channel TIFF): channel=3
    np.testing.assert_array_equal(segmenter.segment(planes, channel=3).labels, by_channel.labels)


def test_polarity_says_what_the_objects_are(segmenter):
    """Bright nuclei filling most of a field (a bright median: read as brightfield, so inverted)
    are segmented as they are with polarity=bright; dark ones on a bright field are inverted by
    default and with polarity=dark; the result says how the model saw the image."""
    yy, xx = np.mgrid[:256, :256]
    dense = np.full((256, 256), 20, np.uint8)
    for y in range(16, 256, 32):
        for x in range(16, 256, 32):
            dense[(yy - y) ** 2 + (xx - x) ** 2 < 15**2] = 200  # 64 nuclei over 69 % of the field
    dense[(yy % 32 - 16) ** 2 + (xx % 32 - 16) ** 2 < 9] = 120  # a dim nucleolus in each
    default = segmenter.segment(dense)
    bright = Segmenter.from_pretrained("nuclei", polarity="bright").segment(dense)
    assert bright.info["seen_as"] == "as is" and bright.n_objects == 64
    assert default.info["seen_as"] == "inverted" and default.n_objects != 64  # the user's word is needed
    dark_field = 255 - disks_image()
    assert segmenter.segment(dark_field).info["seen_as"] == "inverted"
    forced = Segmenter.from_pretrained("nuclei", polarity="dark").segment(dark_field)
    assert forced.info["seen_as"] == "inverted" and forced.n_objects == 25
    with pytest.raises(ValueError, match="bright"):
        Segmenter.from_pretrained("nuclei", polarity="white")


def test_segment_many_in_order_with_pixel_size(segmenter, tmp_path):
    paths = []
    for n in (1, 2):
        paths.append(tmp_path / f"d{n}.png")
        Image.fromarray(disks_image(n, 2)).save(paths[-1])
    results = list(segmenter.segment_many(paths, progress=False, pixel_size=0.5))
    assert [r.name for r in results] == ["d1.png", "d2.png"] and [r.n_objects for r in results] == [2, 4]
    assert results[0].table["area_um2"].between(150 * 0.25, 400 * 0.25).all()
    (tmp_path / "bad.png").write_text("not an image")
    # one unreadable file is skipped with a warning naming it, and the images after it still come
    with pytest.warns(UserWarning, match="bad.png"):
        kept = list(segmenter.segment_many([paths[0], tmp_path / "bad.png", paths[1]], progress=False))
    assert [r.name for r in kept] == ["d1.png", "d2.png"]
    with pytest.raises(ImageReadError, match="bad.png"):
        list(segmenter.segment_many([tmp_path / "bad.png"], progress=False, skip_unreadable=False))


def test_as_image_rules():
    assert as_image(np.zeros((8, 9, 1), np.uint16)).shape == (8, 9)
    assert as_image(np.zeros((8, 9, 2), np.uint8), channel=1).shape == (8, 9)
    assert as_image(np.zeros((8, 9, 4), np.float32)).shape == (8, 9, 3)
    assert as_image(np.zeros((8, 9), bool)).dtype == np.uint8
    # channels (or z-planes) first: which one is asked, never guessed as colour
    assert as_image(np.zeros((3, 20, 30), np.uint8), channel=2).shape == (20, 30)
    with pytest.raises(ValueError, match=r"3×20×30 array has 3 channels or z-planes first: give channel=K"):
        as_image(np.zeros((3, 20, 30), np.uint8))
    assert as_image(np.zeros((2, 20, 30), np.uint16), channel=1).shape == (20, 30)
    assert as_image(np.zeros((20, 30, 2), np.uint16), channel=1).shape == (20, 30)
    for bad, message in ((np.zeros((2, 8, 9, 3)), "H×W"), (np.zeros((8, 9, 2)), "channel="), (np.zeros((0, 9)), "empty"),
                         (np.array([["a"]]), "numbers")):
        with pytest.raises(ValueError, match=message):
            as_image(bad)


def test_import_cellrcnn_stays_light():
    code = "import sys, cellrcnn; assert 'torch' not in sys.modules; print(cellrcnn.Segmenter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Segmenter"


def test_tile_overlap_follows_the_objects_of_a_large_image(segmenter, monkeypatch):
    """An image too large for one piece gets a tile overlap of 6 median object diameters from a
    quick look (96 px at least, 128 at most and without objects); a given overlap stands."""
    import cellrcnn.inference.tiling as tiling

    field = np.tile(disks_image(radius=6), (7, 7))  # 1792², 1225 nuclei of 12 px
    assert segmenter.tile_overlap_for(field) == 96  # 6 × 12 px = 72: the least overlap
    big = np.tile(disks_image(rows=3, cols=3, spacing=80, radius=9), (7, 7))  # 18-px nuclei
    assert segmenter.tile_overlap_for(big) == 112  # 6 × 18 px = 108, rounded up to 16 px
    assert segmenter.tile_overlap_for(np.zeros((1792, 1792), np.uint8)) == 128
    assert Segmenter.from_pretrained("nuclei", tile_overlap=100).tile_overlap_for(field) == 100
    assert Segmenter.from_pretrained("nuclei", tile_size=512).tile_overlap_for(field) == 96  # looks at 512²
    seen = []
    original = tiling.predict_image
    monkeypatch.setattr(tiling, "predict_image", lambda *a, **k: seen.append(k["overlap"]) or original(*a, **k))
    result = segmenter.segment(field, diameter=None)
    assert seen == [0, 96] and result.n_objects == 1225  # the quick look in one piece, then the tiles
