"""On-device augmentation (her2jax.data.augment): each step against TensorFlow's ops with the same
draws (the host form's reference), the draws' ranges and rates, determinism per seed, and the
train step that applies it."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from her2jax.data import augment as augmentation
from her2jax.data import augment_options
from her2jax.data.augment_options import Augment

tf = pytest.importorskip("tensorflow")
from her2jax.data import augment_host as host  # noqa: E402  (TensorFlow first)

FULL = Augment.from_mapping(augment_options.DEFAULT_AUGMENT)


def image(height: int = 24, width: int = 20, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: bilinear differences show, uint8 ties are rare."""
    rng = np.random.default_rng(seed)
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    base = 8.0 * rows[..., None] + 5.0 * columns[..., None] + np.array([0.0, 40.0, 80.0])
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("box", [(0, 0, 24, 20), (3, 2, 17, 15), (10, 7, 5, 9), (0, 19, 24, 1)])
def test_resized_crop_matches_tensorflow(box):
    x = image().astype(np.float32)
    top, left, height, width = box
    want = tf.image.resize(tf.slice(x, [top, left, 0], [height, width, 3]), [24, 20],
                           method="bilinear").numpy()
    got = np.asarray(augmentation.resized_crop(jnp.asarray(x), jnp.asarray(box)))
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("angle", [0.0, 0.1, -0.17, math.pi / 2, 2.5])
def test_rotation_matches_tensorflow(angle):
    x = image().astype(np.float32)
    want = host.rotate(tf.constant(x), angle).numpy()
    got = np.asarray(augmentation.rotate(jnp.asarray(x), angle))
    np.testing.assert_allclose(got, want, atol=1e-3)
    if angle == math.pi / 2:   # on a square image, a quarter turn is a rot90, exactly
        square = image(16, 16).astype(np.float32)
        np.testing.assert_allclose(np.asarray(augmentation.rotate(jnp.asarray(square), angle)),
                                   np.rot90(square, 1), atol=1e-3)


def test_intensity_and_rounding_match_tensorflow():
    x = image().astype(np.float32) + 0.5   # exact halves: both round half to even
    for contrast, brightness in [(1.0, 0.0), (1.09, -20.0), (0.91, 25.5)]:
        want = host.to_uint8(host.adjust_intensity(tf.constant(x), contrast, brightness))
        got = augmentation.to_uint8(augmentation.adjust_intensity(jnp.asarray(x), contrast,
                                                                  brightness))
        np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_all_steps_with_the_same_draws_match_the_host_steps():
    """apply_draws against host.* composed the same way with the same parameters: uint8 within 1
    (float rounding at .5), almost all pixels equal."""
    x = image()
    for seed in range(4):
        draws = augmentation.draw(jax.random.key(seed), FULL, 24, 20)
        got = np.asarray(augmentation.apply_draws(jnp.asarray(x), draws, FULL))
        top, left, height, width = (int(v) for v in draws["box"])
        y = tf.image.resize(tf.slice(tf.cast(x, tf.float32), [top, left, 0], [height, width, 3]),
                            [24, 20], method="bilinear")
        y = host.rotate(y, float(draws["angle"]))
        if bool(draws["flip"]):
            y = tf.reverse(y, axis=[1])
        y = host.to_uint8(host.adjust_intensity(y, float(draws["contrast"]),
                                                float(draws["brightness"]))).numpy()
        difference = np.abs(got.astype(int) - y.astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.99, seed


def test_draws_stay_in_their_ranges_at_their_rates():
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.jit(jax.vmap(lambda k: augmentation.draw(k, FULL, 224, 224)))(keys)
    top, left, height, width = (np.asarray(draws["box"][:, i]) for i in range(4))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 224).all() and (left + width <= 224).all()
    area = height * width / 224**2
    assert area.min() >= 0.7 and area.max() <= 1.0
    aspect = width / height
    assert aspect.min() > 0.74 and aspect.max() < 1.34 and (aspect < 1).any() and (aspect > 1).any()
    angle = np.degrees(np.asarray(draws["angle"]))
    assert angle.min() >= -10 and angle.max() <= 10 and angle.std() > 5
    assert 0.45 < np.asarray(draws["flip"]).mean() < 0.55
    contrast, brightness = np.asarray(draws["contrast"]), np.asarray(draws["brightness"])
    assert contrast.min() >= 0.9 and contrast.max() <= 1.1
    assert brightness.min() >= -25.5 and brightness.max() <= 25.5


@pytest.mark.parametrize("scale, ratio", [((0.7, 1.0), (3 / 4, 4 / 3)), ((0.1, 0.5), (0.5, 2.0))])
def test_crop_boxes_follow_the_host_distribution(scale, ratio):
    """The device's boxes against TensorFlow's sampler (the host form) over 1500 draws each:
    area, aspect ratio and offsets agree in their quartiles (the offsets within a pixel or two:
    TensorFlow never places a box on the last row or column)."""
    height, width = 64, 48
    device = np.asarray(jax.jit(jax.vmap(
        lambda k: augmentation.crop_box(k, height, width, scale, ratio)))(
        jax.random.split(jax.random.key(3), 1500)))
    boxes = []
    for seed in range(1500):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=[seed, 11], min_object_covered=0.0, aspect_ratio_range=ratio,
            area_range=scale, max_attempts=augment_options.CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True)
        boxes.append([int(begin[0]), int(begin[1]), int(size[0]), int(size[1])])
    host_boxes = np.asarray(boxes)

    def summary(b):
        return {"area": b[:, 2] * b[:, 3] / (height * width), "aspect": b[:, 3] / b[:, 2],
                "top": b[:, 0], "left": b[:, 1]}

    quartiles = [0.25, 0.5, 0.75]
    for name, tolerance in [("area", 0.03), ("aspect", 0.05), ("top", 2.0), ("left", 2.0)]:
        ours = np.quantile(summary(device)[name], quartiles)
        theirs = np.quantile(summary(host_boxes)[name], quartiles)
        np.testing.assert_allclose(ours, theirs, atol=tolerance, err_msg=name)


def test_a_box_that_cannot_fit_falls_back_to_the_whole_image():
    """Aspect ratios no box of the asked area can have in a 4 x 40 image: every attempt fails."""
    boxes = jax.jit(jax.vmap(lambda k: augmentation.crop_box(k, 4, 40, (0.9, 1.0), (0.1, 0.2))))(
        jax.random.split(jax.random.key(1), 50))
    np.testing.assert_array_equal(np.asarray(boxes), np.tile([0, 0, 4, 40], (50, 1)))


def test_batch_augmentation_is_per_example_and_deterministic():
    images = jnp.asarray(np.stack([image(seed=i) for i in range(4)]))
    seeds = jnp.asarray([[7, 0], [7, 1], [7, 2], [7, 0]], jnp.uint32)
    augment = jax.jit(augmentation.augment_batch, static_argnums=2)
    first = np.asarray(augment(images, seeds, FULL))
    again = np.asarray(augment(images, seeds, FULL))
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.uint8 and first.shape == images.shape
    # the seed decides, not the slot: image 0 drawn with seed 3's pair, alone, is first[0]
    one = np.asarray(augment(images[:1], seeds[3:], FULL))
    np.testing.assert_array_equal(one[0], first[0])
    assert not np.array_equal(first[0], np.asarray(images[0]))
    off = augmentation.augment_batch(images, seeds, Augment())
    assert off is images   # nothing to do: the batch as it came


def test_augment_on_is_checked():
    augment_options.check_augment_on("device")
    with pytest.raises(ValueError, match="augment_on 'gpu'"):
        augment_options.check_augment_on("gpu")
