"""Bias-field correction before the z-score (``bias-correction``, :mod:`fedseg.data.bias`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_case, write_case_as

from fedseg.config import FedsegConfig
from fedseg.data import cache as C
from fedseg.data.bias import correct_bias, n4_correct
from fedseg.errors import ConfigError


def _shaded_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A brain-like ellipsoid of two tissues, its planted smooth field, and the product."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), np.linspace(-1, 1, 48), indexing="ij"
    )
    brain = x**2 + y**2 + z**2 < 0.8
    tissue = np.where(np.abs(x) < 0.3, 60.0, 100.0) * brain
    tissue = tissue * (1 + 0.02 * rng.standard_normal(tissue.shape)) * brain
    field = np.exp(0.35 * x + 0.25 * y - 0.2 * z)  # log field SD about 0.2
    return tissue.astype(np.float32), field.astype(np.float32), brain


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_n4_removes_a_planted_smooth_field_and_keeps_the_background_zero() -> None:
    tissue, field, brain = _shaded_phantom()
    shaded = np.stack([tissue * field, tissue[::-1] * field])
    out = n4_correct(shaded)
    assert out.shape == shaded.shape and out.dtype == np.float32
    assert np.all(out[:, ~brain] == 0)
    for c in range(2):
        bright = (tissue if c == 0 else tissue[::-1]) > 80  # one tissue: flat before shading
        before, after = _cv(shaded[c][bright]), _cv(out[c][bright])
        assert before > 0.15
        assert after < before / 3, (before, after)


def test_a_nearly_empty_or_already_normalised_channel_is_left_as_it_is() -> None:
    tissue, field, brain = _shaded_phantom()
    sparse = np.zeros_like(tissue)
    sparse[0, 0, :10] = 5.0
    zscored = np.where(brain, (tissue - tissue[brain].mean()) / tissue[brain].std(), 0)
    zscored = zscored.astype(np.float32)
    out = n4_correct(np.stack([tissue * field, sparse, zscored]))
    np.testing.assert_array_equal(out[1], sparse)
    np.testing.assert_array_equal(out[2], zscored)
    assert not np.allclose(out[0], tissue * field)


def test_none_is_the_identity_and_an_unknown_method_names_the_key() -> None:
    image = np.ones((4, 8, 8, 8), np.float32)
    assert correct_bias(image, (1, 1, 1), "none") is image
    with pytest.raises(ConfigError, match="'bias-correction'.*none, n4"):
        correct_bias(image, (1, 1, 1), "n3")
    with pytest.raises(ConfigError, match="'bias-correction'"):
        FedsegConfig(bias_correction="n3")
    with pytest.raises(ConfigError, match=r"\(C, X, Y, Z\)"):
        n4_correct(np.ones((8, 8, 8), np.float32))


def test_cases_are_prepared_again_with_correction_and_the_cache_says_so(tmp_path: Path) -> None:
    tissue, field, _ = _shaded_phantom()
    case = make_tiny_case("shaded_000", seed=0)
    data = tmp_path / "data"
    write_case_as(case, data, "brats2021")
    plain = FedsegConfig(image_size=16, patch_size=16, depth=3, bias_correction="none")
    n4 = plain.replace(bias_correction="n4")
    assert "bias-correction" not in C.preparation_params(plain)  # older caches stay valid
    assert C.cache_key(n4) != C.cache_key(plain)
    cache = tmp_path / "cache"
    a = C.prepare_cases(data, plain, cache_dir=cache)[0]
    b = C.prepare_cases(data, n4, cache_dir=cache)[0]
    manifest = json.loads((cache / C.cache_key(n4) / "manifest.json").read_text())
    assert manifest["bias-correction"] == "n4"
    assert a.image.shape == b.image.shape
    assert not np.allclose(np.asarray(a.image), np.asarray(b.image))
