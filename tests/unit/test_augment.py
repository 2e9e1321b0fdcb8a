"""Stored augmentations: sampling reproduces torchvision's draws, replay reproduces its pixels at any size."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import PIL.Image
import pyarrow as pa
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clipdr import augment, augparams
from clipdr.augparams import OP_NAMES, AugParams
from clipdr.records import AugmentSpec

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
OP = {name: index for index, name in enumerate(OP_NAMES)}


def noise_image(width: int = 160, height: int = 120) -> PIL.Image.Image:
    pixels_HWC = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels_HWC)


def smooth_image(width: int = 320, height: int = 240) -> PIL.Image.Image:
    """Low-frequency structure (gradients, a soft disc), so views at two sizes are comparable after a resize."""
    y_HW, x_HW = np.mgrid[0:height, 0:width].astype(np.float64)
    x_HW, y_HW = x_HW / width, y_HW / height
    disc_HW = np.exp(-(((x_HW - 0.6) ** 2 + (y_HW - 0.4) ** 2) / 0.02))
    red_HW = 255 * x_HW
    green_HW = 255 * (0.5 + 0.5 * np.sin(2 * math.pi * (x_HW + 2 * y_HW)))
    blue_HW = 255 * disc_HW
    pixels_HWC = np.stack([red_HW, green_HW, blue_HW], axis=-1).round().clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels_HWC)


def torchvision_view(image_CHW: torch.Tensor, cfg: AugmentSpec, size: int, seed: int) -> torch.Tensor:
    """torchvision's own pipeline, drawing from the global generator seeded like `augment.sample`."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, cfg.scale, cfg.ratio, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.RandAugment(cfg.num_ops, cfg.magnitude, cfg.num_magnitude_bins),
        ]
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return pipeline(image_CHW)


# --------------------------------------------------------------------------- sampling


def test_op_list_is_torchvisions():
    space = v2.RandAugment._AUGMENTATION_SPACE
    assert tuple(space) == OP_NAMES
    assert {name for name, (_, signed) in space.items() if signed} == augparams.SIGNED_OPS


def test_sampling_is_reproducible_and_keyed():
    cfg = AugmentSpec(hflip=0.5)
    first = augment.sample_views((640, 480), "shard-0/000017", 8, cfg, seed=3)
    assert first == augment.sample_views((640, 480), "shard-0/000017", 8, cfg, seed=3)
    assert first == [augment.sample((640, 480), "shard-0/000017", k, cfg, seed=3) for k in range(8)]
    assert len(set(first)) == 8  # views of one sample differ
    other_keys = [augment.sample((640, 480), f"shard-0/{i:06d}", 0, cfg, seed=3) for i in range(8)]
    assert len({first[0], *other_keys}) == 9
    assert augment.sample((640, 480), "shard-0/000017", 0, cfg, seed=4) != first[0]


def test_seed_is_a_stable_hash():
    # Pinned: a stored dataset's views are re-derivable in any process, on any machine, with any PYTHONHASHSEED.
    assert augment.derive_seed(0, "shard-0/000017", 3) == 1832056411310993713
    assert augment.derive_seed(0, "shard-0/000017", 3) != augment.derive_seed(0, "shard-0/000017", 4)
    assert 0 <= augment.derive_seed(2**40, "ü" * 100, 10**6) < 2**63


def test_sampling_does_not_touch_global_rng():
    state = torch.get_rng_state()
    augment.sample_views((64, 64), "k", 4, AugmentSpec(hflip=0.5))
    augment.replay(noise_image(), augment.sample((160, 120), "k", 0, AugmentSpec()), 32, MEAN, STD)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("image_size", [(160, 120), (120, 160), (1000, 12), (12, 1000), (37, 37)])
def test_crop_draws_match_random_resized_crop(image_size):
    # Extreme aspect ratios exhaust the 10 tries and take torchvision's centre-crop fallback.
    cfg = AugmentSpec(scale=(0.3, 1.0))
    width, height = image_size
    image_CHW = torch.zeros(3, height, width, dtype=torch.uint8)
    crop = v2.RandomResizedCrop(32, cfg.scale, cfg.ratio)
    for index in range(25):
        params = augment.sample(image_size, "key", index, cfg, seed=1)
        with torch.random.fork_rng():
            torch.manual_seed(augment.derive_seed(1, "key", index))
            expected = crop.make_params([image_CHW])
        assert params.window == (expected["top"], expected["left"], expected["height"], expected["width"])


def test_full_view_matches_torchvision_pipeline_draw_for_draw():
    cfg = AugmentSpec(hflip=0.5, magnitude=15)
    image = noise_image()
    image_CHW = F.pil_to_tensor(image)
    seen_ops = set()
    for index in range(40):
        params = augment.sample(image.size, "sample", index, cfg, seed=7)
        seen_ops.update(op for op, _ in params.ops)
        expected_CHW = torchvision_view(image_CHW, cfg, 48, augment.derive_seed(7, "sample", index))
        assert torch.equal(augment.replay_uint8(image, params, 48), expected_CHW), params
    assert len(seen_ops) >= 10


def test_crop_distribution_respects_scale_and_ratio():
    cfg = AugmentSpec(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    width, height = 640, 480
    fractions, ratios = [], []
    for index in range(400):
        p = augment.sample((width, height), f"img{index}", 0, cfg)
        assert p.top >= 0 and p.left >= 0 and p.top + p.height <= height and p.left + p.width <= width
        # Sides are rounded to whole pixels: allow half a pixel either way.
        assert (p.width - 0.5) * (p.height - 0.5) <= cfg.scale[1] * width * height
        assert (p.width + 0.5) * (p.height + 0.5) >= cfg.scale[0] * width * height
        assert (p.width - 0.5) / (p.height + 0.5) <= cfg.ratio[1]
        assert (p.width + 0.5) / (p.height - 0.5) >= cfg.ratio[0]
        fractions.append(p.width * p.height / (width * height))
        ratios.append(p.width / p.height)
    assert min(fractions) < 0.25 and max(fractions) > 0.55
    assert min(ratios) < 0.6 and max(ratios) > 1.7
    assert 0.4 < np.mean(np.log(ratios) > 0) < 0.6  # log-uniform ratio: as many wide as tall


@pytest.mark.parametrize("bin_", [0, 9, 30])
def test_sampled_magnitudes_are_torchvisions_at_any_size(bin_):
    cfg = AugmentSpec(num_ops=6, magnitude=bin_)
    magnitudes = {}
    for index in range(60):
        for op_index, magnitude in augment.sample((50, 50), "m", index, cfg).ops:
            magnitudes.setdefault(op_index, set()).add(magnitude)
    assert set(magnitudes) == set(range(len(OP_NAMES)))
    for height, width in [(224, 224), (256, 320)]:
        for op_index, values in magnitudes.items():
            name = OP_NAMES[op_index]
            table, signed = v2.RandAugment._AUGMENTATION_SPACE[name]
            table = table(cfg.num_magnitude_bins, height, width)
            expected = 0.0 if table is None else float(table[bin_])
            for value in values:
                ours = augment.to_torchvision_magnitude(op_index, value, height, width)
                if not signed:
                    assert value >= 0
                if name.startswith("Translate"):  # torchvision truncates to whole pixels
                    assert int(abs(ours)) == int(expected)
                else:
                    assert abs(ours) == expected


# --------------------------------------------------------------------------- replay


def test_replay_is_deterministic():
    image = noise_image()
    params = AugParams(10, 20, 90, 100, True, ((OP["Rotate"], 9.0), (OP["Equalize"], 0.0)))
    first_CHW = augment.replay(image, params, 64, MEAN, STD)
    assert first_CHW.dtype == torch.float32 and first_CHW.shape == (3, 64, 64)
    assert torch.equal(first_CHW, augment.replay(image, params, 64, MEAN, STD))


def test_render_is_sample_then_replay():
    image, cfg = noise_image(), AugmentSpec(hflip=0.5)
    view_CHW, params = augment.render(image, "key", 2, cfg, (40, 56), MEAN, STD, seed=5)
    assert params == augment.sample(image.size, "key", 2, cfg, seed=5)
    assert view_CHW.shape == (3, 40, 56)
    assert torch.equal(view_CHW, augment.replay(image, params, (40, 56), MEAN, STD))


def test_replay_normalises_the_uint8_view():
    image, params = noise_image(), AugParams(0, 0, 120, 160, ops=((OP["Contrast"], 0.3),))
    uint8_CHW = augment.replay_uint8(image, params, 32)
    expected_CHW = (uint8_CHW.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(augment.replay(image, params, 32, MEAN, STD), expected_CHW)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_crop_and_flip_match_resized_crop(interpolation):
    image = noise_image()
    image_CHW = F.pil_to_tensor(image)
    params = AugParams(top=7, left=30, height=80, width=101)
    expected_CHW = F.resized_crop(image_CHW, 7, 30, 80, 101, [48, 64], InterpolationMode(interpolation), antialias=True)
    assert torch.equal(augment.replay_uint8(image, params, (48, 64), interpolation), expected_CHW)
    flipped = dataclasses.replace(params, flip=True)
    assert torch.equal(augment.replay_uint8(image, flipped, (48, 64), interpolation), F.horizontal_flip(expected_CHW))


def test_pil_and_tensor_inputs_give_the_same_view():
    image = noise_image()
    image_CHW = F.pil_to_tensor(image)
    params = AugParams(5, 6, 100, 120, True, ((OP["ShearX"], -0.09), (OP["Sharpness"], 0.27)))
    assert torch.equal(augment.replay_uint8(image, params, 56), augment.replay_uint8(image_CHW, params, 56))
    whole = AugParams(0, 0, 120, 160)  # nothing changes the pixels: still a fresh tensor
    view_CHW = augment.replay_uint8(image_CHW, whole, (120, 160))
    assert torch.equal(view_CHW, image_CHW) and view_CHW.data_ptr() != image_CHW.data_ptr()


@pytest.mark.parametrize(
    ("name", "sign"), [(name, 1.0) for name in OP_NAMES] + [(name, -1.0) for name in sorted(augparams.SIGNED_OPS)]
)
def test_each_op_matches_torchvision(name, sign):
    # Sampled magnitudes at bin 9 of 31 (torchvision's default); a non-square view.
    magnitude = {
        "ShearX": 0.09,
        "ShearY": 0.09,
        "TranslateX": 0.13597,
        "TranslateY": 0.13597,
        "Rotate": 9.0,
        "Brightness": 0.27,
        "Color": 0.27,
        "Contrast": 0.27,
        "Sharpness": 0.27,
        "Posterize": 7.0,
        "Solarize": 0.7,
    }.get(name, 0.0)
    magnitude = augparams.AugParams(0, 0, 1, 1, ops=((OP[name], sign * magnitude),)).ops[0][1]
    view_CHW = augment.replay_uint8(smooth_image(), AugParams(20, 30, 180, 240), (48, 72))
    height, width = view_CHW.shape[-2:]
    expected_CHW = v2.RandAugment()._apply_image_or_video_transform(
        view_CHW,
        name,
        augment.to_torchvision_magnitude(OP[name], magnitude, height, width),
        interpolation=InterpolationMode.NEAREST,
        fill={"others": None},
    )
    ours_CHW = augment.apply_op(view_CHW, OP[name], magnitude)
    assert torch.equal(ours_CHW, expected_CHW)
    if name != "Identity":
        assert not torch.equal(ours_CHW, view_CHW), "the op should change this view"


def test_teacher_and_student_resolutions_agree():
    # The teacher renders at 224, the student replays the same params at 256: same content, up to resampling.
    image = smooth_image()
    params = AugParams(30, 40, 180, 220, True, ((OP["Rotate"], -12.0), (OP["TranslateY"], 0.1)))
    teacher_CHW = augment.replay_uint8(image, params, 224).float()
    student_CHW = augment.replay_uint8(image, params, 256)
    student_at_224_CHW = F.resize(student_CHW, [224, 224], InterpolationMode.BICUBIC, antialias=True).float()
    diff = (teacher_CHW - student_at_224_CHW).abs().mean().item() / 255
    assert diff < 0.01
    # A view that differs only in its translation is far off: the check above has the power to notice.
    shifted = dataclasses.replace(params, ops=((OP["Rotate"], -12.0), (OP["TranslateY"], 0.2)))
    shifted_CHW = augment.replay_uint8(image, shifted, 224).float()
    assert (teacher_CHW - shifted_CHW).abs().mean().item() / 255 > 5 * diff


def test_geometric_amounts_scale_with_the_view():
    assert augment.to_torchvision_magnitude(OP["TranslateX"], 0.25, 224, 256) == 64.0
    assert augment.to_torchvision_magnitude(OP["TranslateY"], -0.25, 224, 256) == -56.0
    for name in ("ShearX", "Rotate", "Brightness", "Solarize"):
        assert augment.to_torchvision_magnitude(OP[name], 0.2, 224, 256) == 0.2
    for side in (64, 128):
        # A vertical white line at column side/4 moves by a quarter of the view's width.
        image_CHW = torch.zeros(3, side, side, dtype=torch.uint8)
        image_CHW[:, :, side // 4] = 255
        moved_CHW = augment.apply_op(image_CHW, OP["TranslateX"], 0.25)
        assert moved_CHW[0].amax(dim=0).nonzero().flatten().tolist() == [side // 2]
        # Shear about the top-left corner: the bottom row shifts by factor * height, whatever the size.
        sheared_CHW = augment.apply_op(image_CHW, OP["ShearX"], 0.25)
        bottom_col = sheared_CHW[0, -1].nonzero().flatten().tolist()
        assert len(bottom_col) == 1 and abs(bottom_col[0] - (side // 4 - 0.25 * side)) <= 1


# --------------------------------------------------------------------------- serialisation


def test_dict_round_trip_is_json():
    params = augment.sample((640, 480), "key", 0, AugmentSpec(hflip=0.5))
    data = json.loads(json.dumps(params.to_dict()))
    assert AugParams.from_dict(data) == params
    assert set(data) == {"top", "left", "height", "width", "flip", "ops"}
    assert len(data["ops"]) == 2 and all(len(op) == 2 for op in data["ops"])


def test_array_round_trip_is_exact_and_arrow_stores_it():
    cfg = AugmentSpec(hflip=0.5)
    views = augment.sample_views((4000, 3000), "key", 30, cfg)
    views_KL = augparams.views_to_array(views)
    assert views_KL.dtype == np.float32 and views_KL.shape == (30, augparams.encoded_length(cfg.num_ops)) == (30, 9)
    assert augparams.views_from_array(views_KL) == views
    assert all(AugParams.from_array(view.to_array()) == view for view in views)
    # A column of K views per row: fixed_size_list<fixed_size_list<float32, L>, K>, back to numpy without loss.
    rows_NKL = np.stack([views_KL, views_KL[::-1]])
    flat = pa.array(rows_NKL.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 9), 30)
    back_NKL = column.flatten().flatten().to_numpy().reshape(2, 30, 9)
    assert augparams.views_from_array(back_NKL[1]) == views[::-1]


def test_params_are_canonical():
    hand_made = AugParams(np.int64(1), 2.0, 3, 4, 1, [[np.float32(3), -0.0], (5, 0.1)])
    assert hand_made.window == (1, 2, 3, 4) and hand_made.flip is True
    assert hand_made.ops == ((3, 0.0), (5, float(np.float32(0.1))))
    assert AugParams.from_array(hand_made.to_array()) == hand_made
    assert AugParams(0, 0, 1, 1).to_array().shape == (5,)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"scale": (0.9, 0.1)}, "augment.scale"),
        ({"scale": (0.0, 1.0)}, "augment.scale"),
        ({"ratio": (4 / 3, 3 / 4)}, "augment.ratio"),
        ({"num_ops": -1}, "augment.num_ops"),
        ({"magnitude": 31}, "augment.magnitude"),
        ({"magnitude": -1}, "augment.magnitude"),
        ({"num_magnitude_bins": 1, "magnitude": 0}, "augment.num_magnitude_bins"),
        ({"hflip": 1.5}, "augment.hflip"),
        ({"hflip": -0.1}, "augment.hflip"),
    ],
)
def test_bad_config_is_a_value_error(change, field):
    cfg = dataclasses.replace(AugmentSpec(), **change)
    with pytest.raises(ValueError, match=field):
        augment.check_spec(cfg)
    with pytest.raises(ValueError, match=field):
        augment.sample((64, 64), "key", 0, cfg)


def test_crop_outside_the_image_is_a_value_error():
    params = AugParams(top=100, left=0, height=50, width=50)
    with pytest.raises(ValueError, match=r"\(100, 0, 50, 50\).*\(160, 120\)"):
        augment.replay(noise_image(), params, 32, MEAN, STD)
    with pytest.raises(ValueError, match=r"\(100, 0, 50, 50\).*\(160, 120\)"):
        augment.replay_uint8(F.pil_to_tensor(noise_image()), params, 32)


@pytest.mark.parametrize(
    "build",
    [
        lambda: AugParams(-1, 0, 10, 10),
        lambda: AugParams(0, 0, 0, 10),
        lambda: AugParams(0, 0, 10.5, 10),
        lambda: AugParams(0, 0, 10, 10, flip=2),
        lambda: AugParams(0, 0, 10, 10, ops=((14, 0.0),)),
        lambda: AugParams(0, 0, 10, 10, ops=((1, float("nan")),)),
        lambda: AugParams(0, 0, 10, 10, ops=((1,),)),
        lambda: AugParams.from_array(np.zeros(6, np.float32)),
        lambda: AugParams.from_dict({"top": 0, "left": 0, "height": 1, "width": 1, "flip": False}),
        lambda: augparams.views_to_array([AugParams(0, 0, 1, 1), AugParams(0, 0, 1, 1, ops=((0, 0.0),))]),
        lambda: augment.replay_uint8(noise_image(), AugParams(0, 0, 10, 10), 0),
        lambda: augment.replay_uint8(noise_image(), AugParams(0, 0, 10, 10), 16, interpolation="lanczos"),
        lambda: augment.replay_uint8(torch.zeros(3, 8, 8), AugParams(0, 0, 4, 4), 16),
        lambda: augment.sample((0, 10), "key", 0, AugmentSpec()),
        lambda: augment.sample((10, 10), "key", -1, AugmentSpec()),
    ],
)
def test_bad_params_and_arguments_are_value_errors(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    ("name", "valid", "invalid"),
    [
        ("Brightness", (-1.0, 0.9, 5.0), (-1.01,)),
        ("Color", (-1.0, -0.9), (-1.5,)),
        ("Contrast", (-1.0,), (-2.0,)),
        ("Sharpness", (-1.0,), (-1.25,)),
        ("Posterize", (0.0, 4.0, 8.0), (4.5, 9.0, -1.0)),
        ("Solarize", (0.0, 0.7, 1.0), (1.01, -0.1)),
        ("Rotate", (-400.0, 30.0), ()),
    ],
)
def test_one_magnitude_check_for_storing_and_replaying(name, valid, invalid):
    # What check_op accepts, replay applies; what it refuses cannot be stored in AugParams, nor applied.
    image_CHW = F.pil_to_tensor(noise_image(16, 12))
    for magnitude in valid:
        augparams.check_op(OP[name], magnitude)
        augment.replay_uint8(image_CHW, AugParams(0, 0, 12, 16, ops=((OP[name], magnitude),)), 8)
    for magnitude in invalid:
        with pytest.raises(ValueError, match=name):
            augparams.check_op(OP[name], magnitude)
        with pytest.raises(ValueError, match=rf"ops\[0\]: {name}"):
            AugParams(0, 0, 12, 16, ops=((OP[name], magnitude),))
        with pytest.raises(ValueError, match=name):
            augment.apply_op(image_CHW, OP[name], magnitude)
