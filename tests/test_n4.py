"""N4 removes a planted bias field, and applies one field to all phases."""
import numpy as np

from data_prep import n4

SHAPE = (12, 48, 48)


def planted_case(seed: int = 0):
    """Two tissue classes inside an ellipsoid, times a smooth multiplicative field (+-35%)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    body = (x ** 2 + y ** 2 + 0.3 * z ** 2) < 0.8
    tissue = np.where(rng.random(SHAPE) < 0.3, 600.0, 1000.0) * body
    field = np.exp(0.35 * x + 0.2 * y)
    noisy = tissue * field + rng.normal(0, 5, SHAPE) + 20
    return np.clip(noisy, 0, None).astype(np.float32), body, tissue, field


def within_class_cv(volume, body, tissue):
    """Mean coefficient of variation inside each tissue class."""
    cvs = [volume[body & (tissue == level)].std() / volume[body & (tissue == level)].mean()
           for level in (600.0, 1000.0)]
    return float(np.mean(cvs))


def test_planted_field_is_removed():
    volume, body, tissue, field = planted_case()
    log_field = n4.estimate_log_field(volume, (2.5, 0.7, 0.7), shrink=2, iterations=(30, 30, 30))
    corrected = volume / np.exp(log_field)
    before = within_class_cv(volume, body, tissue)
    after = within_class_cv(corrected, body, tissue)
    assert after < 0.5 * before, (before, after)
    # the estimated field follows the planted one up to N4's free global scale
    estimated, planted = log_field[body], np.log(field)[body]
    assert np.corrcoef(estimated, planted)[0, 1] > 0.9


def test_one_field_divides_every_phase():
    volume, body, _, _ = planted_case()
    phases = np.stack([volume, volume * 1.5 + 10, volume * 2.0])
    corrected = n4.correct_phases(phases, (2.5, 0.7, 0.7), shrink=2, iterations=(10, 10))
    field = phases[0] / corrected[0]
    for c in (1, 2):
        np.testing.assert_allclose(phases[c][body] / corrected[c][body], field[body], rtol=1e-4)
    # the enhancement ratio between phases is kept where the field is shared
    np.testing.assert_allclose(corrected[2][body] / corrected[0][body], 2.0, rtol=1e-4)
