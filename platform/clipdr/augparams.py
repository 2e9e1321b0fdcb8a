"""One stored view: what the reinforcement job stores of an augmentation, and how it is encoded in a record.

`AugParams` is the record's ``aug_params`` contract: `clipdr.augment` samples it and replays it, the records, the
DataCompDR converter and the training loader read and write it. This module imports no torch, so the processes
that only move records (the reinforcement job's writers and routing tasks) stay small.

A view is a crop window in source pixels, a horizontal flip, and RandAugment ops with resolution-free magnitudes
(`clipdr.augment`'s docstring gives each op's convention).

Valid magnitudes (`check_op`): the kernels are defined only for a factor ``1 + m >= 0`` (Brightness, Color,
Contrast, Sharpness), an integer Posterize in 0..8 and a Solarize threshold in [0, 1] of white; any other finite
magnitude replays. `AugParams` refuses an op outside that domain, so a stored view either replays or fails to
load with a ValueError that names the op, and a converter can check a foreign view before storing it.

Stored representation. One view encodes (`AugParams.to_array`) to a fixed-length float32 vector::

    [top, left, height, width, flip, op_0, magnitude_0, ..., op_{n-1}, magnitude_{n-1}]

of `encoded_length(num_ops)` = ``5 + 2 * num_ops`` values (9 for the default two ops; `ARRAY_FIELDS` names
the first five). A sample's `K` views stack (`views_to_array`) to a ``(K, L)`` float32 array, which pyarrow
stores as ``fixed_size_list<fixed_size_list<float32, L>, K>``. Why a fixed-size numeric list, not a struct:
36 bytes a view next to ~100 KB of embeddings, a column of N rows turns into an ``(N, K, L)`` numpy array
without copying (``col.flatten().flatten().to_numpy().reshape(N, K, L)``) where a ``list<struct>`` column
costs one Arrow child array per field and a Python dict per view when Ray Data hands out rows, and the
layout is fixed by ``num_ops``, which the manifest's `records.AugmentSpec` records. float32 is lossless here:
crop coordinates are integers below 2**24, and every magnitude is a float32 value (torchvision draws them
from float32 ``torch.linspace``; `AugParams` rounds hand-made ones to float32 when it is built).
`AugParams.to_dict` / `from_dict` give the same content as JSON for manifests, logs and tests.

Shape suffixes: K views of a sample, L encoded length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# torchvision.transforms.v2.RandAugment._AUGMENTATION_SPACE, in its order: op_index indexes this tuple.
OP_NAMES: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED_OPS: frozenset[str] = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)
ARRAY_FIELDS: tuple[str, ...] = ("top", "left", "height", "width", "flip")  # then (op, magnitude) pairs

_FACTOR_OPS = frozenset({"Brightness", "Color", "Contrast", "Sharpness"})  # factor = 1 + m, must be >= 0
_MAX_COORD = 2**24  # float32 holds every integer up to here exactly


def as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float32(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    rounded = float(np.float32(value))
    if not math.isfinite(rounded):
        raise ValueError(f"{name} must be finite (in float32), got {value!r}")
    return rounded + 0.0  # -0.0 -> 0.0, so equal views encode identically


def check_op(op_index: int, magnitude: float) -> None:
    """Raises ValueError, naming the op, when replay cannot apply ``magnitude`` (module docstring: valid magnitudes).

    The one validity check of a stored op: `AugParams` (and so replay and the training loader) and converters of
    foreign views (`clipdr.data.datacompdr`) all use it.
    """
    name = OP_NAMES[op_index]
    if name in _FACTOR_OPS and magnitude < -1.0:
        raise ValueError(f"{name} magnitude {magnitude!r} gives a negative factor 1 + m; it must be >= -1")
    if name == "Posterize" and not (0 <= magnitude <= 8 and magnitude == int(magnitude)):  # inf, nan fail first
        raise ValueError(f"Posterize keeps an integer 0..8 bits, got {magnitude!r}")
    if name == "Solarize" and not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"Solarize threshold {magnitude!r} must be a fraction of white in [0, 1]")


@dataclass(frozen=True)
class AugParams:
    """One stored view: crop window in source pixels, flip, and RandAugment ops with resolution-free magnitudes.

    Built values are canonicalised: coordinates become ints, ``flip`` a bool, ``ops`` a tuple of
    ``(op_index, magnitude)`` with the magnitude rounded to float32, so every encoding round-trips exactly.

    Attributes:
        top: First source row of the crop.
        left: First source column of the crop.
        height: Crop height in source pixels.
        width: Crop width in source pixels.
        flip: Whether the view is flipped horizontally (after the resize, before the ops).
        ops: ``(op_index, magnitude)`` pairs applied in order; op_index indexes `OP_NAMES`, the magnitude
            follows `clipdr.augment`'s convention (resolution-free) and must be valid for its op (`check_op`).
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    ops: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ARRAY_FIELDS[:4]:
            object.__setattr__(self, name, as_int(getattr(self, name), name))
        if self.top < 0 or self.left < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"crop window {self.window} must have top, left >= 0 and height, width >= 1")
        if self.top + self.height > _MAX_COORD or self.left + self.width > _MAX_COORD:
            raise ValueError(f"crop window {self.window} reaches past {_MAX_COORD} pixels")
        if isinstance(self.flip, bool | np.bool_) or self.flip in (0, 1):
            object.__setattr__(self, "flip", bool(self.flip))
        else:
            raise ValueError(f"flip must be a bool (or 0/1), got {self.flip!r}")
        ops = []
        for position, op in enumerate(self.ops):
            if len(op) != 2:
                raise ValueError(f"ops[{position}] must be an (op_index, magnitude) pair, got {op!r}")
            op_index = as_int(op[0], f"ops[{position}] op_index")
            if not 0 <= op_index < len(OP_NAMES):
                raise ValueError(f"ops[{position}] op_index {op_index} is not in [0, {len(OP_NAMES)}): {OP_NAMES}")
            magnitude = _as_float32(op[1], f"ops[{position}] magnitude")
            try:
                check_op(op_index, magnitude)
            except ValueError as e:
                raise ValueError(f"ops[{position}]: {e}") from None
            ops.append((op_index, magnitude))
        object.__setattr__(self, "ops", tuple(ops))

    @property
    def window(self) -> tuple[int, int, int, int]:
        """The crop window ``(top, left, height, width)`` in source pixels."""
        return (self.top, self.left, self.height, self.width)

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"top", "left", "height", "width", "flip", "ops": [[op_index, magnitude], ...]}``."""
        return {
            "top": self.top,
            "left": self.left,
            "height": self.height,
            "width": self.width,
            "flip": self.flip,
            "ops": [[op_index, magnitude] for op_index, magnitude in self.ops],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugParams:
        """Inverse of `to_dict`; unknown or missing keys raise ValueError."""
        expected = {*ARRAY_FIELDS, "ops"}
        if set(data) != expected:
            unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
            raise ValueError(f"AugParams dict has unknown keys {unknown} and lacks {missing}")
        return cls(
            top=data["top"],
            left=data["left"],
            height=data["height"],
            width=data["width"],
            flip=data["flip"],
            ops=tuple(tuple(op) for op in data["ops"]),
        )

    def to_array(self) -> np.ndarray:
        """The fixed-length float32 encoding ``[top, left, height, width, flip, op_0, magnitude_0, ...]``."""
        values = [self.top, self.left, self.height, self.width, float(self.flip)]
        for op_index, magnitude in self.ops:
            values += [op_index, magnitude]
        return np.asarray(values, dtype=np.float32)

    @classmethod
    def from_array(cls, array_L: np.ndarray | Sequence[float]) -> AugParams:
        """Inverse of `to_array`; the number of ops follows from the length."""
        values_L = np.asarray(array_L, dtype=np.float32)
        if values_L.ndim != 1 or values_L.size < len(ARRAY_FIELDS) or (values_L.size - len(ARRAY_FIELDS)) % 2:
            raise ValueError(
                f"an encoded view has shape (5 + 2 * num_ops,), got {values_L.shape}: fields {ARRAY_FIELDS} "
                "then (op, magnitude) pairs"
            )
        values = values_L.tolist()
        pairs = values[len(ARRAY_FIELDS) :]
        top, left, height, width, flip = values[: len(ARRAY_FIELDS)]
        if flip not in (0.0, 1.0):
            raise ValueError(f"encoded flip must be 0 or 1, got {flip}")
        return cls(top, left, height, width, flip == 1.0, tuple(zip(pairs[::2], pairs[1::2], strict=True)))


def encoded_length(num_ops: int) -> int:
    """Length of `AugParams.to_array` for views with ``num_ops`` RandAugment ops."""
    return len(ARRAY_FIELDS) + 2 * num_ops


def views_to_array(views: Sequence[AugParams]) -> np.ndarray:
    """Stacks a sample's views into the ``(K, L)`` float32 array that a record stores."""
    if not views:
        raise ValueError("views_to_array needs at least one view")
    num_ops = {view.num_ops for view in views}
    if len(num_ops) != 1:
        raise ValueError(f"all views of a sample must have the same number of ops, got {sorted(num_ops)}")
    return np.stack([view.to_array() for view in views])


def views_from_array(views_KL: np.ndarray) -> list[AugParams]:
    """Inverse of `views_to_array`."""
    views_KL = np.asarray(views_KL)
    if views_KL.ndim != 2:
        raise ValueError(f"encoded views have shape (K, L), got {views_KL.shape}")
    return [AugParams.from_array(row_L) for row_L in views_KL]
