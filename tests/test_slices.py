"""Tests of data_prep.slices: slice choice, tumour box, square window, cut, RGB fusion, resize."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep import slices


# ---------------------------------------------------------------------------------------------
# tumour_slices

@pytest.mark.parametrize("z_first, z_last, count, expected", [
    (3, 6, 2, [4, 5]),                       # extent 4, central 2
    (10, 19, 4, [13, 14, 15, 16]),           # extent 10, central 4
    (0, 4, 3, [1, 2, 3]),                    # extent 5, central 3
    (5, 5, 1, [5]),
])
def test_tumour_slices_central(z_first, z_last, count, expected):
    assert slices.tumour_slices(z_first, z_last, count) == expected


def test_tumour_slices_are_consecutive_inside_and_centred():
    for z_first in range(0, 6):
        for extent in range(1, 25):
            z_last = z_first + extent - 1
            for count in range(1, extent + 1):
                chosen = slices.tumour_slices(z_first, z_last, count)
                assert len(chosen) == count
                assert chosen == list(range(chosen[0], chosen[0] + count))
                assert z_first <= chosen[0] and chosen[-1] <= z_last
                # the slices left out above and below differ by at most one
                below, above = chosen[0] - z_first, z_last - chosen[-1]
                assert abs(below - above) <= 1


@pytest.mark.parametrize("count", [0, 4, 7, 100])
def test_tumour_slices_all_when_zero_or_tumour_thinner(count):
    assert slices.tumour_slices(3, 6, count) == [3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# in_plane_box

def test_in_plane_box_over_given_slices_only():
    mask = np.zeros((5, 20, 30), np.uint8)
    mask[1, 4:7, 10:15] = 1          # y 4..6, x 10..14
    mask[2, 8:12, 3:5] = 1           # y 8..11, x 3..4
    mask[4, 0:2, 25:30] = 1          # only on slice 4
    assert slices.in_plane_box(mask, [1]) == (4, 6, 10, 14)
    assert slices.in_plane_box(mask, [2]) == (8, 11, 3, 4)
    assert slices.in_plane_box(mask, [1, 2]) == (4, 11, 3, 14)
    assert slices.in_plane_box(mask, [0, 1, 2, 3, 4]) == (0, 11, 3, 29)


def test_in_plane_box_matches_numpy_on_random_masks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = (rng.random((4, 17, 23)) > 0.97).astype(np.uint8)
        mask[2, rng.integers(17), rng.integers(23)] = 1
        chosen = [1, 2]
        ys, xs = np.nonzero(mask[chosen].max(axis=0))
        assert slices.in_plane_box(mask, chosen) == (ys.min(), ys.max(), xs.min(), xs.max())


# ---------------------------------------------------------------------------------------------
# square_window

@pytest.mark.parametrize("box, margin", [
    ((14, 23, 16, 27), 0.25),        # 10 x 12 box
    ((0, 39, 5, 24), 0.1),           # 40 x 20
    ((100, 131, 50, 81), 0.0),       # 32 x 32
    ((7, 7, 9, 9), 0.25),            # a single voxel: at least 8 pixels
    ((10, 29, 10, 13), 0.5),         # 20 x 4
])
def test_square_window_side_and_centre(box, margin):
    y0, y1, x0, x1 = box
    top, left, side = slices.square_window(box, margin)
    longest = max(y1 - y0 + 1, x1 - x0 + 1)
    assert side == max(8, round(longest * (1 + 2 * margin)))
    # the window covers the box, and the space on either side differs by at most one pixel
    assert top <= y0 and y1 <= top + side - 1
    assert left <= x0 and x1 <= left + side - 1
    assert abs((y0 - top) - (top + side - 1 - y1)) <= 1
    assert abs((x0 - left) - (left + side - 1 - x1)) <= 1


def test_square_window_example():
    # 10 x 12 box at y 14..23, x 16..27; margin 0.25 -> side 18; centre (19, 22) in pixel edges
    assert slices.square_window((14, 23, 16, 27), 0.25) == (10, 13, 18)


def test_square_window_may_leave_the_image():
    top, left, side = slices.square_window((0, 9, 0, 9), 0.5)
    assert side == 20 and top == -5 and left == -5


# ---------------------------------------------------------------------------------------------
# cut

def test_cut_inside_is_a_plain_window():
    plane = np.arange(20 * 30, dtype=np.int32).reshape(20, 30)
    np.testing.assert_array_equal(slices.cut(plane, 3, 5, 7), plane[3:10, 5:12])


def test_cut_pads_with_zeros_at_every_border():
    plane = np.arange(1, 10 * 12 + 1, dtype=np.uint8).reshape(10, 12)
    out = slices.cut(plane, -2, -3, 6)
    assert out.shape == (6, 6) and out.dtype == np.uint8
    expected = np.zeros((6, 6), np.uint8)
    expected[2:, 3:] = plane[0:4, 0:3]
    np.testing.assert_array_equal(out, expected)

    out = slices.cut(plane, 7, 9, 6)          # bottom-right corner
    expected = np.zeros((6, 6), np.uint8)
    expected[:3, :3] = plane[7:10, 9:12]
    np.testing.assert_array_equal(out, expected)

    out = slices.cut(plane, -3, -3, 16)       # larger than the image on all sides
    expected = np.zeros((16, 16), np.uint8)
    expected[3:13, 3:15] = plane
    np.testing.assert_array_equal(out, expected)

    assert not slices.cut(plane, 50, 50, 5).any()  # entirely outside


def test_cut_keeps_channels():
    rgb = np.random.default_rng(0).integers(1, 256, (9, 9, 3)).astype(np.uint8)
    out = slices.cut(rgb, -1, 2, 5)
    assert out.shape == (5, 5, 3)
    assert not out[0].any()
    np.testing.assert_array_equal(out[1:], rgb[0:4, 2:7])


# ---------------------------------------------------------------------------------------------
# fuse

def test_fuse_r_pre_g_early_b_late():
    rng = np.random.default_rng(1)
    phases = rng.integers(0, 256, (3, 5, 6, 7)).astype(np.uint8)
    for z in range(5):
        rgb = slices.fuse(phases, z)
        assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[..., 0], phases[0, z])   # R = pre
        np.testing.assert_array_equal(rgb[..., 1], phases[1, z])   # G = early
        np.testing.assert_array_equal(rgb[..., 2], phases[2, z])   # B = late
    assert slices.fuse(phases, 2).flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------------------------------------
# resize

def test_resize_shape_and_dtype():
    image = np.random.default_rng(2).integers(0, 256, (30, 30, 3)).astype(np.uint8)
    out = slices.resize(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    up = slices.resize(image, 64)
    assert up.shape == (64, 64, 3)


def test_resize_same_size_is_identity_and_constant_stays_constant():
    image = np.random.default_rng(4).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    np.testing.assert_array_equal(slices.resize(image, 20), image)
    flat = np.full((24, 24, 3), 77, np.uint8)
    np.testing.assert_array_equal(slices.resize(flat, 10), np.full((10, 10, 3), 77, np.uint8))


def test_resize_keeps_channels_apart():
    image = np.zeros((20, 20, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 120, 250
    out = slices.resize(image, 13)
    np.testing.assert_array_equal(out[..., 0], 10)
    np.testing.assert_array_equal(out[..., 1], 120)
    np.testing.assert_array_equal(out[..., 2], 250)


def test_resize_smooth_ramp_stays_a_ramp():
    # bilinear (not nearest): a linear ramp keeps its mean and stays monotonic after resizing
    ramp = np.tile(np.linspace(0, 240, 40), (40, 1)).astype(np.uint8)[..., None]
    for size in (16, 25):
        out = slices.resize(ramp, size)[..., 0].astype(int)
        assert np.all(np.diff(out, axis=1) >= 0)
        assert np.all(out == out[:1])                 # rows stay identical
        assert abs(out.mean() - ramp.mean()) < 3
        assert len(np.unique(out)) > size // 2        # many grey levels, not a few blocks


def test_resize_bilinear_antialiases():
    # one-pixel stripes 0/200: halving blends them to grey, where nearest would keep 0 or 200
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[:, ::2] = 200
    out = slices.resize(stripes, 20).astype(int)
    assert 60 <= out.min() and out.max() <= 140
    nearest = slices.resize(stripes, 20, nearest=True)
    assert set(np.unique(nearest)) <= {0, 200}


@pytest.mark.parametrize("size", [7, 16, 33])
def test_resize_nearest_keeps_mask_binary(size):
    mask = np.zeros((18, 18, 1), np.uint8)
    mask[4:13, 5:11] = 1
    out = slices.resize(mask, size, nearest=True)
    assert out.shape == (size, size, 1) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1}
    # the tumour keeps roughly its share of the window
    assert abs(out.mean() - mask.mean()) < 0.08
    # bilinear would produce intermediate values on a 0/255 mask; nearest never does
    out255 = slices.resize(mask * 255, size, nearest=True)
    assert set(np.unique(out255)) <= {0, 255}


# ---------------------------------------------------------------------------------------------
# the crop: sized to the tumour, or a fixed field of view

def crop_case(tmp_path, name: str, half: int, spacing: float = 0.5):
    """A patient whose tumour is a (2 half)^2 square centred at (30, 34) on 5 slices of a
    64 x 64 plane, with in-plane spacing `spacing` mm."""
    import nibabel as nib

    from data_prep.sources import Case

    rng = np.random.default_rng(half)
    mask = np.zeros((5, 64, 64), np.uint8)
    mask[1:4, 30 - half:30 + half, 34 - half:34 + half] = 1
    paths = []
    for t in range(3):
        volume = rng.uniform(100, 600, mask.shape).astype(np.float32) + 300.0 * t * mask
        path = str(tmp_path / f"{name}_{t}.nii.gz")
        # (z, y, x) stored as (x, y, z) with the spacing in the header
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([spacing, spacing, 2.0, 1])),
                 path)
        paths.append(path)
    mask_path = str(tmp_path / f"{name}_mask.nii.gz")
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), np.diag([spacing, spacing, 2.0, 1])),
             mask_path)
    return Case(patient_id=name, label=0, cohort="c", phases=tuple(paths), mask=mask_path), mask


def test_a_fixed_field_of_view_is_cut_at_native_resolution_around_the_tumour(tmp_path):
    """20 px (= 10 mm at 0.5 mm) around the tumour centre, written at 20 px: the output mask is
    the plane's own window, voxel for voxel, in both units."""
    from data_prep import pipeline
    from data_prep.params import PrepParams

    case, mask = crop_case(tmp_path, "P", half=3)
    top, left = 30 - 10, 34 - 10
    for size in ("20px", "10mm"):
        params = PrepParams(image_size=20, crop="fixed", crop_size=size, slices_per_patient=0)
        prepared = pipeline.prepare_case(case, params)
        assert [s.slice_index for s in prepared.slices] == [1, 2, 3]
        for item in prepared.slices:
            np.testing.assert_array_equal(item.mask[..., 0],
                                          mask[item.slice_index, top:top + 20, left:left + 20])


def test_a_fixed_crop_keeps_tumour_size_where_the_tumour_crop_hides_it(tmp_path):
    """Tumours of 6 and 16 px: in the fixed field of view their areas differ as their sizes do
    ((16 / 6)^2); cropped to the tumour, they fill about the same share of the image."""
    from data_prep import pipeline
    from data_prep.params import PrepParams

    small, _ = crop_case(tmp_path, "S", half=3)
    large, _ = crop_case(tmp_path, "L", half=8)

    def share(case, **crop):
        params = PrepParams(image_size=32, slices_per_patient=1, **crop)
        return float(pipeline.prepare_case(case, params).slices[0].mask.mean())

    fixed = dict(crop="fixed", crop_size="24mm")
    assert share(large, **fixed) / share(small, **fixed) == pytest.approx((16 / 6) ** 2, rel=0.15)
    assert share(large) / share(small) == pytest.approx(1.0, abs=0.1)


def test_the_crop_is_part_of_the_dataset_name_and_record():
    from data_prep.params import PrepParams
    from her2jax.errors import InvalidSetting

    fixed = PrepParams(crop="fixed", crop_size="64mm")
    assert fixed.config_name() == "per_channel_clip_q98_fixed64mm"
    assert fixed.to_dict()["crop"] == "fixed" and fixed.to_dict()["crop_size"] == "64mm"
    assert PrepParams(crop="fixed", crop_size="96px").config_name().endswith("_fixed96px")
    # the default crop keeps the names and records datasets had before it could be chosen
    assert PrepParams().config_name() == "per_channel_clip_q98"
    assert "crop" not in PrepParams().to_dict()
    assert PrepParams.from_dict(PrepParams(image_size=16).to_dict()).crop == "tumour"
    for bad in ("64", "-3mm", "0px", "4px", "64cm"):
        with pytest.raises(InvalidSetting, match="crop_size"):
            PrepParams(crop="fixed", crop_size=bad)
    with pytest.raises(InvalidSetting, match="crop 'box'"):
        PrepParams(crop="box")
