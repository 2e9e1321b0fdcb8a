"""Stored augmentations: sample a view's parameters once, replay them at any resolution.

This module is the contract between the reinforcement job and the training job. Reinforcement samples
`K` views per image (`sample_views`), renders them at each teacher's resolution (`replay`, or `render`
for both at once) and stores only the parameters next to the teacher embeddings. Training draws one
stored view and replays it at the student's resolution and normalisation.

A view is torchvision's ``Compose([RandomResizedCrop, RandomHorizontalFlip, RandAugment])``, split into
what is drawn (`AugParams`) and what is applied (`replay`):

1. crop window ``(top, left, height, width)`` in pixels of the source image, resized to the view size
   (antialiased, bicubic by default);
2. horizontal flip, with probability ``AugmentSpec.hflip``;
3. ``num_ops`` RandAugment operations, applied in order with torchvision's own kernels, torchvision's
   default nearest interpolation and black fill (as ``RandAugment()._apply_image_or_video_transform``).

Sampling makes the same random draws, in the same order, as those three torchvision v2 transforms do
from the global generator, but from a private ``torch.Generator`` seeded by `derive_seed(seed, key,
aug_index)`: a blake2b hash, so reruns, workers and machines reproduce every view exactly, and the
global torch RNG is never touched. Replay is a pure function of (image, params, size, interpolation).

Resolution-free magnitudes. The crop window is in source pixels, so it does not depend on the view size.
RandAugment magnitudes are stored so that they do not either; `to_torchvision_magnitude` turns one into
torchvision's value at a view size:

==========================================  ======================================  ========================
op                                          stored magnitude                        at a view of H x W
==========================================  ======================================  ========================
Identity, AutoContrast, Equalize            0                                       -
ShearX, ShearY                              signed shear factor (<= 0.3)            same (about the top-left)
TranslateX / TranslateY                     signed fraction of the view's W / H     ``int(m * W)`` pixels
                                            (<= 150/331)                            (``int(m * H)``)
Rotate                                      signed degrees (<= 30)                  same
Brightness, Color, Contrast, Sharpness      signed factor offset (factor = 1 + m)   same
Posterize                                   bits kept (4..8)                        same
Solarize                                    threshold as a fraction of white        ``255 * m``
==========================================  ======================================  ========================

The pixel translation truncates toward zero exactly like torchvision's ``int(magnitude)``; it can differ
from torchvision's by one pixel only when ``m * W`` lands within float32 rounding of an integer.

The stored form of a view (`AugParams`, its float32 encoding and the valid magnitudes) is `clipdr.augparams`:
replay takes it, sampling makes it.

Shape suffixes: C channels (3), H and W pixel rows and columns, K views of a sample, L encoded length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clipdr.augparams import OP_NAMES, SIGNED_OPS, AugParams, as_int, check_op

if TYPE_CHECKING:  # the specs are only annotated here
    from clipdr.records import AugmentSpec, TeacherSpec

_TRANSLATE_MAX = 150.0 / 331.0  # torchvision's largest translation, as a fraction of the image side
_OP_INTERPOLATION = InterpolationMode.NEAREST  # torchvision RandAugment's default for the geometric ops
_RESIZE_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")  # those tensor kernels support


# --------------------------------------------------------------------------- sampling


def check_spec(spec: AugmentSpec) -> None:
    """Raises ValueError, naming the field, when augmentation settings cannot be sampled."""

    def _pair(name: str) -> tuple[float, float]:
        value = getattr(spec, name)
        if len(value) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
            raise ValueError(f"augment.{name} must be a (min, max) pair of numbers, got {value!r}")
        return float(value[0]), float(value[1])

    scale, ratio = _pair("scale"), _pair("ratio")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"augment.scale must satisfy 0 < min <= max <= 1, got {spec.scale!r}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"augment.ratio must satisfy 0 < min <= max, got {spec.ratio!r}")
    for name in ("num_ops", "magnitude", "num_magnitude_bins"):
        if isinstance(getattr(spec, name), bool) or not isinstance(getattr(spec, name), int):
            raise ValueError(f"augment.{name} must be an integer, got {getattr(spec, name)!r}")
    if spec.num_ops < 0:
        raise ValueError(f"augment.num_ops must be >= 0, got {spec.num_ops}")
    if spec.num_magnitude_bins < 2:
        raise ValueError(f"augment.num_magnitude_bins must be >= 2, got {spec.num_magnitude_bins}")
    if not 0 <= spec.magnitude < spec.num_magnitude_bins:
        raise ValueError(
            f"augment.magnitude must be a bin in [0, {spec.num_magnitude_bins - 1}] "
            f"(augment.num_magnitude_bins = {spec.num_magnitude_bins}), got {spec.magnitude}"
        )
    if isinstance(spec.hflip, bool) or not isinstance(spec.hflip, int | float) or not 0.0 <= spec.hflip <= 1.0:
        raise ValueError(f"augment.hflip must be a probability in [0, 1], got {spec.hflip!r}")


def derive_seed(seed: int, key: str, aug_index: int) -> int:
    """The 63-bit seed of one view: a blake2b hash of (seed, key, aug_index), stable across processes."""
    payload = json.dumps([int(seed), str(key), int(aug_index)]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=16)
def _op_magnitudes(num_bins: int, magnitude: int) -> tuple[float, ...]:
    """Resolution-free unsigned magnitude of each op at one bin, computed as torchvision does (float32)."""
    tables = {
        "ShearX": torch.linspace(0.0, 0.3, num_bins),
        "ShearY": torch.linspace(0.0, 0.3, num_bins),
        "TranslateX": torch.linspace(0.0, _TRANSLATE_MAX, num_bins),
        "TranslateY": torch.linspace(0.0, _TRANSLATE_MAX, num_bins),
        "Rotate": torch.linspace(0.0, 30.0, num_bins),
        "Brightness": torch.linspace(0.0, 0.9, num_bins),
        "Color": torch.linspace(0.0, 0.9, num_bins),
        "Contrast": torch.linspace(0.0, 0.9, num_bins),
        "Sharpness": torch.linspace(0.0, 0.9, num_bins),
        "Posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int(),
        "Solarize": torch.linspace(1.0, 0.0, num_bins),
    }
    return tuple(float(tables[name][magnitude]) if name in tables else 0.0 for name in OP_NAMES)


def _sample_crop(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision.transforms.v2.RandomResizedCrop.make_params, drawing from ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        aspect_ratio = torch.exp(log_aspect).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # Fallback to a central crop with the closest allowed aspect ratio.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample(image_size: tuple[int, int], key: str, aug_index: int, spec: AugmentSpec, seed: int = 0) -> AugParams:
    """Draws one view's parameters, reproducibly from ``(seed, key, aug_index)``.

    The draws are those of torchvision v2 ``RandomResizedCrop(scale, ratio)``, then
    ``RandomHorizontalFlip(hflip)`` (one draw even when hflip is 0), then ``RandAugment(num_ops, magnitude,
    num_magnitude_bins)``, in that order, as if the global generator had been seeded with `derive_seed`.

    Args:
        image_size: ``(width, height)`` of the source image, as ``PIL.Image.size`` gives it.
        key: The sample's key in its dataset.
        aug_index: Which of the sample's views, 0 to K-1.
        spec: The augmentation settings (a dataset's ``Manifest.augment``, or a run config's, converted).
        seed: Dataset-level seed.

    Returns:
        The view's parameters; magnitudes follow the module docstring's convention.
    """
    check_spec(spec)
    width, height = (as_int(side, "image_size") for side in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image_size (width, height) must be positive, got {image_size!r}")
    if isinstance(aug_index, bool) or not isinstance(aug_index, int) or aug_index < 0:
        raise ValueError(f"aug_index must be a non-negative integer, got {aug_index!r}")
    generator = torch.Generator().manual_seed(derive_seed(seed, key, aug_index))

    top, left, crop_h, crop_w = _sample_crop(height, width, spec.scale, spec.ratio, generator)
    # RandomHorizontalFlip skips when rand >= p.
    flip = bool(torch.rand(1, generator=generator).item() < spec.hflip)
    magnitudes = _op_magnitudes(spec.num_magnitude_bins, spec.magnitude)
    ops = []
    for _ in range(spec.num_ops):
        op_index = int(torch.randint(len(OP_NAMES), (), generator=generator))
        magnitude = magnitudes[op_index]
        # torchvision draws the sign only for signed ops that have a magnitude table.
        if OP_NAMES[op_index] in SIGNED_OPS and torch.rand((), generator=generator).item() <= 0.5:
            magnitude = -magnitude
        ops.append((op_index, magnitude))
    return AugParams(top, left, crop_h, crop_w, flip, tuple(ops))


def sample_views(
    image_size: tuple[int, int], key: str, num_views: int, spec: AugmentSpec, seed: int = 0
) -> list[AugParams]:
    """The sample's ``num_views`` (K) views: `sample` for aug_index 0 to K-1."""
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
    return [sample(image_size, key, aug_index, spec, seed) for aug_index in range(num_views)]


# --------------------------------------------------------------------------- replay


def to_torchvision_magnitude(op_index: int, magnitude: float, height: int, width: int) -> float:
    """torchvision RandAugment's magnitude for a stored (resolution-free) one, on a view of height x width."""
    name = OP_NAMES[op_index]
    if name == "TranslateX":
        return magnitude * width
    if name == "TranslateY":
        return magnitude * height
    return magnitude


def apply_op(image_CHW: torch.Tensor, op_index: int, magnitude: float) -> torch.Tensor:
    """Applies one RandAugment op with a stored magnitude, as ``RandAugment._apply_image_or_video_transform``.

    Args:
        image_CHW: uint8 view.
        op_index: Index into `OP_NAMES`.
        magnitude: Resolution-free magnitude (module docstring); pixel amounts follow the view's size.

    Returns:
        The uint8 view after the op.

    Raises:
        ValueError: A magnitude outside the op's domain (`check_op`).
    """
    check_op(op_index, magnitude)
    name = OP_NAMES[op_index]
    height, width = image_CHW.shape[-2:]
    magnitude = to_torchvision_magnitude(op_index, magnitude, height, width)
    geometric = {"interpolation": _OP_INTERPOLATION, "fill": None}
    if name == "Identity":
        return image_CHW
    if name in ("ShearX", "ShearY"):
        # torchvision shears by atan(magnitude) degrees about the top-left corner (as the AutoAugment paper).
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return F.affine(image_CHW, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], **geometric)
    if name in ("TranslateX", "TranslateY"):
        translate = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return F.affine(image_CHW, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], **geometric)
    if name == "Rotate":
        return F.rotate(image_CHW, angle=magnitude, **geometric)
    if name == "Brightness":
        return F.adjust_brightness(image_CHW, brightness_factor=1.0 + magnitude)
    if name == "Color":
        return F.adjust_saturation(image_CHW, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return F.adjust_contrast(image_CHW, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return F.adjust_sharpness(image_CHW, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(image_CHW, bits=int(magnitude))
    if name == "Solarize":
        return F.solarize(image_CHW, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return F.autocontrast(image_CHW)
    assert name == "Equalize", name
    return F.equalize(image_CHW)


def _view_size(size: int | tuple[int, int]) -> tuple[int, int]:
    sides = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"size must be a positive int or a (height, width) pair of them, got {size!r}")
    return sides[0], sides[1]


def _interpolation(interpolation: str) -> InterpolationMode:
    if interpolation not in _RESIZE_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_RESIZE_INTERPOLATIONS}, got {interpolation!r}")
    return InterpolationMode(interpolation)


def _crop(image: PIL.Image.Image | torch.Tensor, params: AugParams) -> torch.Tensor:
    """The crop window of a PIL image or a uint8 CHW tensor, as a contiguous uint8 CHW tensor."""
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"a tensor image must be uint8 with shape (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
    else:
        raise ValueError(f"image must be a PIL image or a uint8 (3, H, W) tensor, got {type(image).__name__}")
    if params.top + params.height > height or params.left + params.width > width:
        raise ValueError(
            f"crop window (top, left, height, width) = {params.window} falls outside the image of "
            f"(width, height) = ({width}, {height}): were the params sampled for another image size?"
        )
    if isinstance(image, torch.Tensor):
        crop_CHW = image[:, params.top : params.top + params.height, params.left : params.left + params.width]
    else:
        box = (params.left, params.top, params.left + params.width, params.top + params.height)
        crop_CHW = F.pil_to_tensor(image.crop(box).convert("RGB"))
    # One memory layout whatever the input, so PIL and tensor inputs give bit-identical views.
    return crop_CHW.contiguous()


def replay_uint8(
    image: PIL.Image.Image | torch.Tensor,
    params: AugParams,
    size: int | tuple[int, int],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Re-applies a stored view to an image: crop, resize, flip, RandAugment ops; stops before normalising.

    Args:
        image: The source image the params were sampled for: PIL (converted to RGB) or a uint8 (3, H, W) tensor.
        params: The stored view.
        size: View size: an int for a square, or ``(height, width)`` as torchvision takes it.
        interpolation: Resize interpolation of the crop: nearest, nearest-exact, bilinear or bicubic
            (antialiased). The RandAugment ops always use torchvision's default, nearest.

    Returns:
        The uint8 view, shape (3, height, width); a fresh tensor, never the input's memory.
    """
    view_h, view_w = _view_size(size)
    mode = _interpolation(interpolation)
    crop_CHW = _crop(image, params)
    view_CHW = F.resize(crop_CHW, [view_h, view_w], interpolation=mode, antialias=True)
    if params.flip:
        view_CHW = F.horizontal_flip(view_CHW)
    for op_index, magnitude in params.ops:
        view_CHW = apply_op(view_CHW, op_index, magnitude)
    if isinstance(image, torch.Tensor) and view_CHW.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        view_CHW = view_CHW.clone()  # nothing changed the pixels: do not hand back the caller's storage
    return view_CHW


def replay(
    image: PIL.Image.Image | torch.Tensor,
    params: AugParams,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """`replay_uint8`, then scaled to [0, 1] and normalised with the model's mean and std.

    Returns:
        The float32 view, shape (3, height, width).
    """
    return normalize(replay_uint8(image, params, size, interpolation), mean, std)


def normalize(
    views_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 views (..., 3, H, W), on any device, scaled to [0, 1] and normalised: the one normalisation of a
    replayed view, whether `replay` runs it on the CPU, a reinforcement model actor or a training step on its
    device after the uint8 views arrived. Elementwise, so a batch gives each view the values it gets alone.

    Returns:
        Views of the same shape in ``dtype``, on the same device.
    """
    return F.normalize(F.to_dtype(views_uint8, dtype, scale=True), mean=list(mean), std=list(std))


def render(
    image: PIL.Image.Image | torch.Tensor,
    key: str,
    aug_index: int,
    spec: AugmentSpec,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, AugParams]:
    """Samples a view for this image and replays it: what the reinforcement job does per (sample, view).

    Returns:
        The normalised float32 view (3, height, width) and the params to store.
    """
    image_size = image.size if isinstance(image, PIL.Image.Image) else (image.shape[-1], image.shape[-2])
    params = sample(image_size, key, aug_index, spec, seed)
    return replay(image, params, size, mean, std, interpolation), params


class RenderKey(NamedTuple):
    """What a uint8 view depends on besides the image and its params. Teachers that share it share one render:
    mean and std are applied after (`normalize`, on the model's device)."""

    image_size: int
    interpolation: str

    @classmethod
    def of(cls, spec: TeacherSpec) -> RenderKey:
        return cls(spec.image_size, spec.interpolation)


def render_keys(specs: Sequence[TeacherSpec]) -> list[RenderKey]:
    """The distinct renders a teacher ensemble needs, in teacher order."""
    return list(dict.fromkeys(RenderKey.of(s) for s in specs))


def render_views(
    images: Sequence[PIL.Image.Image | torch.Tensor], views: Sequence[Sequence[AugParams]], key: RenderKey
) -> np.ndarray:
    """(N, K, 3, S, S) uint8: each image's stored views replayed (`replay_uint8`) at one render's size and
    interpolation; every image has the same number K of views."""
    views_NK_CHW = [
        torch.stack([replay_uint8(image, params, key.image_size, key.interpolation) for params in image_views])
        for image, image_views in zip(images, views, strict=True)
    ]
    return torch.stack(views_NK_CHW).numpy()
