"""Training augmentation on the device (JAX, inside the train step); the options are in
`her2jax.data.augment_options`.

The same steps run either on the host in tf.data (`her2jax.data.augment_host`, the default,
`input.augment_on='host'`) or on the accelerator inside the jitted train step (this module,
`input.augment_on='device'`: the host then only decodes and batches, about 3x the images per
second per CPU core, benchmarks/RESULTS.md). In order, on x = the uint8 image as float32:

1. random resized crop: a box of area fraction within `scale` and aspect ratio w / h ~ U(ratio)
   (TensorFlow's sample_distorted_bounding_box rule, see `crop_box`) at a uniform position (the
   first of 10 attempts that fits, else the whole image), resized back to H x W bilinearly
   (half-pixel centres, the box's edge pixels repeated);
2. rotation by a ~ U(-rotate_degrees, rotate_degrees) about c = ((W - 1) / 2, (H - 1) / 2):
   output pixel p samples the input at R(a) (p - c) + c bilinearly, zeros outside;
3. horizontal flip with probability `flip`;
4. intensity: contrast k ~ U(1 - j, 1 + j), brightness b ~ U(-j, j) * 255, one pair per image:
   y = clip((x - mean(x)) k + mean(x) + b, 0, 255), mean over the whole image (all channels):
   the shared offset b and the pull towards the mean change the ratios between the phases;

then rounded (half to even) and clipped to uint8. Given the same draws, the two forms compute the
same image up to float rounding (tests/test_augmentation.py checks it against TensorFlow's ops);
the draws themselves come from different generators (TensorFlow's stateless ops there, JAX's
threefry here, both keyed by the example's (seed, position) pair), so host and device runs see
differently augmented, equally distributed, images.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from her2jax.data.augment_options import CROP_ATTEMPTS, Augment


def augment_batch(images: jax.Array, seeds: jax.Array, augment: Augment,
                  magnitudes: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """uint8 (N, H, W, C) images, each augmented with its uint32 (2,) seed pair; uint8 again.

    Traceable (runs inside the jitted train step) and per example, so a batch sharded over
    devices is augmented where it lies. `magnitudes` (`Augment.magnitudes()`'s keys, traced
    values) replace `augment`'s, which still says which steps run: the members of a pack differ
    in them."""
    if not augment.active:
        return images

    def one(image: jax.Array, seed: jax.Array) -> jax.Array:
        draws = draw(jax.random.wrap_key_data(seed.astype(jnp.uint32), impl="threefry2x32"),
                     augment, image.shape[0], image.shape[1], magnitudes)
        return apply_draws(image, draws, augment)

    return jax.vmap(one)(images, seeds)


def draw(key: jax.Array, augment: Augment, height: int, width: int,
         magnitudes: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """The random parameters of one image: crop box (top, left, box height, box width; the whole
    image without a crop), rotation angle (radians), flip, contrast and brightness (with
    `magnitudes` in place of `augment`'s where given)."""
    magnitudes = {**augment.magnitudes(), **(magnitudes or {})}
    crop_key, rotate_key, flip_key, intensity_key = jax.random.split(key, 4)
    if augment.crop_scale:
        box = crop_box(crop_key, height, width, augment.crop_scale, augment.crop_ratio)
    else:
        box = jnp.asarray([0, 0, height, width], jnp.int32)
    limit = magnitudes.get("rotate_radians", 0.0)
    angle = jax.random.uniform(rotate_key, (), jnp.float32, -limit, limit)
    flip = jax.random.uniform(flip_key, ()) < magnitudes.get("flip", 0.0)
    jitter = magnitudes.get("intensity_jitter", 0.0)
    contrast, brightness = jax.random.uniform(intensity_key, (2,), jnp.float32, -jitter, jitter)
    return {"box": box, "angle": angle, "flip": flip, "contrast": 1.0 + contrast,
            "brightness": 255.0 * brightness}


def crop_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> jax.Array:
    """int32 [top, left, box height, box width], by the rule of TensorFlow's
    sample_distorted_bounding_box (the host form's): aspect ratio a = w / h ~ U(ratio); box
    height uniform over the integers between the heights that give the area bounds scale x H x W
    at that ratio (capped where the width would not fit); w = round(h a), one unit of rounding
    repaired; the first of CROP_ATTEMPTS draws whose area is within the bounds, else the whole
    image. The offset is uniform over every position that fits (TensorFlow's stops one pixel
    short of the last)."""
    aspect_key, height_key, top_key, left_key = jax.random.split(key, 4)
    min_area, max_area = scale[0] * height * width, scale[1] * height * width
    aspect = jax.random.uniform(aspect_key, (CROP_ATTEMPTS,), jnp.float32, *ratio)
    low = jnp.round(jnp.sqrt(min_area / aspect))
    high = jnp.round(jnp.sqrt(max_area / aspect))
    too_wide = jnp.round(high * aspect) > width
    high = jnp.where(too_wide, jnp.floor((width + 0.5 - 1e-7) / aspect), high)
    high = jnp.where(jnp.round(high * aspect) > width, high - 1, high)
    high = jnp.minimum(high, height)
    low = jnp.minimum(low, high)
    box_height = jnp.floor(low + jax.random.uniform(height_key, (CROP_ATTEMPTS,))
                           * (high - low + 1))
    box_height = jnp.minimum(box_height, high)   # uniform(...) < 1, but float rounding
    box_width = jnp.round(box_height * aspect)
    small = box_width * box_height < min_area
    box_height = jnp.where(small, box_height + 1, box_height)
    box_width = jnp.where(small, jnp.round(box_height * aspect), box_width)
    large = box_width * box_height > max_area
    box_height = jnp.where(large, box_height - 1, box_height)
    box_width = jnp.where(large, jnp.round(box_height * aspect), box_width)
    area = box_width * box_height
    fits = ((area >= min_area) & (area <= max_area) & (box_width >= 1) & (box_height >= 1)
            & (box_width <= width) & (box_height <= height))
    first = jnp.argmax(fits)
    box_height = jnp.where(fits[first], box_height[first], height).astype(jnp.int32)
    box_width = jnp.where(fits[first], box_width[first], width).astype(jnp.int32)
    top = jax.random.randint(top_key, (), 0, height - box_height + 1)
    left = jax.random.randint(left_key, (), 0, width - box_width + 1)
    return jnp.stack([top, left, box_height, box_width]).astype(jnp.int32)


def apply_draws(image: jax.Array, draws: Mapping[str, jax.Array], augment: Augment) -> jax.Array:
    """One uint8 (H, W, C) image through the steps `augment` turns on, with the given draws."""
    x = image.astype(jnp.float32)
    if augment.crop_scale:
        x = resized_crop(x, draws["box"])
    if augment.rotate_degrees:
        x = rotate(x, draws["angle"])
    if augment.flip:
        x = jnp.where(draws["flip"], x[:, ::-1], x)
    if augment.intensity_jitter:
        x = adjust_intensity(x, draws["contrast"], draws["brightness"])
    return to_uint8(x)


def _bilinear(x: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
    """x (H, W, C) sampled at float (H', W') coordinates, bilinearly; neighbours outside x read
    0."""
    height, width = x.shape[:2]
    row0, column0 = jnp.floor(rows), jnp.floor(columns)
    row_weight, column_weight = (rows - row0)[..., None], (columns - column0)[..., None]
    row0, column0 = row0.astype(jnp.int32), column0.astype(jnp.int32)

    def read(r: jax.Array, c: jax.Array) -> jax.Array:
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        value = x[jnp.clip(r, 0, height - 1), jnp.clip(c, 0, width - 1)]
        return jnp.where(inside[..., None], value, 0.0)

    top = ((1 - column_weight) * read(row0, column0)
           + column_weight * read(row0, column0 + 1))
    bottom = ((1 - column_weight) * read(row0 + 1, column0)
              + column_weight * read(row0 + 1, column0 + 1))
    return (1 - row_weight) * top + row_weight * bottom


def resized_crop(x: jax.Array, box: jax.Array) -> jax.Array:
    """The box [top, left, height, width] of x (H, W, C) resized to H x W bilinearly, as
    TensorFlow's resize (half-pixel centres; coordinates clamped to the box)."""
    height, width = x.shape[:2]
    top, left, box_height, box_width = (box[i].astype(jnp.float32) for i in range(4))
    rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) * (box_height / height) - 0.5
    columns = (jnp.arange(width, dtype=jnp.float32) + 0.5) * (box_width / width) - 0.5
    rows = top + jnp.clip(rows, 0.0, box_height - 1)
    columns = left + jnp.clip(columns, 0.0, box_width - 1)
    grid_rows, grid_columns = jnp.meshgrid(rows, columns, indexing="ij")
    return _bilinear(x, grid_rows, grid_columns)


def rotate(x: jax.Array, angle: jax.Array | float) -> jax.Array:
    """x (H, W, C) rotated by `angle` radians about its centre; bilinear, zeros outside (as
    TensorFlow's ImageProjectiveTransformV3 with constant fill)."""
    height, width = x.shape[:2]
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows, columns = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                                 jnp.arange(width, dtype=jnp.float32), indexing="ij")
    source_columns = cos * (columns - cx) - sin * (rows - cy) + cx
    source_rows = sin * (columns - cx) + cos * (rows - cy) + cy
    return _bilinear(x, source_rows, source_columns)


def adjust_intensity(x: jax.Array, contrast: jax.Array | float,
                     brightness: jax.Array | float) -> jax.Array:
    """(x - mean(x)) * contrast + mean(x) + brightness, clipped to [0, 255]."""
    mean = jnp.mean(x)
    return jnp.clip((x - mean) * contrast + mean + brightness, 0.0, 255.0)


def to_uint8(x: jax.Array) -> jax.Array:
    """Rounded (half to even) and clipped to [0, 255] before the cast, so nothing wraps."""
    return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)
