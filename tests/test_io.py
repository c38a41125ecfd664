"""Image and label-image IO: every bit depth and layout the sources use, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellrcnn.io import (
    ImageReadError,
    bright_background,
    hematoxylin_density,
    image_files,
    is_stained,
    is_stained_tissue,
    label_dtype,
    load_image,
    normalize_percentile,
    prepare_image,
    read_image,
    read_label_image,
    write_label_image,
)

RNG = np.random.default_rng(0)
GREY8 = RNG.integers(0, 256, (13, 17), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (13, 17), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)


def test_grey_8bit_png(tmp_path):
    Image.fromarray(GREY8).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and np.array_equal(out, GREY8)


def test_grey_16bit_png_and_tiff(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", GREY16)
    for name in ("a.png", "a.tif"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint16 and np.array_equal(out, GREY16), name


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.dstack([RGB8, np.full(RGB8.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (13, 17, 3) and np.array_equal(out, RGB8)


def test_rgb_tiff_interleaved_and_planar(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", RGB8, photometric="rgb")
    tifffile.imwrite(
        tmp_path / "planar.tif", np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"
    )
    assert np.array_equal(read_image(tmp_path / "rgb.tif"), RGB8)
    assert np.array_equal(read_image(tmp_path / "planar.tif"), RGB8)


def test_rgb_jpeg_is_close(tmp_path):
    smooth = np.repeat(np.linspace(0, 255, 17, dtype=np.uint8)[None, :, None], 13, 0).repeat(3, -1)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (13, 17, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).max() <= 8  # lossy, but close


def test_one_bit_png(tmp_path):
    bits = GREY8 > 128
    Image.fromarray(bits).convert("1").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == bool and np.array_equal(out, bits)
    image = load_image(tmp_path / "a.png", channels=1)
    assert image.shape == (1, 13, 17) and image.dtype == np.float32
    assert np.array_equal(image[0] > 0.5, bits)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_file_error_names_it(tmp_path, content):
    path = tmp_path / "broken_field_07.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken_field_07.png"):
        read_image(path)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(ImageReadError, match="nowhere.tif"):
        read_image(tmp_path / "nowhere.tif")


def test_normalize_percentile_known_answer():
    image = np.arange(1001, dtype=np.float32)  # 1st percentile = 10, 99.8th = 998
    out = normalize_percentile(image)
    assert out[10] == pytest.approx(0.0, abs=1e-6) and out[998] == pytest.approx(1.0, abs=1e-6)
    assert out[504] == pytest.approx(0.5, abs=1e-6)
    flat = normalize_percentile(np.full((4, 4), 7.0))
    assert np.all(flat == 0.0)  # a blank field stays flat, noise is not amplified


def test_same_picture_at_8_and_16_bit_gives_same_input():
    a = prepare_image(GREY8.astype(np.uint8), 1)
    b = prepare_image(GREY8.astype(np.uint16) * 257, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_prepare_image_channels():
    three = prepare_image(GREY8, 3)
    assert three.shape == (3, 13, 17) and np.array_equal(three[0], three[2])
    one = prepare_image(RGB8, 1)
    expected = normalize_percentile(RGB8.astype(np.float32).mean(-1))
    np.testing.assert_allclose(one[0], expected, atol=1e-5)
    with pytest.raises(ValueError):
        prepare_image(GREY8, 2)


def test_invert_bright_turns_dark_nuclei_on_bright_background_into_bright_ones():
    """Brightfield/H&E-like: dark disks on a bright field become bright on dark; a fluorescence-like
    image (and any image without the option) is left as it is."""
    yy, xx = np.mgrid[:64, :64]
    disks = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64) | ((yy - 44) ** 2 + (xx - 40) ** 2 < 81)
    stained = np.where(disks[..., None], [90, 40, 140], [235, 225, 240]).astype(np.uint8)  # purple on white
    fluorescence = np.where(disks, 180, 12).astype(np.uint16)
    image = prepare_image(stained, 1, invert_bright=True)
    assert bright_background(prepare_image(stained, 1)) and not bright_background(image)
    assert image[0][disks].min() > 0.9 and image[0][~disks].max() < 0.1
    np.testing.assert_allclose(image, 1.0 - prepare_image(stained, 1), atol=1e-6)
    np.testing.assert_array_equal(prepare_image(fluorescence, 1, invert_bright=True), prepare_image(fluorescence, 1))
    assert prepare_image(stained, 3, invert_bright=True)[:, disks].mean() > 0.5


def test_invert_bright_recognises_dense_stained_tissue_and_spares_colour_fluorescence():
    """H&E tissue that fills most of the field (nuclei dark, stroma mid-tone, a few white holes:
    median below half the range, as in half of MoNuSeg's fields) is still dark-on-bright; a colour
    fluorescence composite (bright objects on black) is not, and neither is grey fluorescence."""
    yy, xx = np.mgrid[:96, :96]
    nuclei = (((yy % 24) - 12) ** 2 + ((xx % 24) - 12) ** 2) < 64
    holes = (yy < 10) & (xx < 30)
    tissue = np.where(nuclei[..., None], [70, 30, 120], [170, 90, 160]).astype(np.uint8)  # purple on pink
    tissue[holes] = [245, 245, 245]
    grey = prepare_image(tissue, 1)
    assert 0.2 < float(np.median(grey)) <= 0.5  # the median rule alone would not invert it
    assert is_stained(tissue) and bright_background(grey, stained=True) and not bright_background(grey)
    inverted = prepare_image(tissue, 1, invert_bright=True)[0]
    assert inverted[nuclei].mean() > inverted[~nuclei & ~holes].mean() + 0.3  # nuclei now bright

    composite = np.zeros((96, 96, 3), np.uint8)
    composite[nuclei] = [20, 60, 230]  # DAPI in blue, a little green bleed-through
    assert is_stained(composite)
    np.testing.assert_array_equal(prepare_image(composite, 1, invert_bright=True), prepare_image(composite, 1))
    assert not is_stained(np.repeat(tissue.mean(-1, keepdims=True), 3, axis=-1))


def _stained(h_amount: np.ndarray, e_amount: np.ndarray) -> np.ndarray:
    """8-bit RGB made by Beer-Lambert from hematoxylin and eosin amounts (H×W each) and the
    stain vectors colour deconvolution assumes: the answer of the deconvolution is known."""
    from cellrcnn.io import _RGB_FROM_HED

    density = h_amount[..., None] * _RGB_FROM_HED[0] + e_amount[..., None] * _RGB_FROM_HED[1]
    return np.round(255 * np.exp(-density)).astype(np.uint8)


def test_hematoxylin_density_recovers_the_nuclear_stain_and_ignores_eosin():
    yy, xx = np.mgrid[:64, :64]
    nuclei = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64) | ((yy - 44) ** 2 + (xx - 40) ** 2 < 81)
    cytoplasm = (yy < 30) & (xx > 34)  # a quarter of the field, beside the nuclei
    h_amount = np.where(nuclei, 0.8, 0.0)
    e_amount = np.where(cytoplasm, 1.2, 0.0)  # more eosin than there is hematoxylin anywhere
    density = hematoxylin_density(_stained(h_amount, e_amount))
    assert density.shape == (64, 64) and density.dtype == np.float32
    np.testing.assert_allclose(density[nuclei], 0.8, atol=0.03)
    assert density[cytoplasm].max() < 0.03 and density[~nuclei & ~cytoplasm].max() < 0.01
    # mean grey, inverted, ranks the eosin-rich cytoplasm about as bright as the nuclei
    grey = prepare_image(_stained(h_amount, e_amount), 1, invert_bright=True)[0]
    assert grey[cytoplasm].mean() > 0.6 * grey[nuclei].mean()
    image = prepare_image(_stained(h_amount, e_amount), 1, invert_bright=True, hematoxylin=True)[0]
    assert image[nuclei].min() > 0.9 and image[~nuclei].max() < 0.05
    # any bit depth or float scale: the same densities
    sixteen = _stained(h_amount, e_amount).astype(np.uint16) * 257
    np.testing.assert_allclose(hematoxylin_density(sixteen)[nuclei], 0.8, atol=0.03)
    as_float = _stained(h_amount, e_amount).astype(np.float32) / 255
    np.testing.assert_allclose(hematoxylin_density(as_float), density, atol=1e-4)
    # computed in row chunks: the same result whatever the chunk
    np.testing.assert_array_equal(hematoxylin_density(_stained(h_amount, e_amount), rows_per_chunk=7), density)


def test_hematoxylin_input_only_for_colour_stained_tissue():
    """Grey images and colour fluorescence composites (dark background) are prepared exactly as
    without the option; stained tissue is recognised from the pixels."""
    yy, xx = np.mgrid[:96, :96]
    nuclei = (((yy % 24) - 12) ** 2 + ((xx % 24) - 12) ** 2) < 64
    composite = np.zeros((96, 96, 3), np.uint8)
    composite[nuclei] = [20, 60, 230]
    grey = np.where(nuclei, 40, 215).astype(np.uint8)
    tissue = _stained(np.where(nuclei, 0.9, 0.05), np.full((96, 96), 0.4))
    assert is_stained_tissue(tissue) and not is_stained_tissue(composite) and not is_stained_tissue(grey)
    for image in (composite, grey):
        for channels in (1, 3):
            np.testing.assert_array_equal(prepare_image(image, channels, True, hematoxylin=True),
                                          prepare_image(image, channels, True))
    three = prepare_image(tissue, 3, hematoxylin=True)
    assert three.shape == (3, 96, 96) and np.array_equal(three[0], three[2])


@pytest.mark.parametrize("top, dtype", [(300, np.uint16), (70_000, np.uint32)])
def test_label_image_round_trip(tmp_path, top, dtype):
    labels = np.zeros((40, 50), np.int64)
    labels[1:5, 1:5] = 1
    labels[10:20, 30:45] = top  # non-consecutive labels survive
    labels[30:35, 2:4] = 2
    path = write_label_image(tmp_path / "labels.tif", labels)
    assert tifffile.imread(path).dtype == dtype
    back = read_label_image(path)
    assert back.dtype == np.int64 and np.array_equal(back, labels)
    assert label_dtype(top) == dtype


def test_label_image_png_npy_and_rgb_equal_channels(tmp_path):
    labels = np.zeros((8, 9), np.uint16)
    labels[2:4, 2:6] = 3
    Image.fromarray(labels).save(tmp_path / "l.png")
    np.save(tmp_path / "l.npy", labels.astype(np.int32))
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([labels.astype(np.uint8)] * 3), photometric="rgb")
    for name in ("l.png", "l.npy", "rgb.tif"):
        assert np.array_equal(read_label_image(tmp_path / name), labels), name


def test_label_image_rejects_ambiguous_content(tmp_path):
    np.save(tmp_path / "frac.npy", np.array([[0.0, 1.5]]))
    with pytest.raises(ImageReadError, match="frac.npy"):
        read_label_image(tmp_path / "frac.npy")
    tifffile.imwrite(tmp_path / "colour.tif", RGB8, photometric="rgb")
    with pytest.raises(ImageReadError, match="colour.tif"):
        read_label_image(tmp_path / "colour.tif")


def test_image_files_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.TIF", ".hidden.png", "notes.txt", "._a.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["a.TIF", "b.png"]


def test_bright_background_needs_the_commonest_level_bright_too():
    """Textured fluorescence nuclei over most of a field (a bright median) keep their dark, even
    background as the commonest grey level: not inverted; brightfield's even bright background is
    both the median and the commonest level."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    nuclei = ((yy % 32) - 16) ** 2 + ((xx % 32) - 16) ** 2 < 15**2  # 69 % of the field
    dense = np.where(nuclei, rng.integers(130, 250, (128, 128)), 10).astype(np.uint8)  # chromatin texture
    grey = normalize_percentile(dense.astype(np.float32))
    assert np.median(grey) > 0.5 and not bright_background(grey)
    brightfield = np.where(nuclei & (yy < 40), rng.integers(20, 120, (128, 128)), 230).astype(np.uint8)
    assert bright_background(normalize_percentile(brightfield.astype(np.float32)))
    np.testing.assert_array_equal(prepare_image(dense, 1, invert_bright=True), prepare_image(dense, 1))


def test_polarity_overrides_the_decision():
    flat_nuclei = np.full((64, 64), 200, np.uint8)
    flat_nuclei[:8] = 10  # nuclei everywhere but a strip: read as a bright background
    auto = prepare_image(flat_nuclei, 1, invert_bright=True)
    assert auto[0, 0, 0] > 0.9  # inverted: the strip became bright
    np.testing.assert_array_equal(prepare_image(flat_nuclei, 1, invert_bright=True, polarity="bright"),
                                  prepare_image(flat_nuclei, 1))
    dark = prepare_image(255 - flat_nuclei, 1, invert_bright=True, polarity="dark")
    np.testing.assert_allclose(dark, 1.0 - prepare_image(255 - flat_nuclei, 1), atol=1e-6)
    # a model that did not train on inverted images is never inverted
    np.testing.assert_array_equal(prepare_image(flat_nuclei, 1, polarity="dark"), prepare_image(flat_nuclei, 1))
    with pytest.raises(ValueError, match="polarity"):
        prepare_image(flat_nuclei, 1, invert_bright=True, polarity="up")


def test_rgb_tiff_with_a_varying_untagged_fourth_sample_offers_all_channels(tmp_path):
    """An RGB TIFF whose 4th sample is not tagged as alpha and varies (the nuclei may be there)
    asks for channel=K instead of dropping it; a constant untagged 4th sample is an alpha."""
    nuclei = RNG.integers(0, 256, (13, 17), dtype=np.uint8)
    rgbx = np.dstack([GREY8, GREY8, GREY8, nuclei])
    tifffile.imwrite(tmp_path / "x.tif", rgbx, photometric="rgb", extrasamples=["unspecified"])
    with pytest.raises(ImageReadError, match="channel=K"):
        read_image(tmp_path / "x.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "x.tif", channel=3), nuclei)
    rgbx[..., 3] = 255
    tifffile.imwrite(tmp_path / "a.tif", rgbx, photometric="rgb", extrasamples=["unspecified"])
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), rgbx[..., :3])


def test_an_empty_file_is_called_empty(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"a.png: empty file \(0 bytes\)"):
        read_image(tmp_path / "a.png")


def test_channel_does_not_turn_named_z_planes_into_channels(tmp_path):
    """Pages without metadata may be channels (channel=K picks one); an ImageJ stack whose axes say
    Z needs plane=K, and its error does not suggest channel=."""
    stack = RNG.integers(0, 255, (5, 12, 14), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", stack)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif", channel=2), stack[2])
    with pytest.raises(ImageReadError, match="z-planes or time points") as error:
        read_image(tmp_path / "z.tif", channel=0)
    assert "channel=" not in str(error.value)
    np.testing.assert_array_equal(read_image(tmp_path / "z.tif", plane=3), stack[3])


def test_pages_written_one_at_a_time_are_pages_not_their_first(tmp_path):
    """A TIFF whose pages were appended one by one (a series per page, no stack metadata) asks
    for plane=K like any stack, instead of being read as its first page."""
    stack = RNG.integers(0, 255, (3, 12, 14), dtype=np.uint8)
    for page in stack:
        tifffile.imwrite(tmp_path / "pages.tif", page, append=True)
    with pytest.raises(ImageReadError, match=r"pages.tif: 3 pages .*plane=K \(0..2\)"):
        read_image(tmp_path / "pages.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif", plane=1), stack[1])
    # a file of one page and a thumbnail of another shape is one image
    tifffile.imwrite(tmp_path / "thumb.tif", stack[0])
    tifffile.imwrite(tmp_path / "thumb.tif", stack[0, ::2, ::2], append=True)
    np.testing.assert_array_equal(read_image(tmp_path / "thumb.tif"), stack[0])


def test_a_png_named_tif_is_read_as_the_png_it_is(tmp_path):
    Image.fromarray(GREY8).save(tmp_path / "renamed.png")
    (tmp_path / "renamed.png").rename(tmp_path / "renamed.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "renamed.tif"), GREY8)
