"""Training augmentation of one uint8 (H, W, 3) image, on the host in tf.data (the default,
`input.augment_on='host'`; `her2jax.data.augment` has the options and the on-device form).

Every random draw is stateless, from a seed pair given per example, so an example's augmentation
depends only on (training seed, its position in the stream). The steps, in order (x is the image
as float32 in [0, 255], each step optional):

1. random resized crop: tf.image.stateless_sample_distorted_bounding_box with area_range `scale`
   and aspect_ratio_range `ratio`: aspect ratio r = w / h ~ U(ratio), box height uniform over
   the integers between the heights that give the area bounds at that ratio, at a uniform
   position (up to 10 attempts, else the whole image); resized back to H x W bilinearly;
2. rotation: angle a ~ U(-rotate_degrees, rotate_degrees) about the image centre
   c = ((W - 1) / 2, (H - 1) / 2): output pixel p samples the input at R(a) (p - c) + c,
   bilinearly, zeros outside;
3. horizontal flip with probability `flip`;
4. intensity jitter j: contrast k ~ U(1 - j, 1 + j) and brightness b ~ U(-j, j) * 255, one pair per
   image for all three channels: y = (x - mean(x)) * k + mean(x) + b, mean over the whole
   image. The channels' differences scale by k together (the enhancement pattern's shape
   stays), but the shared offset b, and the pull towards the image mean when k != 1, change
   the ratios between the phases (early / pre, the relative enhancement);

then y is rounded and clipped to uint8 [0, 255].
"""
from __future__ import annotations

import math

from her2jax.data.augment_options import CROP_ATTEMPTS, Augment
from her2jax.data.tensorflow_host import tf


def apply(augment: Augment, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """`image` (uint8 H x W x 3) augmented with the stateless seed pair `seed`; uint8 again."""
    if not augment.active:
        return image
    crop_seed, rotate_seed, flip_seed, intensity_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    x = tf.cast(image, tf.float32)
    if augment.crop_scale:
        x = random_resized_crop(x, crop_seed, augment.crop_scale, augment.crop_ratio)
    if augment.rotate_degrees:
        limit = math.radians(augment.rotate_degrees)
        x = rotate(x, tf.random.stateless_uniform([], rotate_seed, -limit, limit))
    if augment.flip:
        flipped = tf.random.stateless_uniform([], flip_seed) < augment.flip
        x = tf.cond(flipped, lambda: tf.reverse(x, axis=[1]), lambda: x)
    if augment.intensity_jitter:
        j = augment.intensity_jitter
        contrast, brightness = tf.unstack(
            tf.random.stateless_uniform([2], intensity_seed, -j, j))
        x = adjust_intensity(x, 1.0 + contrast, 255.0 * brightness)
    return to_uint8(x)


def random_resized_crop(x: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tf.Tensor:
    """A random box of area fraction in `scale` and aspect ratio in `ratio`, resized back to the
    input's size (bilinear); float32 in and out."""
    shape = tf.shape(x)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=CROP_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(x, begin, size)
    return tf.image.resize(crop, shape[:2], method="bilinear")


def rotate(x: tf.Tensor, angle: tf.Tensor | float) -> tf.Tensor:
    """`x` (float32 H x W x C) rotated by `angle` radians about its centre; bilinear, zeros
    outside. On a square image, angle pi / 2 gives `np.rot90(x, 1)`."""
    height, width = tf.cast(tf.shape(x)[0], tf.float32), tf.cast(tf.shape(x)[1], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(tf.cast(angle, tf.float32)), tf.sin(tf.cast(angle, tf.float32))
    # output (x, y) reads input (cos (x-cx) - sin (y-cy) + cx, sin (x-cx) + cos (y-cy) + cy)
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                          sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def adjust_intensity(x: tf.Tensor, contrast: tf.Tensor | float,
                     brightness: tf.Tensor | float) -> tf.Tensor:
    """(x - mean(x)) * contrast + mean(x) + brightness, clipped to [0, 255]; float32."""
    mean = tf.reduce_mean(x)
    return tf.clip_by_value((x - mean) * contrast + mean + brightness, 0.0, 255.0)


def to_uint8(x: tf.Tensor) -> tf.Tensor:
    """Rounded and clipped to [0, 255] before the cast, so nothing wraps around."""
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
