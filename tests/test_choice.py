"""Model choice per image and the out-of-distribution warning."""

import numpy as np
import pytest

from cellrcnn.inference.choice import choose_model, ood_reasons, signal_range, training_profile


def _fluorescence(value=3000) -> np.ndarray:
    img = np.full((64, 64), 100, np.uint16)
    img[10:20, 10:20] = value
    return img


def _he() -> np.ndarray:
    img = np.zeros((64, 64, 3), np.uint8) + np.array([235, 210, 225], np.uint8)
    img[10:20, 10:20] = (80, 40, 130)
    return img


def test_stained_images_go_to_the_stained_model_when_installed():
    name, reason = choose_model(_he(), ["nuclei", "nuclei_he"])
    assert name == "nuclei_he" and "non-commercial" in reason  # its licence travels with the choice
    assert choose_model(_fluorescence(), ["nuclei", "nuclei_he"]) == ("nuclei", "fluorescence image")
    assert choose_model(_he(), ["nuclei"])[0] == "nuclei"
    with pytest.raises(ValueError, match="ckpt_path"):
        choose_model(_he(), [])
    # fluorescence saved as colour (DAPI in blue, a green marker) has a dark background: no stain
    composite = np.zeros((64, 64, 3), np.uint8)
    composite[10:20, 10:20] = (0, 40, 220)
    composite[30:40, 30:40] = (0, 200, 30)
    assert choose_model(composite, ["nuclei", "nuclei_he"]) == ("nuclei", "fluorescence image")
    # the user's polarity=bright rules stained tissue out
    assert choose_model(_he(), ["nuclei", "nuclei_he"], polarity="bright")[0] == "nuclei"


def test_ood_flags_unseen_modality_sizes_and_missing_signal():
    profile = training_profile(["fluorescence"] * 90 + ["brightfield"] * 10, np.linspace(8, 40, 200))
    assert profile["modalities"] == {"brightfield": 10, "fluorescence": 90}
    assert profile["object_diameter_px"]["p50"] == pytest.approx(24.0)
    assert ood_reasons(_fluorescence(), profile, 20.0) == []
    assert "H&E images are rare in the model's training data" in " ".join(ood_reasons(_he(), profile, 20.0))
    rare = training_profile(["fluorescence"] * 97 + ["H&E"] * 3, np.linspace(8, 40, 200))  # 3 %: still rare
    assert "(H&E 3, fluorescence 97 images)" in " ".join(ood_reasons(_he(), rare, 20.0))
    big = ood_reasons(_fluorescence(), profile, 150.0)
    assert len(big) == 1 and "diameter=" in big[0]
    field = np.tile(_fluorescence(), (4, 4))  # 256², still 51 px wide at 0.2×
    assert ood_reasons(field, profile, 150.0, factor=0.2) == []  # resized to the training size
    # an image narrower than a nucleus of the training size (as the model sees it) cannot hold one
    assert "only 64×64 px" in " ".join(ood_reasons(_fluorescence(), profile, 150.0, factor=0.2))
    assert "only 8×8 px" in ood_reasons(_fluorescence()[:8, :8], None, None)[-1]
    assert ood_reasons(_fluorescence(), profile, 5.0 / 1.6) != []
    flat = _fluorescence(value=101)
    assert signal_range(flat) < 0.01 and "no signal" in ood_reasons(flat, None, None)[0]
    # a dim 16-bit field (values 100-400, a 12-bit camera's low range) has signal all the same
    dim = np.random.default_rng(0).integers(100, 400, (64, 64)).astype(np.uint16)
    assert signal_range(dim) > 0.5 and ood_reasons(dim, None, None) == []
    assert "no signal" in ood_reasons(np.full((64, 64), 1000, np.uint16), None, None)[0]
    assert ood_reasons(_fluorescence(), {}, None) == []


def test_appearance_of_a_large_field_is_read_from_a_sample(monkeypatch):
    """A field above the sample size is judged from a strided sample: the same modality, colour
    and background as the full image, without float copies of it."""
    import cellrcnn.data.appearance as appearance

    field = np.tile(_he(), (8, 8, 1))  # 512 × 512
    monkeypatch.setattr(appearance, "APPEARANCE_SAMPLES", 1000)  # a step of 17 pixels
    assert appearance.appearance_key(field) == (512, 512, True, True)
    assert appearance.modality(field) == "H&E"
    assert appearance.modality(np.tile(_fluorescence(), (8, 8))) == "fluorescence"


def test_auto_segmenter_picks_a_model_per_image_and_reports_it(tmp_path):
    import shutil

    from cellrcnn.api import WEIGHTS_DIR, AutoSegmenter

    for name in ("nuclei", "nuclei_he"):  # two installed models (the same weights will do)
        shutil.copy(WEIGHTS_DIR / "nuclei.ckpt", tmp_path / f"{name}.ckpt")
    auto = AutoSegmenter(weights_dir=tmp_path)
    stained, fluo = auto.segment(_he()), auto.segment(_fluorescence())
    assert stained.info["model"] == "nuclei_he" and "stained" in stained.info["model_choice"]
    assert fluo.info["model"] == "nuclei" and fluo.info["model_choice"] == "fluorescence image"
    assert stained.info["checkpoint"] == str(tmp_path / "nuclei_he.ckpt")  # the file that predicted it
    assert isinstance(fluo.info["warnings"], list)
    # diameter="default" is each model's own mode: these copies of nuclei recommend range
    assert auto.default_diameter == {"nuclei": "range", "nuclei_he": "range"}
    with pytest.raises(ValueError, match="no shipped model"):
        AutoSegmenter(weights_dir=tmp_path / "empty")
