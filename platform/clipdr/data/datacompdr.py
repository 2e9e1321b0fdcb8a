"""DataCompDR's published format: Apple's released shards read and mapped onto clipdr's conventions, sample by sample.

Apple published DataCompDR-12M (and -1B) as webdataset tars holding the reinforcements only, no images or
captions (``apple/DataCompDR-12M`` on Hugging Face; the UIDs per shard match ``mlfoundations/DataComp-12M``, whose
images users fetch with img2dataset and join back by uid). After the join, one sample holds these members::

    <key>.url.txt     image URL
    <key>.json        {"uid": ..., "sha256": ...}  (DataComp's uid and image hash)
    <key>.syn.json    {"syn_text": [S strings]}     synthetic captions, S = 5
    <key>.paug.json   {"param_aug": [K records]}    one record per stored view, K = 30 (12M) or 10 (1B)
    <key>.npz         float32 {"image_emb": (K, 1536), "text_emb": (1+S, 1536)}   (DataCompDR-12M, -1B)
    <key>.pth.gz      gzip'd ``torch.save`` of the same dict as bfloat16 tensors     (DataCompDR-12M-bf16)
    <key>.jpg / .txt  image and real caption, present only once the user joined them in

A source with several caption sets (RayGen's output, DFNDR-2B) holds one ``syn.json`` key a set, ``syn_text`` (no
tag) or ``syn_text_<tag>`` (e.g. ``syn_text_dfn_mscoco38k``), and the set's text embeddings as ``<key>_emb``
(S_set rows) beside ``text_emb`` (then the real caption alone) in the embedding member. ``syn_text`` is imported as
the ``default`` set, each ``syn_text_<tag>`` as the set `caption_set_name` of its key (`DataCompDRLayout.caption_sets`;
docs/reinforce.md, "Several caption sets", lists what was read to learn this).

What was verified, and where (public code read, not copied):

- apple/ml-mobileclip ``training/open_clip.patch`` (``preprocess_dr``, the reader Apple trains with) and
  ``hf_dataset_example.py``: a view is ``param_aug[k]``, decompressed and re-applied to the image as stored in the
  tar; ``npz`` is preferred over ``pth.gz``; ``text_emb[0]`` is the real caption and ``text_emb[1 + j]`` is
  ``syn_text[j]``; the example ``json.loads`` ``param_aug`` (the Hugging Face loader surfaces it as a JSON string),
  so a string is accepted here too.
- apple/ml-mobileclip ``training/configs/datacompdr12m.json`` (and ``datacompdr1b.json``): teachers
  ``ViT-L-14`` x ``openai,datacomp_xl_s13b_b90k`` in that order, K = 30 (10), augmentation
  ``random_resized_crop`` (size 224, bicubic, torchvision's default scale/ratio) + ``rand_augment`` (p = 1,
  torchvision's defaults: 2 ops, magnitude 9 of 31 bins, nearest, no fill), normalize with OpenAI mean/std; no flip,
  no erasing, no mixing. ``run_datacompdr12m.sh`` trains with ``--distill-teacher-dimension 768 768`` and
  ``--distill-logit-scale 100``. The dataset card names the teachers in the other order (prose, "datacomp_xl ... and
  openai"); the config, which drives the code, is followed, and the order is a parameter (``teachers``).
- apple/ml-mobileclip-dr ``src/raygen/dr/transforms.py`` (the reproducible transforms): ``Compose.compress`` writes one
  entry per transform that has random parameters, in the fixed order ``resize, random_crop, random_resized_crop,
  random_horizontal_flip, rand_augment, random_erase, mixup, cutmix`` (preceded by the mixing partner's id when mixup
  or cutmix is configured). So a DataCompDR record is ``[[top, left, height, width], [[op_index, magnitude], x2]]``:
  torchvision v1 ``RandomResizedCrop.get_params`` (i, j, h, w) and v1 ``RandAugment`` ops, whose ``op_index`` indexes
  the same 14 names in the same order as `augparams.OP_NAMES` and whose magnitude is torchvision v1's *applied* value
  (with its sign), computed on the 224 x 224 crop output.
- ``scripts/gen.py`` there: each teacher's embedding is open_clip's (L2-normalised) output, concatenated along the
  feature axis in teacher order; ``datasetio.py`` writes ``npz`` (numpy) or ``pth.gz`` (bf16 torch) and the JSON
  members. RayGen output splits text embeddings into ``text_emb`` (1 row) + ``syn_text_emb`` (S rows) and names the
  image key ``image_emb{self.tag_suffix}`` (a missing f-string prefix); both variants are read too.
- mlfoundations/datacomp ``download_upstream.py``: DataComp images were fetched with img2dataset ``image_size=512,
  resize_mode='keep_ratio_largest', resize_only_if_bigger=True``: the images Apple reinforced, the frame of the crop
  windows, have a longest side of at most 512.

Mapping onto `augparams.AugParams` (`map_view`):

==============================================  =============================================================
DataCompDR record entry                         clipdr
==============================================  =============================================================
random_resized_crop [top, left, h, w]           window (top, left, height, width) in source pixels; rescaled
                                                when the joined image is larger than the reference frame
random_horizontal_flip bool (absent here)       flip
rand_augment [[op_index, m], ...]               ops, op by name (identical table), magnitude as below
  Identity, AutoContrast, Equalize (0)          0
  ShearX, ShearY (shear factor)                 same
  TranslateX, TranslateY (pixels of the view)  m / ``view_size`` (fraction of the view's side)
  Rotate (degrees)                              same
  Brightness, Color, Contrast, Sharpness        same (factor offset, factor = 1 + m)
  Posterize (bits kept, 4..8)                   same
  Solarize (threshold, 0..255)                  m / 255 (fraction of white)
  a magnitude replay cannot apply               skipped, ``invalid_magnitude`` (`augparams.check_op`: a factor
                                                below 0, a non-integer Posterize, ...)
rand_augment null (skipped when p < 1)          ``num_ops`` Identity ops, which replay to the same pixels
fewer ops than ``augment.num_ops``              padded with Identity ops
random_erase / mixup / cutmix, when applied     NOT reproducible: the sample is skipped, counted as
                                                ``unsupported_augmentation`` (DataCompDR-12M/-1B apply none)
==============================================  =============================================================

Crop frame. A window is in pixels of the image Apple embedded: DataComp's download, longest side <= 512
(``reference_max_side``). A joined image whose longest side is at most that is taken to be that same image and its
window is used as is. A larger one is taken to be the original-resolution image (fetched without DataComp's resize):
its reference size is recomputed as img2dataset/albumentations did (``round(side * 512 / longest)``) and the window
is scaled onto it (edges rounded, so within a pixel). A window outside its frame skips the sample
(``crop_outside_image``). Images fetched with any other resize cannot be told apart: set ``reference_max_side`` to
what they used, or None to take every window as is.

What replay does not reproduce bit for bit (the parameters map exactly, the pixels are close): Apple ran the crop
and ops on PIL images (PIL bicubic resize, PIL affine/rotate/enhance kernels) where `augment.replay_uint8` uses
torchvision's tensor kernels (antialiased bicubic); Apple dropped alpha (``convert("RGB")``) where clipdr composites
it onto white (DataComp images are re-encoded JPEGs, so no alpha); torchvision < 0.13 sheared by
``degrees(m)`` instead of ``degrees(atan(m))`` (0.14 degree apart at DataCompDR's 0.09). The stored teacher
embeddings describe Apple's pixels.

Embeddings. Each half is one teacher's open_clip output, L2-normalised by open_clip. Every half is checked and
renormalised in float32: a sample whose largest ``|norm - 1|`` exceeds ``norm_tolerance`` (default 0.02; bf16
storage stays well within it) is skipped as ``unnormalized_embeddings``, since that means a wrong teacher split or
corrupt data, not rounding; each sample reports its error (`DataCompDRSample.norm_error`), and the conversion records
the largest of every shard in its footer and logs it.

DataComp's uid. The ``json`` member's ``uid`` is kept in the nullable `records.UID` column (the manifest says
``has_uid``), null for a sample without one: the tar key is often just img2dataset's running number
(``000000000``), so the uid is the only way back to DataComp's metadata.

The conversion into a clipdr reinforced dataset (a Ray job, one task a shard) is `clipdr.reinforce.datacompdr`.

Shape suffixes: K views a sample, R = 1 + S text rows (real caption, then S synthetic ones), D one teacher's width,
E the concatenated width (the teachers' D summed).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import PIL.Image
import torch

from clipdr import augment, augparams, records
from clipdr.data import sources
from clipdr.data.sources import DEFAULT_READER_CONFIG, ReaderConfig, SkipReason
from clipdr.records import AugmentSpec, CaptionerSpec, TeacherSpec

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _vit_l14(name: str, pretrained: str) -> TeacherSpec:
    return TeacherSpec(
        name=name,
        model="ViT-L-14",
        pretrained=pretrained,
        embed_dim=768,
        logit_scale=100.0,
        image_size=224,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        interpolation="bicubic",
    )


DATACOMPDR_TEACHERS: tuple[TeacherSpec, ...] = (
    _vit_l14("openai", "openai"),
    _vit_l14("datacomp_xl", "datacomp_xl_s13b_b90k"),
)
"""DataCompDR's two teachers, in the order their 768-d halves are concatenated (``datacompdr12m.json``)."""

DATACOMPDR_CAPTIONER = CaptionerSpec(
    name="coca_vit_l14",
    kind="open_clip",
    model="coca_ViT-L-14",
    pretrained="mscoco_finetuned_laion2b_s13b_b90k",
    generation_type="top_p",
    top_p=0.9,
    temperature=1.0,
    max_len=30,  # open_clip CoCa.generate's default seq_len, which RayGen's call leaves alone
    seed=0,  # not published
)
"""The captioner of DataCompDR's synthetic captions (text cut at end-of-text and at the first ".")."""


def source_captioner(key: str) -> CaptionerSpec:
    """What the manifest records as the captioner of a source caption set other than ``syn_text`` (a part's
    ``captioner``): Apple's shards do not say which model wrote a set, so only its ``syn.json`` key is known (the
    name); the model is recorded as ``unrecorded`` rather than guessed from the key."""
    return CaptionerSpec(name=key, kind="open_clip", model="unrecorded", pretrained="")


DATACOMPDR_AUGMENT = AugmentSpec(
    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), num_ops=2, magnitude=9, num_magnitude_bins=31, hflip=0.0
)
"""torchvision's RandomResizedCrop and RandAugment defaults, no flip: what DataCompDR's views were drawn with."""

DATACOMP_MAX_SIDE = 512
"""Longest side of DataComp's image download (img2dataset ``keep_ratio_largest``, only if bigger)."""

# apple/ml-mobileclip(-dr) dr/transforms.py RandAugment.op_names: op_index in a record indexes this tuple.
DATACOMPDR_OP_NAMES: tuple[str, ...] = augparams.OP_NAMES  # Apple's dr/transforms.py keeps torchvision's order

# Transforms with random parameters, in the order Apple's Compose composes (and compresses) them.
_RECORD_ORDER = (
    "resize",
    "random_crop",
    "random_resized_crop",
    "random_horizontal_flip",
    "rand_augment",
    "random_erase",
    "mixup",
    "cutmix",
)
_SUPPORTED = ("random_resized_crop", "random_horizontal_flip", "rand_augment")
_UNSUPPORTED_WHEN_APPLIED = ("random_erase", "mixup", "cutmix")  # a null entry means "not applied to this view"
_MIXING = ("mixup", "cutmix")

PAUG_EXTENSION = "paug.json"
SYN_EXTENSION = "syn.json"
URL_EXTENSION = "url.txt"
NPZ_EXTENSION = "npz"
PTH_GZ_EXTENSION = "pth.gz"
_TEXT_MEMBERS = (PAUG_EXTENSION, SYN_EXTENSION, URL_EXTENSION, sources.CAPTION_EXTENSION, sources.META_EXTENSION)
_EMBEDDING_MEMBERS = (NPZ_EXTENSION, PTH_GZ_EXTENSION)  # in order of preference, as apple's preprocess_dr
SYN_TEXT_KEY = "syn_text"
"""The ``syn.json`` key of DataCompDR's one caption set, and of a RayGen set written without a tag: the ``default``
set of the imported dataset (the base shards' own synthetic captions)."""
_SYN_TEXT_TAGGED = "syn_text_"  # RayGen's ``syn_text{tag_suffix}``, e.g. ``syn_text_dfn_mscoco38k``
EMB_KEY_SUFFIX = "_emb"
"""A caption set's text embeddings: ``<syn.json key>_emb`` in the ``npz`` / ``pth.gz`` member (RayGen's
``{key}_emb``; Apple's trainer reads ``syn_text_i_key + "_emb"``)."""
_IMAGE_KEYS = ("image_emb", "image_emb{self.tag_suffix}")  # the second: RayGen's gen.py writes it literally
_MIN_NORM = 1e-6


class DataCompDRError(ValueError):
    """A mistake in how DataCompDR reading or conversion is called (a bad layout, a source without tar shards)."""


class DataCompDRSkipReason(StrEnum):
    """Why a DataCompDR sample was skipped, beyond `sources.SkipReason` (key, caption, image and shard checks).

    A sample without an image member counts as ``missing_image`` (`sources.SkipReason`) whatever else it lacks: it
    was not joined with its image, the common case for a raw DataCompDR shard.
    """

    MISSING_PAUG = "missing_paug"
    """No ``paug.json`` member."""
    INVALID_PAUG = "invalid_paug"
    """``paug.json`` is not JSON, has no ``param_aug`` list of K records, or a record has the wrong structure,
    a non-integer crop coordinate, an unknown op index, a non-finite magnitude or more ops than configured."""
    INVALID_MAGNITUDE = "invalid_magnitude"
    """A RandAugment magnitude that clipdr's replay cannot apply (`augparams.check_op`): a Brightness, Color,
    Contrast or Sharpness factor below 0, a Posterize that is not an integer 0..8, a Solarize threshold outside
    0..255. Checked here so that training never meets it."""
    UNSUPPORTED_AUGMENTATION = "unsupported_augmentation"
    """A view applied a transform clipdr's replay cannot reproduce (random erasing, mixup, cutmix)."""
    CROP_OUTSIDE_IMAGE = "crop_outside_image"
    """A crop window falls outside its reference frame: the joined image is not the one Apple embedded."""
    MISSING_SYN_CAPTIONS = "missing_syn_captions"
    """No ``syn.json`` member."""
    INVALID_SYN_CAPTIONS = "invalid_syn_captions"
    """``syn.json`` is not JSON, or a caption set imported is not a list of strings of its S_set."""
    MISSING_CAPTION_SET = "missing_caption_set"
    """A caption set imported (`DataCompDRLayout`: ``syn_text`` or one of ``caption_sets``) is absent from the
    sample's ``syn.json``, or its text embeddings (``<key>_emb``) from its embedding member: every row of an imported
    dataset has every set it lists, so the sample is left out."""
    MISSING_EMBEDDINGS = "missing_embeddings"
    """Neither an ``npz`` nor a ``pth.gz`` member."""
    INVALID_EMBEDDINGS = "invalid_embeddings"
    """The embedding member cannot be read (corrupt archive, not a dict of arrays, too large once decompressed),
    lacks ``image_emb`` / ``text_emb``, or holds non-finite or zero vectors."""
    EMBEDDING_SHAPE_MISMATCH = "embedding_shape_mismatch"
    """``image_emb`` is not (K, sum of teacher widths) or ``text_emb`` is not (1 + S, that width)."""
    UNNORMALIZED_EMBEDDINGS = "unnormalized_embeddings"
    """A teacher's half of an embedding has ``|norm - 1| > norm_tolerance``: a wrong teacher split or bad data."""


class DataCompDRSampleError(ValueError):
    """A DataCompDR sample that must be skipped; ``reason`` says why (a `DataCompDRSkipReason` or `SkipReason`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataCompDRError(message)


def caption_set_name(key: str) -> str:
    """The clipdr caption set of ``syn.json`` key ``key``: `SYN_TEXT_KEY` is `records.DEFAULT_CAPTION_SET`,
    ``syn_text_<tag>`` is ``<tag>`` lowercased with every run of other characters than letters and digits made one
    ``_`` (``syn_text_dfn_mscoco38k`` -> ``dfn_mscoco38k``, ``syn_text_dci-short`` -> ``dci_short``).

    Raises:
        DataCompDRError: ``key`` is not a caption set key, or its tag makes no valid set name (or ``default``).
    """
    if key == SYN_TEXT_KEY:
        return records.DEFAULT_CAPTION_SET
    _check(
        isinstance(key, str) and key.startswith(_SYN_TEXT_TAGGED) and len(key) > len(_SYN_TEXT_TAGGED),
        f"{key!r} is not a caption set key of Apple's syn.json ({SYN_TEXT_KEY!r} or '{_SYN_TEXT_TAGGED}<tag>')",
    )
    name = re.sub(r"[^a-z0-9]+", "_", key[len(_SYN_TEXT_TAGGED) :].lower()).strip("_")
    _check(name != records.DEFAULT_CAPTION_SET, f"syn.json key {key!r} would name the set of {SYN_TEXT_KEY!r}")
    try:
        return records.validate_caption_set_name(name)
    except records.RecordsError as e:
        raise DataCompDRError(f"syn.json key {key!r}: {e}") from None


def is_caption_set_key(key: Any) -> bool:
    """Whether a ``syn.json`` key holds a caption set (what Apple's trainer selects with its default
    ``^syn_text.*$``)."""
    return isinstance(key, str) and (key == SYN_TEXT_KEY or key.startswith(_SYN_TEXT_TAGGED))


@dataclass(frozen=True)
class DataCompDRLayout:
    """How a DataCompDR variant stores its samples; the defaults are DataCompDR-12M's.

    Attributes:
        num_augmentations: K, views a sample (30 for DataCompDR-12M, 10 for DataCompDR-1B).
        num_syn_captions: S, captions a sample of the ``syn_text`` set, imported as the ``default`` set (the base
            shards' ``syn_captions`` and rows 1..S of ``text_emb``); 0 leaves ``syn_text`` out (a DFNDR source without
            it, or a choice): the base is then an embeddings-only dataset and the sets are all parts.
        caption_sets: The source's other caption sets to import, ``(syn.json key, S_set)`` in import order, e.g.
            ``(("syn_text_dfn_mscoco38k", 5),)``; each becomes the caption set `caption_set_name` of its key, a
            ``captions`` part (`records.PartSpec`) laid out as ``reinforce.add = "captions"`` lays out a set.
        augment: The augmentation config the views were drawn with; ``num_ops`` is how many RandAugment ops a
            converted view holds.
        transforms: The transforms with random parameters in each ``param_aug`` record, in Apple's Compose order
            (module docstring); ``random_resized_crop`` is required.
        view_size: Side of the crop output RandAugment ran on, which its translate magnitudes are in pixels of.
        reference_max_side: Longest side of the images Apple embedded (the crop windows' frame); None takes every
            window in the joined image's own pixels.
        norm_tolerance: Largest ``|norm - 1|`` of a teacher's half accepted (and renormalised).
    """

    num_augmentations: int = 30
    num_syn_captions: int = 5
    caption_sets: tuple[tuple[str, int], ...] = ()
    augment: AugmentSpec = DATACOMPDR_AUGMENT
    transforms: tuple[str, ...] = ("random_resized_crop", "rand_augment")
    view_size: int = 224
    reference_max_side: int | None = DATACOMP_MAX_SIDE
    norm_tolerance: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))
        object.__setattr__(self, "caption_sets", tuple((k, n) for k, n in self.caption_sets))
        for name in ("num_augmentations", "num_syn_captions", "view_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        _check(self.num_augmentations >= 1, f"num_augmentations (K) must be >= 1, got {self.num_augmentations}")
        _check(self.num_syn_captions >= 0, f"num_syn_captions (S) must be >= 0, got {self.num_syn_captions}")
        for key, count in self.caption_sets:
            _check(key != SYN_TEXT_KEY, f"caption_sets: {SYN_TEXT_KEY!r} is the default set; num_syn_captions is its S")
            _check(
                isinstance(count, int) and not isinstance(count, bool) and count >= 1,
                f"caption_sets: {key!r} needs S_set >= 1 captions a sample, got {count!r}",
            )
        names = self.set_names
        _check(
            len(set(names)) == len(names), f"caption_sets {[k for k, _ in self.caption_sets]} name sets {names} twice"
        )
        _check(self.view_size >= 1, f"view_size must be >= 1, got {self.view_size}")
        _check(
            self.reference_max_side is None
            or (isinstance(self.reference_max_side, int) and self.reference_max_side >= 1),
            f"reference_max_side must be None or a positive integer, got {self.reference_max_side!r}",
        )
        _check(0.0 < self.norm_tolerance < 1.0, f"norm_tolerance must be in (0, 1), got {self.norm_tolerance!r}")
        try:
            augment.check_spec(self.augment)
        except ValueError as e:
            raise DataCompDRError(str(e)) from None
        unknown = [t for t in self.transforms if t not in _RECORD_ORDER]
        _check(not unknown, f"unknown transforms {unknown}; DataCompDR records can hold {list(_RECORD_ORDER)}")
        unreplayable = [t for t in self.transforms if t not in _SUPPORTED + _UNSUPPORTED_WHEN_APPLIED]
        _check(
            not unreplayable,
            f"transforms {unreplayable} change every view's geometry before the crop; clipdr's replay "
            "(crop, flip, RandAugment) cannot express them",
        )
        _check("random_resized_crop" in self.transforms, "transforms must include 'random_resized_crop'")
        _check(
            list(self.transforms) == sorted(set(self.transforms), key=_RECORD_ORDER.index),
            f"transforms must be distinct and in Apple's Compose order {list(_RECORD_ORDER)}, got {self.transforms}",
        )

    @property
    def set_names(self) -> tuple[str, ...]:
        """The clipdr names of `caption_sets`, in their order (`caption_set_name`)."""
        return tuple(caption_set_name(key) for key, _ in self.caption_sets)

    @property
    def has_mixing(self) -> bool:
        """Whether records start with the mixing partner's id (mixup or cutmix configured)."""
        return any(t in _MIXING for t in self.transforms)


DEFAULT_LAYOUT = DataCompDRLayout()


@dataclass(frozen=True)
class DataCompDRSample:
    """One joined DataCompDR sample, mapped onto clipdr's conventions.

    Attributes:
        key: The sample's key in its tar (unique within the shard).
        uid: DataComp's uid from the ``json`` member, None when absent.
        url: The image URL from ``url.txt``, None when absent.
        image_bytes: The joined image exactly as stored.
        image_ext: Format of ``image_bytes`` (``jpg``, ``png`` or ``webp``), from its content.
        caption: The real caption, stripped.
        syn_captions: The S synthetic captions, in ``text_emb`` row order.
        views: The K views in clipdr's convention; view k matches ``image_emb[t][k]``.
        image_emb: Teacher name -> float32 (K, D) image embeddings, L2-normalised.
        text_emb: Teacher name -> float32 (1 + S, D) text embeddings, L2-normalised; row 0 the real caption.
        norm_error: Largest ``|norm - 1|`` of the stored embeddings before renormalising.
        image: The decoded RGB image.
        set_captions: Caption set name -> its S_set captions, for each of the layout's ``caption_sets``.
        set_text_emb: Caption set name -> teacher name -> float32 (S_set, D) text embeddings of those captions,
            L2-normalised.
    """

    key: str
    uid: str | None
    url: str | None
    image_bytes: bytes
    image_ext: str
    caption: str
    syn_captions: tuple[str, ...]
    views: tuple[augparams.AugParams, ...]
    image_emb: dict[str, np.ndarray]
    text_emb: dict[str, np.ndarray]
    norm_error: float
    image: PIL.Image.Image | None = None
    set_captions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    set_text_emb: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


# --------------------------------------------------------------------------- augmentation params


@dataclass(frozen=True)
class RecordView:
    """One ``param_aug`` record, parsed, with magnitudes already in clipdr's convention.

    Attributes:
        window: ``(top, left, height, width)`` in pixels of the reference frame (the image Apple embedded).
        flip: Whether the view is flipped.
        ops: ``(op_index, magnitude)`` pairs, padded with Identity to ``augment.num_ops``.
    """

    window: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[int, float], ...]


def _skip(reason: str, detail: str = "") -> DataCompDRSampleError:
    return DataCompDRSampleError(reason, detail)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"{what} must be an integer, got {value!r}")
    return int(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"{what} must be a finite number, got {value!r}")
    return float(value)


def to_clipdr_magnitude(op_name: str, magnitude: float, view_size: int) -> float:
    """Turns a torchvision v1 RandAugment magnitude, as DataCompDR stores it, into clipdr's resolution-free one.

    Args:
        op_name: One of `DATACOMPDR_OP_NAMES`.
        magnitude: The signed value torchvision v1 applied on a ``view_size`` square view.
        view_size: Side of the view RandAugment ran on.

    Returns:
        The magnitude in `augment`'s convention (its module docstring).
    """
    if op_name in ("TranslateX", "TranslateY"):
        return magnitude / view_size
    if op_name == "Solarize":
        return magnitude / 255.0
    if op_name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    return magnitude


def _parse_ops(value: Any, num_ops: int, view_size: int) -> tuple[tuple[int, float], ...]:
    if value is None:  # RandAugment skipped this view (p < 1): Identity ops replay to the same pixels
        value = []
    if not isinstance(value, list):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"rand_augment entry must be a list of ops, got {value!r}")
    if len(value) > num_ops:
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"{len(value)} RandAugment ops, the layout allows {num_ops}")
    ops = []
    for position, op in enumerate(value):
        if not isinstance(op, list | tuple) or len(op) != 2:
            raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"op {position} must be [op_index, magnitude], got {op!r}")
        op_index = _integer(op[0], f"op {position} index")
        if not 0 <= op_index < len(DATACOMPDR_OP_NAMES):
            raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"op {position} index {op_index} is not a RandAugment op")
        name = DATACOMPDR_OP_NAMES[op_index]
        magnitude = to_clipdr_magnitude(name, _number(op[1], f"op {position} ({name}) magnitude"), view_size)
        try:
            augparams.check_op(
                augparams.OP_NAMES.index(name), magnitude
            )  # what replay enforces, so training replays it
        except ValueError as e:
            raise _skip(DataCompDRSkipReason.INVALID_MAGNITUDE, f"op {position}: {e}") from None
        ops.append((augparams.OP_NAMES.index(name), magnitude))
    ops += [(augparams.OP_NAMES.index("Identity"), 0.0)] * (num_ops - len(ops))
    return tuple(ops)


def parse_record(record: Any, layout: DataCompDRLayout = DEFAULT_LAYOUT) -> RecordView:
    """Parses one ``param_aug`` record (module docstring) into a `RecordView`.

    Raises:
        DataCompDRSampleError: ``invalid_paug`` for a record of the wrong structure or values,
            ``unsupported_augmentation`` when it applied random erasing, mixup or cutmix.
    """
    if not isinstance(record, list):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"a record must be a list, got {type(record).__name__}")
    values = list(record)
    if layout.has_mixing:
        if not values:
            raise _skip(DataCompDRSkipReason.INVALID_PAUG, "a record of a mixing layout lacks the partner id")
        if values.pop(0) is not None:
            raise _skip(DataCompDRSkipReason.UNSUPPORTED_AUGMENTATION, "the view mixes in another sample")
    if len(values) != len(layout.transforms):
        raise _skip(
            DataCompDRSkipReason.INVALID_PAUG,
            f"a record has {len(values)} entries, the layout {list(layout.transforms)} needs {len(layout.transforms)}",
        )
    entries = dict(zip(layout.transforms, values, strict=True))
    applied = [name for name in _UNSUPPORTED_WHEN_APPLIED if entries.get(name) is not None]
    if applied:
        raise _skip(DataCompDRSkipReason.UNSUPPORTED_AUGMENTATION, f"the view applied {applied}")
    crop = entries["random_resized_crop"]
    if not isinstance(crop, list | tuple) or len(crop) != 4:
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"random_resized_crop must be [top, left, h, w], got {crop!r}")
    window = tuple(
        _integer(v, f"crop {name}") for v, name in zip(crop, ("top", "left", "height", "width"), strict=True)
    )
    flip = entries.get("random_horizontal_flip", False)
    if not isinstance(flip, bool | int) or flip not in (0, 1):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, f"random_horizontal_flip must be a bool, got {flip!r}")
    ops = (
        _parse_ops(entries["rand_augment"], layout.augment.num_ops, layout.view_size)
        if "rand_augment" in entries
        else ((augparams.OP_NAMES.index("Identity"), 0.0),) * layout.augment.num_ops
    )
    return RecordView(window=window, flip=bool(flip), ops=ops)


def reference_size(image_size: tuple[int, int], reference_max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` of the image Apple embedded, given the joined image's ``(width, height)``.

    An image no larger than ``reference_max_side`` is that image; a larger one is its original-resolution source,
    scaled as img2dataset's ``keep_ratio_largest`` (albumentations ``longest_max_size``) does.
    """
    width, height = image_size
    if reference_max_side is None or max(width, height) <= reference_max_side:
        return width, height
    scale = reference_max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _scale_span(start: int, length: int, factor: float, limit: int) -> tuple[int, int]:
    """A 1-D span scaled by ``factor`` (edges rounded), kept inside ``[0, limit)`` and at least one pixel long."""
    first = min(round(start * factor), limit - 1)
    last = min(max(round((start + length) * factor), first + 1), limit)
    return first, last - first


def map_view(
    view: RecordView, image_size: tuple[int, int], layout: DataCompDRLayout = DEFAULT_LAYOUT
) -> augparams.AugParams:
    """The clipdr view of a parsed record, for a joined image of ``image_size`` ``(width, height)``.

    Raises:
        DataCompDRSampleError: ``crop_outside_image`` when the window does not fit its reference frame.
    """
    width, height = image_size
    ref_width, ref_height = reference_size(image_size, layout.reference_max_side)
    top, left, crop_h, crop_w = view.window
    if top < 0 or left < 0 or crop_h < 1 or crop_w < 1 or top + crop_h > ref_height or left + crop_w > ref_width:
        raise _skip(
            DataCompDRSkipReason.CROP_OUTSIDE_IMAGE,
            f"window (top, left, h, w) {view.window} outside the reference frame {ref_width}x{ref_height} "
            f"(joined image {width}x{height})",
        )
    if (ref_width, ref_height) != (width, height):
        top, crop_h = _scale_span(top, crop_h, height / ref_height, height)
        left, crop_w = _scale_span(left, crop_w, width / ref_width, width)
    try:
        return augparams.AugParams(top, left, crop_h, crop_w, view.flip, view.ops)
    except ValueError as e:
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, str(e)) from None


def parse_param_aug(paug: Any, layout: DataCompDRLayout = DEFAULT_LAYOUT) -> list[RecordView]:
    """Parses a decoded ``paug.json`` object into its K views.

    Raises:
        DataCompDRSampleError: ``invalid_paug`` / ``unsupported_augmentation``.
    """
    value = paug.get("param_aug") if isinstance(paug, dict) else None
    if isinstance(value, str):  # how the Hugging Face loader surfaces it
        value = _json(value.encode(), DataCompDRSkipReason.INVALID_PAUG)
    if not isinstance(value, list):
        raise _skip(DataCompDRSkipReason.INVALID_PAUG, "paug.json has no 'param_aug' list")
    if len(value) != layout.num_augmentations:
        raise _skip(
            DataCompDRSkipReason.INVALID_PAUG, f"{len(value)} views, the layout has K={layout.num_augmentations}"
        )
    return [parse_record(record, layout) for record in value]


# --------------------------------------------------------------------------- members


def _json(raw: bytes, reason: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _skip(reason, f"not JSON: {e}") from None


def _member(group: Mapping[str | None, Any], ext: str, missing: str, invalid: str) -> bytes:
    data = group.get(ext)
    if data is None:
        raise _skip(missing)
    if isinstance(data, sources.TooLarge):
        raise _skip(invalid, f"{ext} member of {data.num_bytes} bytes")
    return data


def _syn_json(group: Mapping[str | None, Any]) -> dict:
    """The decoded ``syn.json`` member: caption set key -> captions."""
    raw = _member(
        group, SYN_EXTENSION, DataCompDRSkipReason.MISSING_SYN_CAPTIONS, DataCompDRSkipReason.INVALID_SYN_CAPTIONS
    )
    data = _json(raw, DataCompDRSkipReason.INVALID_SYN_CAPTIONS)
    if not isinstance(data, dict):
        raise _skip(DataCompDRSkipReason.INVALID_SYN_CAPTIONS, "syn.json is not an object of caption sets")
    return data


def _captions(syn: dict, key: str, count: int) -> tuple[str, ...]:
    """Caption set ``key`` of a decoded ``syn.json``: ``count`` strings."""
    if key not in syn:
        raise _skip(DataCompDRSkipReason.MISSING_CAPTION_SET, f"syn.json lacks {key!r}; it has {sorted(syn)}")
    captions = syn[key]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise _skip(DataCompDRSkipReason.INVALID_SYN_CAPTIONS, f"syn.json {key!r} is not a list of strings")
    if len(captions) != count:
        raise _skip(DataCompDRSkipReason.INVALID_SYN_CAPTIONS, f"{len(captions)} captions in {key!r}, S={count}")
    return tuple(captions)


def caption_sets_of(syn_json: bytes) -> dict[str, int]:
    """The caption sets a sample's ``syn.json`` member holds: key -> number of captions, ``syn_text`` first, then the
    others sorted by key; empty when the member does not decode to an object of lists of strings.
    """
    try:
        data = json.loads(syn_json)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    found = {
        key: len(value)
        for key, value in data.items()
        if is_caption_set_key(key) and isinstance(value, list) and value and all(isinstance(c, str) for c in value)
    }
    return dict(sorted(found.items(), key=lambda item: (item[0] != SYN_TEXT_KEY, item[0])))


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """gzip-decompresses at most ``max_bytes`` (a member is untrusted: no decompression bombs)."""
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"pth.gz: {e}") from None
    if len(out) > max_bytes or decompressor.unconsumed_tail:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"pth.gz expands past {max_bytes} bytes")
    if not decompressor.eof:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, "pth.gz is truncated")
    return out


_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError)


def _load_npz(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except _NPZ_ERRORS as e:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"npz: {type(e).__name__}: {e}") from None
    if expanded > max_bytes:  # the member is untrusted: no decompression bombs
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"npz expands to {expanded} bytes")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except _NPZ_ERRORS as e:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"npz: {type(e).__name__}: {e}") from None


def _load_pth_gz(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    raw = _gunzip(data, max_bytes)
    try:
        # weights_only: the member is untrusted, and plain tensors in a dict are all it may hold.
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # torch.load raises many types on garbage: UnpicklingError, RuntimeError, EOFError, ...
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"pth.gz: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, "pth.gz does not hold a dict of tensors")
    return {str(name): tensor.float().numpy() for name, tensor in obj.items()}


def _raw_embeddings(
    group: Mapping[str | None, Any], max_bytes: int, layout: DataCompDRLayout
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(image_KE, text_RE, sets)`` as stored, float32: R = 1 + S rows of text (the real caption, then ``syn_text``'s
    S when imported: row 0 alone when it is not), and each of ``layout.caption_sets``' (S_set, E) rows by key."""
    ext = next((e for e in _EMBEDDING_MEMBERS if e in group), None)
    if ext is None:
        raise _skip(DataCompDRSkipReason.MISSING_EMBEDDINGS)
    data = _member(group, ext, DataCompDRSkipReason.MISSING_EMBEDDINGS, DataCompDRSkipReason.INVALID_EMBEDDINGS)
    arrays = _load_npz(data, max_bytes) if ext == NPZ_EXTENSION else _load_pth_gz(data, max_bytes)
    image = next((arrays[k] for k in _IMAGE_KEYS if k in arrays), None)
    text = arrays.get("text_emb")
    if image is None or text is None:
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"{ext} lacks image_emb / text_emb: {sorted(arrays)}")
    missing = [key + EMB_KEY_SUFFIX for key, _ in layout.caption_sets if key + EMB_KEY_SUFFIX not in arrays]
    if missing:
        raise _skip(DataCompDRSkipReason.MISSING_CAPTION_SET, f"{ext} lacks {missing}: it has {sorted(arrays)}")
    syn_key = SYN_TEXT_KEY + EMB_KEY_SUFFIX
    try:
        image_KE, text_RE = np.asarray(image, np.float32), np.asarray(text, np.float32)
        if layout.num_syn_captions == 0:  # row 0 is the real caption in both layouts (Apple's text_emb_all[capi])
            text_RE = text_RE[:1]
        elif syn_key in arrays:  # RayGen's split layout: 1 real row + S synthetic rows
            text_RE = np.concatenate([text_RE, np.asarray(arrays[syn_key], np.float32)])
        sets = {key: np.asarray(arrays[key + EMB_KEY_SUFFIX], np.float32) for key, _ in layout.caption_sets}
    except (ValueError, TypeError) as e:
        raise _skip(DataCompDRSkipReason.EMBEDDING_SHAPE_MISMATCH, f"{ext}: {e}") from None
    return image_KE, text_RE, sets


def split_embeddings(
    embeddings: np.ndarray, teachers: Sequence[TeacherSpec], norm_tolerance: float
) -> tuple[dict[str, np.ndarray], float]:
    """Splits concatenated (R, E) embeddings into per-teacher (R, D) halves and renormalises each.

    Args:
        embeddings: Rows of the teachers' embeddings concatenated in ``teachers`` order.
        teachers: Their specs; ``embed_dim`` gives each part's width.
        norm_tolerance: Largest ``|norm - 1|`` accepted.

    Returns:
        Teacher name -> float32 (R, D) unit rows, and the largest ``|norm - 1|`` found.

    Raises:
        DataCompDRSampleError: ``embedding_shape_mismatch``, ``invalid_embeddings`` (non-finite or zero rows) or
            ``unnormalized_embeddings``.
    """
    widths = [t.embed_dim for t in teachers]
    if embeddings.ndim != 2 or embeddings.shape[1] != sum(widths):
        raise _skip(
            DataCompDRSkipReason.EMBEDDING_SHAPE_MISMATCH,
            f"shape {embeddings.shape}, the teachers' widths {widths} add up to {sum(widths)}",
        )
    if not np.isfinite(embeddings).all():
        raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, "non-finite values")
    parts, worst = {}, 0.0
    for spec, part_RD in zip(teachers, np.split(embeddings, np.cumsum(widths)[:-1], axis=1), strict=True):
        norms_R = np.linalg.norm(part_RD, axis=1, keepdims=True)
        if (norms_R < _MIN_NORM).any():
            raise _skip(DataCompDRSkipReason.INVALID_EMBEDDINGS, f"teacher {spec.name!r}: zero vector")
        error = float(np.abs(norms_R - 1.0).max())
        if error > norm_tolerance:
            raise _skip(
                DataCompDRSkipReason.UNNORMALIZED_EMBEDDINGS,
                f"teacher {spec.name!r}: |norm - 1| = {error:.4f} > {norm_tolerance}",
            )
        worst = max(worst, error)
        parts[spec.name] = np.ascontiguousarray(part_RD / norms_R, dtype=np.float32)
    return parts, worst


# --------------------------------------------------------------------------- reading


def _iter_groups(uri: str, config: ReaderConfig) -> Iterator[tuple[str, dict[str | None, Any]]]:
    """`sources.iter_tar_groups` keeping the DataCompDR members too (embeddings may be as large as images)."""
    wanted = frozenset({*sources.IMAGE_EXTENSIONS, *_TEXT_MEMBERS, *_EMBEDDING_MEMBERS})
    large = frozenset({*sources.IMAGE_EXTENSIONS, *_EMBEDDING_MEMBERS})
    return sources.iter_tar_groups(uri, config, wanted=wanted, large_extensions=large)


def _text(raw: Any) -> str | None:
    if not isinstance(raw, bytes):
        return None
    try:
        return raw.decode("utf-8-sig").strip() or None
    except UnicodeDecodeError:
        return None


def _build(
    key: str,
    group: Mapping[str | None, Any],
    teachers: Sequence[TeacherSpec],
    layout: DataCompDRLayout,
    config: ReaderConfig,
) -> DataCompDRSample:
    """One sample from its members; the checks run cheapest first, the image decode last."""
    if None in group:
        raise _skip(SkipReason.DUPLICATE_KEY, key)
    image_ext = next((ext for ext in sources.IMAGE_EXTENSIONS if ext in group), None)
    if image_ext is None:
        raise _skip(SkipReason.MISSING_IMAGE, "no image member: not joined with its image")
    raw_paug = _member(group, PAUG_EXTENSION, DataCompDRSkipReason.MISSING_PAUG, DataCompDRSkipReason.INVALID_PAUG)
    record_views = parse_param_aug(_json(raw_paug, DataCompDRSkipReason.INVALID_PAUG), layout)
    syn = _syn_json(group) if layout.num_syn_captions or layout.caption_sets else {}
    syn_captions = _captions(syn, SYN_TEXT_KEY, layout.num_syn_captions) if layout.num_syn_captions else ()
    set_captions = {
        name: _captions(syn, key, count)
        for name, (key, count) in zip(layout.set_names, layout.caption_sets, strict=True)
    }
    image_KE, text_RE, set_RE = _raw_embeddings(group, config.max_image_bytes, layout)
    num_rows = {"image_emb": (image_KE, layout.num_augmentations), "text_emb": (text_RE, 1 + layout.num_syn_captions)}
    num_rows |= {key + EMB_KEY_SUFFIX: (set_RE[key], count) for key, count in layout.caption_sets}
    for name, (array, rows) in num_rows.items():
        if array.ndim != 2 or array.shape[0] != rows:
            raise _skip(DataCompDRSkipReason.EMBEDDING_SHAPE_MISMATCH, f"{name} has shape {array.shape}, {rows} rows")
    image_emb, image_error = split_embeddings(image_KE, teachers, layout.norm_tolerance)
    text_emb, text_error = split_embeddings(text_RE, teachers, layout.norm_tolerance)
    set_text_emb, set_error = {}, 0.0
    for name, (set_key, _) in zip(layout.set_names, layout.caption_sets, strict=True):
        set_text_emb[name], error = split_embeddings(set_RE[set_key], teachers, layout.norm_tolerance)
        set_error = max(set_error, error)
    try:
        source = sources.build_sample(
            key, group[image_ext], group.get(sources.CAPTION_EXTENSION), group.get(sources.META_EXTENSION), config
        )
    except sources.InvalidSampleError as e:
        raise _skip(e.reason, str(e).partition(": ")[2]) from None
    assert source.image is not None, "sources.build_sample decodes the image"
    views = tuple(map_view(view, source.image.size, layout) for view in record_views)
    uid = source.meta.get("uid")
    return DataCompDRSample(
        key=key,
        uid=str(uid) if uid is not None else None,
        url=_text(group.get(URL_EXTENSION)),
        image_bytes=source.image_bytes,
        image_ext=source.image_ext,
        caption=source.caption,
        syn_captions=syn_captions,
        views=views,
        image_emb=image_emb,
        text_emb=text_emb,
        norm_error=max(image_error, text_error, set_error),
        image=source.image,
        set_captions=set_captions,
        set_text_emb=set_text_emb,
    )


def find_caption_sets(uri: str, config: ReaderConfig = DEFAULT_READER_CONFIG, max_samples: int = 64) -> dict[str, int]:
    """The caption sets of a source, as its first sample with a readable ``syn.json`` in shard ``uri`` holds them
    (`caption_sets_of`: key -> S_set, ``syn_text`` first); empty when none of its first ``max_samples`` has one.

    A source's samples share their sets (Apple's generators write every key for every sample of a run); a sample
    that lacks one of those imported is skipped (``missing_caption_set``), so a conversion lists each set once, up
    front, for every shard.
    """
    try:
        for i, (_, group) in enumerate(_iter_groups(uri, config)):
            raw = group.get(SYN_EXTENSION)
            found = caption_sets_of(raw) if isinstance(raw, bytes) else {}
            if found or i + 1 >= max_samples:
                return found
    except (sources.UnreadableShardError, sources.BrokenShardError) as e:
        logger.warning("cannot read the caption sets of %s: %s", uri, e)
    return {}


def iter_shard(
    uri: str,
    skipped: collections.Counter,
    *,
    teachers: Sequence[TeacherSpec] = DATACOMPDR_TEACHERS,
    layout: DataCompDRLayout = DEFAULT_LAYOUT,
    config: ReaderConfig = DEFAULT_READER_CONFIG,
) -> Iterator[DataCompDRSample]:
    """Streams the valid samples of one joined DataCompDR tar shard (local or ``s3://``), counting what it skips.

    Args:
        uri: A ``.tar`` (``.tar.gz``, ``.tgz``) shard.
        skipped: Incremented by reason (`DataCompDRSkipReason`, `sources.SkipReason`) for every skipped sample and
            for an unreadable or broken shard; never raises for bad data.
        teachers: The teachers whose embeddings are concatenated, in order.
        layout: K, S, the record layout and the crop frame.
        config: Size limits (``max_text_bytes`` bounds the JSON and text members, ``max_image_bytes`` the image
            and embedding members, also once decompressed).

    Yields:
        Samples in shard order.
    """
    _check(len(teachers) >= 1, "at least one teacher is needed to split the embeddings")
    seen: set[str] = set()
    try:
        for key, group in _iter_groups(uri, config):
            try:
                if key in seen:
                    raise _skip(SkipReason.DUPLICATE_KEY, key)
                seen.add(key)
                sample = _build(key, group, teachers, layout, config)
            except DataCompDRSampleError as e:
                skipped[str(e.reason)] += 1
                logger.debug("skipping %s in %s: %s", key, uri, e)
                continue
            yield sample
    except sources.UnreadableShardError as e:
        skipped[str(SkipReason.UNREADABLE_SHARD)] += 1
        logger.warning("skipping unreadable DataCompDR shard %s: %s", uri, e)
    except sources.BrokenShardError as e:
        skipped[str(SkipReason.BROKEN_TAR)] += 1
        logger.warning("DataCompDR shard %s is broken, keeping the samples before the break: %s", uri, e)
