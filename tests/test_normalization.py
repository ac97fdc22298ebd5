"""Tests of data_prep.normalization against direct numpy transcriptions of each formula."""
from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest

from data_prep import normalization as norm

EXPECTED_NAMES = {
    "per_channel_clip_q98", "per_channel_clip_q95", "global_clip_q99", "per_slice_minmax",
    "global_minmax", "zscore", "nyul",
}
PER_PHASE = ["per_channel_clip_q98", "per_channel_clip_q95", "per_slice_minmax", "zscore"]
GLOBAL = ["global_clip_q99", "global_minmax"]
NYUL_P = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]


def make_case(seed: int, shape=(4, 8, 8), scale: float = 400.0, shape_k: float = 2.0,
              artefact: float = 30000.0) -> np.ndarray:
    """Gamma-distributed tissue, enhancing from pre to late, with two planted bright voxels."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(shape_k, scale, size=shape)
    gain = np.array([1.0, 1.6, 1.9])[:, None, None, None]
    phases = base[None] * gain + rng.normal(0.0, 0.05 * scale, size=(3, *shape))
    phases = np.abs(phases)
    phases[1, 1, 2, 3] = artefact
    phases[2, 3, 5, 6] = artefact * 1.2
    return phases.astype(np.float32)


def direct_u8(x: np.ndarray, lo, hi) -> np.ndarray:
    """The mapping written out for test data where hi > lo everywhere."""
    return np.rint(255 * np.clip((x - lo) / (hi - lo), 0, 1)).astype(np.uint8)


def ref_per_channel(phases: np.ndarray, q: float) -> np.ndarray:
    out = np.empty(phases.shape, dtype=np.uint8)
    for c in range(3):
        xc = phases[c].astype(np.float64)
        out[c] = direct_u8(xc, xc.min(), np.percentile(xc, q))
    return out


def ref_global_clip_q99(phases: np.ndarray, params=None) -> np.ndarray:
    x = phases.astype(np.float64)
    return direct_u8(x, x.min(), np.percentile(x.ravel(), 99))


def ref_per_slice_minmax(phases: np.ndarray, params=None) -> np.ndarray:
    out = np.empty(phases.shape, dtype=np.uint8)
    for c in range(phases.shape[0]):
        for z in range(phases.shape[1]):
            s = phases[c, z].astype(np.float64)
            out[c, z] = direct_u8(s, s.min(), s.max())
    return out


def ref_global_minmax(phases: np.ndarray, params=None) -> np.ndarray:
    x = phases.astype(np.float64)
    return direct_u8(x, x.min(), x.max())


def ref_zscore(phases: np.ndarray, params=None) -> np.ndarray:
    out = np.empty(phases.shape, dtype=np.uint8)
    for c in range(3):
        xc = phases[c].astype(np.float64)
        out[c] = direct_u8((xc - xc.mean()) / xc.std(), -3, 3)
    return out


def ref_nyul_landmarks(phases: np.ndarray) -> np.ndarray:
    return np.array([np.percentile(phases[c].astype(np.float64), NYUL_P) for c in range(3)])


def ref_nyul_standard(cases: list[np.ndarray]) -> np.ndarray:
    scaled = []
    for phases in cases:
        lm = ref_nyul_landmarks(phases)
        scaled.append(100 * (lm - lm[:, :1]) / (lm[:, -1:] - lm[:, :1]))
    return np.mean(scaled, axis=0)


def ref_nyul(phases: np.ndarray, params) -> np.ndarray:
    standard = np.array(params["standard_landmarks"])
    out = np.empty(phases.shape, dtype=np.uint8)
    for c in range(3):
        xc = phases[c].astype(np.float64)
        lm = np.percentile(xc, NYUL_P)
        assert np.all(np.diff(lm) > 1e-3), "test data must have distinct landmarks"
        s = standard[c]
        y = np.interp(xc, lm, s)
        low = s[0] + (xc - lm[0]) * ((s[1] - s[0]) / (lm[1] - lm[0]))
        high = s[-1] + (xc - lm[-1]) * ((s[-1] - s[-2]) / (lm[-1] - lm[-2]))
        y = np.where(xc < lm[0], low, np.where(xc > lm[-1], high, y))
        out[c] = direct_u8(y, 0, 100)
    return out


REFERENCES = {
    "per_channel_clip_q98": lambda p, params=None: ref_per_channel(p, 98),
    "per_channel_clip_q95": lambda p, params=None: ref_per_channel(p, 95),
    "global_clip_q99": ref_global_clip_q99,
    "per_slice_minmax": ref_per_slice_minmax,
    "global_minmax": ref_global_minmax,
    "zscore": ref_zscore,
    "nyul": ref_nyul,
}


@pytest.fixture(scope="module")
def training_cases() -> list[np.ndarray]:
    return [make_case(10 + i, scale=200.0 * (i + 1), shape_k=1.5 + i) for i in range(3)]


@pytest.fixture(scope="module")
def nyul_params(training_cases) -> dict:
    strategy = norm.get("nyul")
    return strategy.fit([strategy.summarize(p) for p in training_cases])


def params_for(name: str, nyul_params: dict) -> dict | None:
    return nyul_params if norm.get(name).needs_fit else None


@pytest.fixture
def strict_numpy():
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_registry_lists_the_seven_strategies():
    assert EXPECTED_NAMES <= set(norm.names())
    assert norm.names() == list(norm.STRATEGIES)
    for name in norm.names():
        assert norm.get(name).name == name


def test_every_registered_strategy_has_a_reference_here():
    assert set(norm.names()) <= set(REFERENCES)


def test_get_rejects_unknown_name_listing_valid_names():
    with pytest.raises(ValueError) as info:
        norm.get("per_channel_clip_q97")
    for name in norm.names():
        assert name in str(info.value)


def test_needs_fit_flags():
    assert {n for n in norm.names() if norm.get(n).needs_fit} >= {"nyul"}
    assert not any(norm.get(n).needs_fit for n in PER_PHASE + GLOBAL)


def test_strategy_requires_summarize_and_fit_together():
    with pytest.raises(ValueError):
        norm.Strategy("half", norm.zscore, summarize=norm.nyul_summarize)


def test_to_uint8_matches_formula_and_broadcasts():
    x = np.array([[-5.0, 0.0, 2.5, 5.0, 10.0, 12.0]] * 2)
    lo = np.array([[0.0], [1.0]])
    hi = np.array([[10.0], [1.0]])
    out = norm.to_uint8(x, lo, hi)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [0, 0, 64, 128, 255, 255])
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_array_equal(norm.to_uint8(x, 3.0, 2.0), 0)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_output_dtype_shape_and_input_untouched(name, nyul_params):
    phases = make_case(1)
    before = phases.copy()
    out = norm.get(name).apply(phases, params_for(name, nyul_params))
    assert out.dtype == np.uint8
    assert out.shape == phases.shape
    np.testing.assert_array_equal(phases, before)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_matches_direct_numpy_computation(name, seed, nyul_params):
    phases = make_case(seed, scale=100.0 * seed)
    params = params_for(name, nyul_params)
    np.testing.assert_array_equal(norm.get(name).apply(phases, params),
                                  REFERENCES[name](phases, params))


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_constant_slice_gives_no_nan_or_warning(name, nyul_params, strict_numpy):
    phases = make_case(4)
    phases[:, 2] = 0.0
    out = norm.get(name).apply(phases, params_for(name, nyul_params))
    assert out.dtype == np.uint8
    if name == "per_slice_minmax":
        np.testing.assert_array_equal(out[:, 2], 0)


@pytest.mark.parametrize("name", PER_PHASE + ["nyul"])
def test_constant_phase_gives_zeros(name, nyul_params, strict_numpy):
    phases = make_case(5)
    phases[0] = 7.0
    out = norm.get(name).apply(phases, params_for(name, nyul_params))
    np.testing.assert_array_equal(out[0], 0)
    assert out[1].max() > 0


def proportional_phases() -> np.ndarray:
    """Late = 2 x pre and early = 1.5 x pre, exactly: every voxel enhances."""
    pre = make_case(6)[0]
    return np.stack([pre, 1.5 * pre, 2.0 * pre]).astype(np.float32)


@pytest.mark.parametrize("name", GLOBAL)
def test_global_strategies_keep_enhancement(name):
    out = norm.get(name).apply(proportional_phases(), None).astype(int)
    assert np.all(out[2] >= out[1]) and np.all(out[1] >= out[0])
    assert np.mean(out[2] > out[0]) > 0.5


@pytest.mark.parametrize("name", PER_PHASE)
def test_per_phase_strategies_remove_enhancement(name):
    out = norm.get(name).apply(proportional_phases(), None)
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[0], out[1])


def tissue_grey_levels(out: np.ndarray, tissue: np.ndarray) -> int:
    return len(np.unique(out[tissue]))


def test_bright_artefact_ruins_global_minmax_but_not_clip_q98():
    phases = make_case(7, shape=(4, 16, 16), artefact=1.0e6)
    tissue = phases < 1.0e5
    ruined = norm.get("global_minmax").apply(phases, None)
    kept = norm.get("per_channel_clip_q98").apply(phases, None)
    assert ruined[tissue].max() <= 8
    assert tissue_grey_levels(ruined, tissue) <= 9
    assert tissue_grey_levels(kept, tissue) >= 150
    assert kept[tissue].std() > 40


def test_nyul_summary_shape_and_picklable():
    summary = norm.get("nyul").summarize(make_case(8))
    assert np.asarray(summary).shape == (3, 11)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(summary)), summary)
    np.testing.assert_allclose(summary, ref_nyul_landmarks(make_case(8)), rtol=0, atol=0)


def test_nyul_fit_matches_direct_standard_landmarks(training_cases, nyul_params):
    assert nyul_params["percentiles"] == NYUL_P
    standard = np.array(nyul_params["standard_landmarks"])
    assert standard.shape == (3, 11)
    np.testing.assert_allclose(standard, ref_nyul_standard(training_cases), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(standard[:, 0], 0, atol=1e-12)
    np.testing.assert_allclose(standard[:, -1], 100, atol=1e-12)


def test_nyul_params_json_round_trip(nyul_params):
    restored = json.loads(json.dumps(nyul_params))
    assert restored == nyul_params
    phases = make_case(9)
    np.testing.assert_array_equal(norm.nyul(phases, restored), norm.nyul(phases, nyul_params))


def test_nyul_fit_uses_only_the_summaries_given():
    summaries = [
        np.tile(np.array([10.0, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]), (3, 1)),
        np.tile(np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20]), (3, 1)),
    ]
    second = np.array([0.0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 100])
    expected = (np.linspace(0, 100, 11) + second) / 2
    params = norm.nyul_fit(summaries)
    np.testing.assert_allclose(params["standard_landmarks"], np.tile(expected, (3, 1)), atol=1e-12)
    assert norm.nyul_fit([s.tolist() for s in summaries]) == params
    assert norm.nyul_fit(summaries[:1]) != params


def test_nyul_fit_is_unaffected_by_cases_outside_the_summaries(training_cases, nyul_params):
    strategy = norm.get("nyul")
    held_out = make_case(99, scale=5000.0, shape_k=0.5)
    strategy.apply(held_out, nyul_params)
    assert strategy.fit([strategy.summarize(p) for p in training_cases]) == nyul_params
    assert strategy.fit([strategy.summarize(p) for p in [*training_cases, held_out]]) != nyul_params


def test_nyul_landmarks_land_on_standard_scale():
    strategy = norm.get("nyul")
    big = dict(shape=(8, 32, 32))
    cases = [make_case(20 + i, scale=150.0 * (i + 1), shape_k=1.0 + i, **big) for i in range(3)]
    params = strategy.fit([strategy.summarize(p) for p in cases])
    target = 255 * np.array(params["standard_landmarks"]) / 100
    held_out = make_case(30, scale=900.0, shape_k=3.0, **big)
    for phases in [*cases, held_out]:
        out = strategy.apply(phases, params)
        for c in range(3):
            landmarks = np.percentile(out[c].astype(np.float64), NYUL_P)
            np.testing.assert_allclose(landmarks, target[c], rtol=0, atol=1.0)


def test_nyul_without_params_raises():
    with pytest.raises(ValueError, match="nyul.*params"):
        norm.get("nyul").apply(make_case(1), None)


@pytest.mark.parametrize("params", [
    {},
    {"percentiles": NYUL_P},
    {"percentiles": NYUL_P, "standard_landmarks": [[0.0] * 11] * 2},
    {"percentiles": NYUL_P[::-1], "standard_landmarks": [[0.0] * 11] * 3},
])
def test_nyul_rejects_malformed_params(params):
    with pytest.raises(ValueError):
        norm.get("nyul").apply(make_case(1), params)


def test_nyul_fit_rejects_bad_summaries():
    with pytest.raises(ValueError):
        norm.nyul_fit([])
    with pytest.raises(ValueError):
        norm.nyul_fit([np.zeros((3, 5))])
    with pytest.raises(ValueError):
        norm.nyul_fit([np.ones((3, 11))])


def test_nyul_fit_skips_cases_without_contrast_in_a_phase():
    good = np.tile(np.linspace(0.0, 100.0, 11), (3, 1))
    flat = good.copy()
    flat[1] = 5.0
    params = norm.nyul_fit([good, flat])
    np.testing.assert_allclose(params["standard_landmarks"], good, atol=1e-12)


def test_nyul_flat_histogram_stretch(nyul_params, strict_numpy):
    phases = make_case(11)
    phases[:, :2] = 0.0  # half the voxels zero: landmarks p1..p40 coincide
    out = norm.nyul(phases, nyul_params)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :2], 0)
    assert out[:, 2:].max() > 0


def test_markdown_table_lists_every_strategy():
    table = norm.markdown_table()
    lines = table.splitlines()
    assert lines[0].replace(" ", "") == "|name|formula|scope|"
    assert len(lines) == 2 + len(norm.names())
    for name in norm.names():
        assert f"`{name}`" in table
        assert norm.get(name).formula
