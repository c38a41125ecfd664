"""The one split rule shared by converters, benchmarks and the data module."""

import pytest

from cellrcnn.data.converters.common import ImageResult, choose_split
from cellrcnn.data.splits import assign_split, hash_unit, split_by_hash, split_salt

KEYS = [f"{i:064x}" for i in range(0, 3000 * 7919, 7919)]  # DSB-like hexadecimal ImageIds


def test_dsb_test_split_is_the_benchmark_held_out_split():
    """80/10/10 with the dsb2018 salt puts in ``test`` exactly the 10 % the 90/10 benchmark split held out."""
    held_out = set(split_by_hash(KEYS, (0.9, 0.1), salt="dsb2018")[1])
    test = {k for k in KEYS if assign_split(k, (0.8, 0.1, 0.1), split_salt("bbbc038")) == "test"}
    assert test == held_out and 200 < len(test) < 400


def test_converter_split_follows_the_rule_with_the_source_salt():
    res = ImageResult(key="img_007")
    assert choose_split(res, (0.8, 0.1, 0.1), salt="cho") == assign_split("img_007", (0.8, 0.1, 0.1), "cho")
    shares = [sum(assign_split(k, (0.8, 0.1, 0.1), "x") == s for k in KEYS) / len(KEYS) for s in ("train", "val", "test")]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.03)


def test_split_depends_on_key_and_salt_only():
    assert hash_unit("a", "s") == hash_unit("a", "s") != hash_unit("a", "t")
    assert split_by_hash(KEYS[::-1], (0.9, 0.1), "s")[1] == split_by_hash(KEYS, (0.9, 0.1), "s")[1][::-1]
    with pytest.raises(ValueError, match="fractions"):
        assign_split("a", (0, 0, 0))
