"""The reinforced record: the Parquet schema of a reinforced shard and the manifest beside the shards.

This module is the contract between the reinforcement job (writes) and the training job (reads); no other
module spells a column name. A reinforced dataset is a directory (local or ``s3://``)::

    <dataset>/manifest.json          written LAST, and only describing complete shards
    <dataset>/<shard>.parquet ...    one row per sample, paths relative to the directory

Columns of a shard (N rows; K views a sample, S synthetic captions, D a teacher's embedding width, L the
length of one encoded view, `augparams.encoded_length`)::

    key                      string                                   unique id of the sample in its source
    image                    binary                                   encoded image bytes (dataset is self-contained)
    image_ext                string                                   "jpg", "png", "webp", ... (lowercase, no dot)
    caption                  string                                   the real caption
    uid                      string, nullable                         the source's own id of the sample, e.g.
                                                                      DataComp's uid (only with ``has_uid``)
    syn_captions             fixed_size_list<string, S>               synthetic captions (absent when S = 0)
    aug_params               fixed_size_list<fixed_size_list<float32, L>, K>   `augparams.AugParams.to_array` per view
    image_emb__<teacher>     fixed_size_list<fixed_size_list<float16, D>, K>   one row per view
    text_emb__<teacher>      fixed_size_list<fixed_size_list<float16, D>, 1+S> row 0 the real caption, rows 1..S
                                                                      the synthetic captions in `syn_captions` order

Layout versions (`SCHEMA_VERSIONS`; the manifest's ``schema_version`` says which; new datasets are written as
`SCHEMA_VERSION`). The table above is version 1, and it stays the *record layout*: the columns `build_table` takes
and the accessors (`image_embeddings`, `text_embeddings`, `aug_params`, `stacked`) give, whatever the version, so
writers and readers of whole records do not see the version. Version 2 (`VIEW_MAJOR`) stores each row of a
per-view or per-text-row column (`is_row_major`: ``aug_params``, every ``image_emb__<t>``, ``text_emb__<t>`` and a
caption set's ``text_emb__<t>__<set>``) as a column of its own, ``<column>__<row>`` (`row_column`)::

    aug_params__<k>          fixed_size_list<float32, L>   view k's parameters, k in [0, K)
    image_emb__<t>__<k>      fixed_size_list<float16, D>   teacher t's embedding of view k
    text_emb__<t>__<r>       fixed_size_list<float16, D>   row r of text_emb__<t>, r in [0, 1+S)
    text_emb__<t>__<set>__<r> fixed_size_list<float16, D>  row r of an added caption set's embeddings (a part)

because Parquet reads a column chunk whole: training uses one view and one synthetic caption of a sample an epoch,
and in version 1 it fetched all K views and 1 + S text rows to use one of each (10x the bytes it used at
DataCompDR's layout; 1.04x in version 2: docs/bench/train.md). `drawn_columns` gives the columns of one drawn
(view, caption); `read_shard_with_parts` also takes record-layout names and stacks their rows back. Synthetic
captions stay one list column: a few hundred bytes a sample, read whole. Version 1 datasets stay readable and
trainable; a part takes its dataset's version.

Every field but ``uid`` is non-nullable. ``uid`` exists only in datasets whose manifest says ``has_uid`` (a
DataCompDR conversion: it is how users join back to DataComp's metadata), and is null for a sample whose source
gave none; a manifest without ``has_uid`` (every dataset written before the column existed) omits the key, so
their bytes and fingerprints are unchanged. Embeddings are L2-normalised fp16, one column per teacher, so a
teacher can be added (its two columns appended to every shard) without recomputing the others.

Why nested fixed-size lists of float16 for embeddings. The shape (K, D) lives in the Arrow type itself, so a
shard's footer alone says whether it fits a manifest, no field-metadata convention has to survive Ray Data or
other tools, and a column turns into an ``(N, K, D)`` numpy view without copying (two ``flatten`` calls,
`image_embeddings`). Parquet stores float16 as its FLOAT16 logical type, so the values stay typed for any
reader. Measured with pyarrow 25 on 1000 rows of K=30, D=768 (46 MB, one core): without dictionary encoding
or compression the column decodes in ~0.12-0.15 s; a flat ``fixed_size_list<float16, K*D>`` decodes ~15 %
faster (one repetition level less) but needs the shape in field metadata; ``fixed_size_binary`` decodes ~10x
faster but is opaque bytes to every other tool; pyarrow's default dictionary encoding is ~4-5x slower (fp16
has too many distinct values); zstd saves ~8 % at ~1.3x the decode time. Next to the JPEG decode and view
replay of training (milliseconds a sample) ~0.15 ms a sample of embedding decode is noise, so the typed,
self-describing layout wins. `write_shard` turns dictionary encoding off for embeddings and image bytes,
leaves them uncompressed by default (the image bytes are compressed already) and uses zstd for text.

Shape suffixes: N rows, K views a sample, S synthetic captions, D embedding width, L encoded view length.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import difflib
import json
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdr import __version__, augparams, config, storage
from clipdr.config import AugmentConfig

SCHEMA_VERSION = 2  # what new datasets are written as
SCHEMA_VERSIONS = (1, 2)  # what this code reads (module docstring, "Layout versions")
VIEW_MAJOR = 2  # the first version that stores each view and text row in a column of its own
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".parquet"

KEY = "key"
IMAGE = "image"
IMAGE_EXT = "image_ext"
CAPTION = "caption"
UID = "uid"
SYN_CAPTIONS = "syn_captions"
AUG_PARAMS = "aug_params"
IMAGE_EMB_PREFIX = "image_emb__"
TEXT_EMB_PREFIX = "text_emb__"
SYN_CAPTIONS_PREFIX = "syn_captions__"  # a caption set's column: syn_captions__<set>
DEFAULT_CAPTION_SET = "default"  # the base shards' own synthetic captions (`SYN_CAPTIONS`)
PARTS_DIR = "parts"  # <dataset>/parts/<part>/<base shard path>: a part's row-aligned sidecar files
PART_KINDS = ("captions", "teacher")
SHARD_METADATA_KEY = b"clipdr.reinforce"  # Parquet footer metadata of a written shard or part file: provenance

NORM_TOLERANCE = 0.02  # |norm - 1| allowed for a stored embedding: fp16 rounding plus bf16/fp16 teacher math
_TEACHER_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_MAX_TEACHER_NAME = 48
_IMAGE_EXT_VALUE = re.compile(r"[a-z0-9]+")
_FOOTER_READERS = 16  # concurrent footer reads in `open_dataset` (S3 latency, not CPU, is the cost)


class RecordsError(ValueError):
    """A reinforced dataset, shard or manifest that does not fit the contract, or a caller's wrong input."""


class RecordsWarning(UserWarning):
    """Something harmless but suspicious in a reinforced dataset (e.g. parquet files the manifest does not list)."""


# --------------------------------------------------------------------------- column names


def validate_teacher_name(name: str) -> str:
    """Returns ``name`` if it can name a teacher's columns; raises RecordsError otherwise.

    Teacher names are lowercase identifiers with single underscores (``openai``, ``datacomp_xl``,
    ``dfn2b_l14``): column names stay valid SQL identifiers, cannot collide in case-insensitive engines, and
    ``__`` separates the prefix from the name without ambiguity.
    """
    if not isinstance(name, str) or len(name) > _MAX_TEACHER_NAME or not _TEACHER_NAME.fullmatch(name):
        raise RecordsError(
            f"invalid teacher name {name!r}: use a lowercase identifier of at most {_MAX_TEACHER_NAME} "
            "characters, letters and digits joined by single underscores, starting with a letter "
            "(e.g. 'openai', 'datacomp_xl')"
        )
    return name


def image_emb_column(teacher: str) -> str:
    """Name of the column holding ``teacher``'s (K, D) image embeddings."""
    return IMAGE_EMB_PREFIX + validate_teacher_name(teacher)


def text_emb_column(teacher: str) -> str:
    """Name of the column holding ``teacher``'s (1+S, D) text embeddings."""
    return TEXT_EMB_PREFIX + validate_teacher_name(teacher)


def validate_caption_set_name(name: str) -> str:
    """Returns ``name`` if it can name a caption set (the rules of teacher names, `validate_teacher_name`)."""
    if not isinstance(name, str) or len(name) > _MAX_TEACHER_NAME or not _TEACHER_NAME.fullmatch(name):
        raise RecordsError(
            f"invalid caption set name {name!r}: use a lowercase identifier of at most {_MAX_TEACHER_NAME} "
            "characters, letters and digits joined by single underscores, starting with a letter (e.g. 'coca_beam')"
        )
    return name


def syn_captions_column(caption_set: str) -> str:
    """Name of the column holding caption set ``caption_set``'s (S_set,) captions (`SYN_CAPTIONS` for the default)."""
    if caption_set == DEFAULT_CAPTION_SET:
        return SYN_CAPTIONS
    return SYN_CAPTIONS_PREFIX + validate_caption_set_name(caption_set)


def is_syn_captions_column(name: str) -> bool:
    """Whether column ``name`` holds synthetic captions (the base's `SYN_CAPTIONS` or a caption set's)."""
    return name == SYN_CAPTIONS or name.startswith(SYN_CAPTIONS_PREFIX)


def set_text_emb_column(teacher: str, caption_set: str) -> str:
    """Name of the column holding ``teacher``'s (S_set, D) text embeddings of caption set ``caption_set`` (not the
    default set: its embeddings are rows 1..S of `text_emb_column`)."""
    _check(caption_set != DEFAULT_CAPTION_SET, "the default caption set's text embeddings are in text_emb__<teacher>")
    return f"{text_emb_column(teacher)}__{validate_caption_set_name(caption_set)}"


_ROW_INDEX = re.compile(r"0|[1-9][0-9]*")
_ROW_SUFFIX = re.compile(r"__(?:0|[1-9][0-9]*)$")


def row_column(column: str, row: int) -> str:
    """Name of the stored column holding row ``row`` of per-row column ``column`` in a view-major dataset
    (`VIEW_MAJOR`): ``aug_params__3``, ``image_emb__openai__3``, ``text_emb__openai__0``, ``text_emb__openai__beam__2``.

    The suffix is ``__`` and the row's decimal digits. Teacher and caption set names start with a letter and hold no
    ``__`` (`validate_teacher_name`), so no teacher's or caption set's column can end that way: ``text_emb__t__2`` is
    row 2 of ``text_emb__t``, never a caption set named ``2``, and every name stays a plain SQL identifier.
    """
    _check(is_row_major(column), f"column {column!r} has no rows of its own to store apart")
    _check(_is_int(row) and row >= 0, f"row must be an integer >= 0, got {row!r}")
    return f"{column}__{row}"


def is_row_major(column: str) -> bool:
    """Whether ``column`` (a name of the record layout: `Manifest.record_schema`) is one whose rows a view-major
    dataset stores as columns of their own: `AUG_PARAMS` and every teacher's embeddings."""
    if column == AUG_PARAMS:
        return True
    return column.startswith((IMAGE_EMB_PREFIX, TEXT_EMB_PREFIX)) and not _ROW_SUFFIX.search(column)


def record_column(column: str) -> str:
    """The record-layout column a stored column belongs to: ``image_emb__t`` for ``image_emb__t__3`` (`row_column`),
    ``column`` itself otherwise."""
    base, _, row = column.rpartition("__")
    return base if base and _ROW_INDEX.fullmatch(row) and is_row_major(base) else column


def part_name(kind: str, what: str) -> str:
    """A part's name (its folder under `PARTS_DIR`): ``captions__<set>`` or ``teacher__<teacher>``."""
    _check(kind in PART_KINDS, f"unknown part kind {kind!r}; known: {PART_KINDS}")
    validate = validate_caption_set_name if kind == "captions" else validate_teacher_name
    return f"{kind}__{validate(what)}"


def part_file(part: str, shard_path: str) -> str:
    """Path, relative to the dataset directory, of part ``part``'s file for the base shard ``shard_path``."""
    return f"{PARTS_DIR}/{part}/{shard_path}"


# --------------------------------------------------------------------------- specs and manifest


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecordsError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AugmentSpec:
    """How a dataset's views were sampled (`augment.sample`): the manifest's ``augment`` object.

    The run config's `config.AugmentConfig` converts to it at the boundary (`from_config`), field by field, so
    renaming a config field fails there instead of silently changing the bytes of every new manifest. The field
    names and their order are the JSON's. Defaults are torchvision's RandomResizedCrop and RandAugment, no flip.

    Attributes:
        scale: RandomResizedCrop range of the crop's area fraction.
        ratio: RandomResizedCrop range of the crop's aspect ratio.
        num_ops: RandAugment operations a view; fixes L, the length of an encoded view.
        magnitude: RandAugment magnitude bin.
        num_magnitude_bins: RandAugment magnitude bins.
        hflip: Probability of a horizontal flip.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    hflip: float = 0.0

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> AugmentSpec:
        """The spec of a run config's ``augment`` section."""
        return cls(
            scale=cfg.scale,
            ratio=cfg.ratio,
            num_ops=cfg.num_ops,
            magnitude=cfg.magnitude,
            num_magnitude_bins=cfg.num_magnitude_bins,
            hflip=cfg.hflip,
        )


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher CLIP model whose embeddings a dataset stores.

    Attributes:
        name: Label of the teacher in column names (`validate_teacher_name`), e.g. ``openai``.
        model: open_clip architecture name, e.g. ``ViT-L-14``.
        pretrained: open_clip pretrained tag, ``hf-hub:`` id or weights file.
        embed_dim: D, the width of its embeddings.
        logit_scale: The model's own learned inverse temperature, exp(t) (the loss may use another a_k).
        image_size: Side of the square views it embedded, in pixels.
        mean: Per-channel normalisation mean of its preprocessing.
        std: Per-channel normalisation std of its preprocessing.
        interpolation: Resize interpolation of its preprocessing (``bicubic``, ``bilinear``, ...).
        precision: What its forwards computed in (`config.TeacherPrecision`): ``auto`` (fp32 weights, bf16 autocast
            on CUDA) or ``bf16`` (bf16 weights and activations). Written only when not ``auto``, so manifests and
            fingerprints from before it existed are unchanged.
    """

    name: str
    model: str
    pretrained: str
    embed_dim: int
    logit_scale: float
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    precision: str = field(default="auto", metadata={config.OMIT_DEFAULT: True})

    def __post_init__(self) -> None:
        validate_teacher_name(self.name)
        where = f"teacher {self.name!r}"
        _check(bool(self.model), f"{where}: model must name an open_clip architecture")
        _check(
            _is_int(self.embed_dim) and self.embed_dim >= 1, f"{where}: embed_dim must be >= 1, got {self.embed_dim!r}"
        )
        _check(_is_int(self.image_size) and self.image_size >= 1, f"{where}: image_size must be >= 1")
        _check(self.logit_scale > 0, f"{where}: logit_scale must be > 0, got {self.logit_scale!r}")
        _check(len(self.mean) == 3 and len(self.std) == 3, f"{where}: mean and std need 3 channels each")
        _check(all(s > 0 for s in self.std), f"{where}: std must be > 0, got {self.std!r}")
        precisions = typing.get_args(config.TeacherPrecision)
        _check(self.precision in precisions, f"{where}: precision must be one of {precisions}, got {self.precision!r}")


@dataclass(frozen=True)
class CaptionerSpec:
    """The model that wrote a dataset's synthetic captions, and how it sampled them.

    Attributes:
        name: Free-form label, e.g. ``coca_l14``.
        kind: Implementation: ``open_clip`` (a CoCa model's ``generate``) or ``synthetic`` (the built-in world).
        model: Architecture name, e.g. ``coca_ViT-L-14``.
        pretrained: Pretrained tag, ``hf-hub:`` id or weights file.
        generation_type: Decoding: ``top_p``, ``top_k`` or ``beam_search``.
        top_p: Nucleus mass for ``top_p`` sampling.
        temperature: Softmax temperature of sampling.
        max_len: Most tokens a caption may have.
        seed: Seed of the sampling.
    """

    name: str
    kind: str
    model: str
    pretrained: str
    generation_type: str = "top_p"
    top_p: float = 0.9
    temperature: float = 1.0
    max_len: int = 76
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"captioner {self.name!r}"
        _check(bool(self.name) and bool(self.kind), f"{where}: name and kind must be non-empty")
        _check(0.0 < self.top_p <= 1.0, f"{where}: top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.temperature > 0, f"{where}: temperature must be > 0, got {self.temperature!r}")
        _check(_is_int(self.max_len) and self.max_len >= 1, f"{where}: max_len must be >= 1, got {self.max_len!r}")


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard of a dataset.

    Attributes:
        path: Path relative to the dataset directory, ``/``-separated, ending in ``.parquet``.
        num_rows: Rows in the shard (equal to its Parquet footer's count).
    """

    path: str
    num_rows: int

    def __post_init__(self) -> None:
        parts = self.path.split("/") if isinstance(self.path, str) else []
        _check(
            bool(parts)
            and self.path.endswith(SHARD_SUFFIX)
            and "\\" not in self.path
            and "://" not in self.path
            and all(part and part not in (".", "..") and not part.startswith((".", "_")) for part in parts),
            f"shard path {self.path!r} must be relative, '/'-separated, free of '..' and hidden ('.', '_') parts, "
            f"and end in {SHARD_SUFFIX}",
        )
        _check(_is_int(self.num_rows) and self.num_rows >= 0, f"shard {self.path!r}: num_rows must be >= 0")


@dataclass(frozen=True)
class PartSpec:
    """A part added to a complete dataset after its base shards: one Parquet file a base shard, at
    `part_file` ``(name, shard path)``, holding `KEY` and the part's columns in the base shard's row order (a join by
    position, checked by key when read: `read_shard_with_parts`).

    Attributes:
        name: `part_name` of its kind and of what it adds, e.g. ``captions__coca_beam``, ``teacher__dfn``.
        kind: ``captions``: a caption set (`syn_captions_column`) and every teacher's text embeddings of it
            (`set_text_emb_column`); ``teacher``: a teacher's image and text embeddings (`image_emb_column`,
            `text_emb_column`: K and 1 + S rows, as a base teacher's) and its text embeddings of each caption set
            listed before it.
        fingerprint: Of the settings and the base that made it; every file of the part carries it in its footer.
        caption_set: The set a captions part adds ("" for a teacher part).
        num_syn_captions: S_set, captions a row of that set (0 for a teacher part).
        captioner: What wrote the set (captions parts only).
        teacher: The teacher a teacher part adds (teacher parts only).
        teachers: Teachers whose text embeddings of the set a captions part holds, in column order.
        caption_sets: Caption sets whose text embeddings a teacher part holds, in column order.
        shards: One file a base shard, in the manifest's shard order.
    """

    name: str
    kind: str
    fingerprint: str
    caption_set: str = ""
    num_syn_captions: int = 0
    captioner: CaptionerSpec | None = None
    teacher: TeacherSpec | None = None
    teachers: tuple[str, ...] = ()
    caption_sets: tuple[str, ...] = ()
    shards: tuple[ShardInfo, ...] = ()

    def __post_init__(self) -> None:
        for name in ("teachers", "caption_sets", "shards"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self.kind in PART_KINDS, f"part {self.name!r}: unknown kind {self.kind!r}; known: {PART_KINDS}")
        if self.kind == "captions":
            _check(
                self.captioner is not None and self.teacher is None and not self.caption_sets,
                f"part {self.name!r}: a captions part records its captioner, and no teacher or caption_sets",
            )
            _check(
                _is_int(self.num_syn_captions) and self.num_syn_captions >= 1,
                f"part {self.name!r}: num_syn_captions must be >= 1, got {self.num_syn_captions!r}",
            )
            expected = part_name("captions", self.caption_set)
            for teacher in self.teachers:
                validate_teacher_name(teacher)
        else:
            _check(
                self.teacher is not None and self.captioner is None and not self.teachers,
                f"part {self.name!r}: a teacher part records its teacher, and no captioner or teachers",
            )
            _check(
                self.caption_set == "" and self.num_syn_captions == 0,
                f"part {self.name!r}: a teacher part has no caption_set nor num_syn_captions",
            )
            expected = part_name("teacher", self.teacher.name)
            for caption_set in self.caption_sets:
                validate_caption_set_name(caption_set)
        _check(self.name == expected, f"part {self.name!r} of kind {self.kind!r} must be named {expected!r}")
        _check(bool(self.fingerprint), f"part {self.name!r}: fingerprint must be non-empty")
        _check(len(set(self.teachers)) == len(self.teachers), f"part {self.name!r}: duplicate teachers")
        _check(len(set(self.caption_sets)) == len(self.caption_sets), f"part {self.name!r}: duplicate caption_sets")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """What a reinforced dataset holds and how it was made; ``manifest.json`` beside the shards.

    A reinforcement job may build its manifest up front (empty ``shards``) and hand it to `build_table`, which
    only needs the layout; it fills in ``shards``, ``skipped`` and ``created_at`` with `dataclasses.replace`
    once every shard is complete, and writes it last with `write_manifest`.

    Attributes:
        teachers: Teachers whose embeddings every row stores, in column order.
        augment: How the views were sampled.
        num_augmentations: K, stored views a sample.
        num_syn_captions: S, synthetic captions a sample (0: no captioner ran).
        source_uri: The source dataset that was reinforced.
        source_fingerprint: Identifies the source's content (e.g. a hash of its shard names and sizes).
        captioner: Model that wrote the synthetic captions; required when S > 0.
        augment_seed: Dataset-level seed of view sampling (`augment.sample`'s ``seed``).
        shards: Complete shards, in read order.
        skipped: Source rows left out, as ``(reason, count)`` pairs sorted by reason; a mapping is accepted.
        has_uid: Whether shards carry the nullable `UID` column (the source's own sample ids); ``manifest.json``
            holds the key only when true, so manifests of datasets without it keep their bytes.
        parts: Parts added to the complete dataset (`PartSpec`), in the order they were added; ``manifest.json``
            holds the key only when there are some (the same reason).
        code_version: ``clipdr.__version__`` of the writer.
        created_at: ISO 8601 time the manifest was made (UTC).
        schema_version: Version of this record layout; this code reads `SCHEMA_VERSION`.
    """

    teachers: tuple[TeacherSpec, ...]
    augment: AugmentSpec
    num_augmentations: int
    num_syn_captions: int
    source_uri: str
    source_fingerprint: str
    captioner: CaptionerSpec | None = None
    augment_seed: int = 0
    shards: tuple[ShardInfo, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()
    has_uid: bool = False
    parts: tuple[PartSpec, ...] = ()
    code_version: str = __version__
    created_at: str = field(default_factory=_utc_now)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "parts", tuple(self.parts))
        skipped = self.skipped.items() if isinstance(self.skipped, Mapping) else self.skipped
        object.__setattr__(self, "skipped", tuple(sorted((r, c) for r, c in skipped)))
        _check(self.schema_version in SCHEMA_VERSIONS, _version_message(self.schema_version, "manifest"))
        _check(len(self.teachers) >= 1, "a manifest needs at least one teacher")
        names = [t.name for t in self.teachers]
        _check(len(set(names)) == len(names), f"teacher names must be unique, got {names}")
        _check(_is_int(self.num_augmentations) and self.num_augmentations >= 1, "num_augmentations (K) must be >= 1")
        _check(_is_int(self.num_syn_captions) and self.num_syn_captions >= 0, "num_syn_captions (S) must be >= 0")
        _check(
            self.captioner is not None or self.num_syn_captions == 0,
            f"num_syn_captions is {self.num_syn_captions} but no captioner is recorded",
        )
        _check(_is_int(self.augment.num_ops) and self.augment.num_ops >= 0, "augment.num_ops must be >= 0")
        _check(isinstance(self.has_uid, bool), f"has_uid must be a bool, got {self.has_uid!r}")
        paths = [s.path for s in self.shards]
        _check(len(set(paths)) == len(paths), "shard paths must be unique")
        reasons = [r for r, _ in self.skipped]
        _check(len(set(reasons)) == len(reasons), f"skipped reasons must be unique, got {reasons}")
        _check(
            all(isinstance(r, str) and r and _is_int(c) and c >= 0 for r, c in self.skipped),
            f"skipped must map non-empty reasons to counts >= 0, got {dict(self.skipped)}",
        )
        try:
            datetime.datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise RecordsError(f"created_at must be an ISO 8601 time, got {self.created_at!r}") from None
        self._check_parts()

    def _check_parts(self) -> None:
        """Each part extends what was there when it was added, and has one file a base shard, row for row."""
        names = [p.name for p in self.parts]
        _check(len(set(names)) == len(names), f"part names must be unique, got {names}")
        teachers = [t.name for t in self.teachers]
        sets = [DEFAULT_CAPTION_SET] if self.num_syn_captions else []
        for part in self.parts:
            if part.kind == "captions":
                _check(part.caption_set not in sets, f"part {part.name!r}: caption set {part.caption_set!r} exists")
                _check(
                    set(part.teachers) <= set(teachers),
                    f"part {part.name!r}: text embeddings of teachers {list(part.teachers)}; the dataset has "
                    f"{teachers}",
                )
                sets.append(part.caption_set)
            else:
                _check(part.teacher.name not in teachers, f"part {part.name!r}: teacher {part.teacher.name!r} exists")
                _check(
                    set(part.caption_sets) <= set(sets) - {DEFAULT_CAPTION_SET},
                    f"part {part.name!r}: text embeddings of caption sets {list(part.caption_sets)}, the dataset has "
                    f"{sets}",
                )
                teachers.append(part.teacher.name)
            expected = [(part_file(part.name, s.path), s.num_rows) for s in self.shards]
            found = [(s.path, s.num_rows) for s in part.shards]
            if found != expected:
                bad = next(
                    (
                        f"shard {b.path!r}: the part lists {f}"
                        for b, e, f in zip(self.shards, expected, found, strict=False)
                        if e != f
                    ),
                    f"it lists {len(found)} files for {len(expected)} base shards",
                )
                raise RecordsError(
                    f"part {part.name!r} is not aligned with the base shards (one file a shard, at "
                    f"{PARTS_DIR}/<part>/<shard path>, with the shard's row count): {bad}"
                )

    # ----------------------------------------------------------------------- derived

    @property
    def all_teachers(self) -> tuple[TeacherSpec, ...]:
        """The base shards' teachers, then those parts added."""
        return self.teachers + tuple(p.teacher for p in self.parts if p.kind == "teacher")

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """Every teacher of the dataset (`all_teachers`)."""
        return tuple(t.name for t in self.all_teachers)

    @property
    def embed_dims(self) -> dict[str, int]:
        """Teacher name -> D, of every teacher."""
        return {t.name: t.embed_dim for t in self.all_teachers}

    def teacher(self, name: str) -> TeacherSpec:
        """The spec of teacher ``name`` (the base's or a part's); RecordsError lists the known ones."""
        for spec in self.all_teachers:
            if spec.name == name:
                return spec
        raise RecordsError(f"no teacher {name!r} in this dataset; it has {list(self.teacher_names)}")

    @property
    def caption_sets(self) -> dict[str, int]:
        """Caption set -> S_set: `DEFAULT_CAPTION_SET` (the base's S, when > 0), then those parts added."""
        sets = {DEFAULT_CAPTION_SET: self.num_syn_captions} if self.num_syn_captions else {}
        return sets | {p.caption_set: p.num_syn_captions for p in self.parts if p.kind == "captions"}

    def part(self, name: str) -> PartSpec:
        """The part ``name``; RecordsError lists the parts there are."""
        for part in self.parts:
            if part.name == name:
                return part
        raise RecordsError(f"no part {name!r} in this dataset's manifest; it lists {[p.name for p in self.parts]}")

    def part_of_column(self, column: str) -> PartSpec | None:
        """The part whose files hold ``column`` (a stored name, or a name of the record layout); None when the base
        shards do."""
        column = self.stored_columns(column)[0]
        for part in self.parts:
            if column in part_schema(self, part).names and column != KEY:
                return part
        return None

    @property
    def view_major(self) -> bool:
        """Whether each view and text row is a column of its own (`VIEW_MAJOR`, module docstring)."""
        return self.schema_version >= VIEW_MAJOR

    def record_schema(self) -> pa.Schema:
        """The base shards' columns as `build_table` takes them and the accessors give them, whatever the layout
        version: every per-view or per-text-row value one ``(R, ...)`` list column (the version 1 layout)."""
        return self._schema(1)

    def _schema(self, schema_version: int) -> pa.Schema:
        return reinforced_schema(
            self.teachers,
            self.num_augmentations,
            self.num_syn_captions,
            num_aug_ops=self.augment.num_ops,
            has_uid=self.has_uid,
            schema_version=schema_version,
        )

    def stored_columns(self, column: str) -> list[str]:
        """The stored columns that hold ``column`` of the record layout (`record_schema`, a part's included): itself,
        or in a view-major dataset its rows' columns (`row_column`), in row order. A name the record layout does not
        know (a stored row column, say) is returned as it is."""
        if not self.view_major or not is_row_major(column):
            return [column]
        fields = [self.record_schema(), *(part_schema(self, p, record=True) for p in self.parts)]
        for schema in fields:
            if column in schema.names:
                return [row_column(column, r) for r in range(schema.field(column).type.list_size)]
        return [column]

    def captioner_of(self, caption_set: str) -> CaptionerSpec:
        """What wrote caption set ``caption_set`` (`caption_sets`); RecordsError lists the sets there are."""
        if caption_set == DEFAULT_CAPTION_SET and self.num_syn_captions:
            return self.captioner
        for part in self.parts:
            if part.kind == "captions" and part.caption_set == caption_set:
                return part.captioner
        raise RecordsError(f"no caption set {caption_set!r} in this dataset; it has {list(self.caption_sets)}")

    def without_parts(self) -> Manifest:
        """This manifest as the base shards' job wrote it (what parts are fingerprinted against)."""
        return dataclasses.replace(self, parts=())

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_skipped(self) -> int:
        return sum(c for _, c in self.skipped)

    @property
    def aug_param_length(self) -> int:
        """L, the length of one encoded view."""
        return augparams.encoded_length(self.augment.num_ops)

    @property
    def embedding_bytes_per_sample(self) -> int:
        """fp16 bytes of all embeddings of one sample: ``(K + 1 + S) * sum(D) * 2``."""
        return (self.num_augmentations + 1 + self.num_syn_captions) * sum(t.embed_dim for t in self.teachers) * 2

    def schema(self) -> pa.Schema:
        """The Arrow schema every shard of this dataset has (its layout version's: `record_schema` for version 1)."""
        return self._schema(self.schema_version)

    def shard_uris(self, uri_dir: str) -> list[str]:
        """URIs of the shards under the dataset directory ``uri_dir``, in manifest order."""
        return [storage.join(uri_dir, *s.path.split("/")) for s in self.shards]

    # ----------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; ``skipped`` becomes a ``{reason: count}`` object; ``has_uid`` only when true,
        ``parts`` only when there are some."""
        data = config.to_dict(self)
        data["skipped"] = dict(self.skipped)
        if not self.has_uid:
            del data["has_uid"]
        if not self.parts:
            del data["parts"]
        return {"schema_version": data.pop("schema_version"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Rebuilds a manifest strictly: unknown, missing or mistyped keys raise RecordsError naming the key."""
        if not isinstance(data, dict):
            raise RecordsError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise RecordsError(f"{where}: missing key 'schema_version'")
        _check(data["schema_version"] in SCHEMA_VERSIONS, _version_message(data["schema_version"], where))
        data = {"has_uid": False, "parts": [], **data}  # absent: no uid column, no parts (`to_dict`)
        _check_keys(cls, data, "", where)
        skipped = data["skipped"]
        if not isinstance(skipped, dict):
            raise RecordsError(f"skipped: expected an object of reason -> count, got {skipped!r} ({where})")
        data["skipped"] = [[reason, count] for reason, count in skipped.items()]
        try:
            return config.from_dict(cls, data, where)
        except config.ConfigError as e:
            raise RecordsError(str(e)) from None
        except RecordsError as e:
            raise RecordsError(f"{e} ({where})") from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        """Parses `to_json` output with the checks of `from_dict`."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordsError(f"{where} is not valid JSON: {e}") from None
        return cls.from_dict(data, where)


def _version_message(version: Any, where: str) -> str:
    readable = " and ".join(str(v) for v in SCHEMA_VERSIONS)
    if _is_int(version) and version > SCHEMA_VERSION:
        return (
            f"{where} has schema_version {version}: written by a newer clipdr? "
            f"This code (clipdr {__version__}) reads versions {readable}"
        )
    return f"{where} has unknown schema_version {version!r}; this code reads versions {readable}"


def _nested_dataclasses(tp: Any, value: Any, key: str) -> list[tuple[type, dict[str, Any], str]]:
    """The dataclass-typed parts of ``value`` under annotation ``tp``, for the key check below."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return [(tp, value, key)] if isinstance(value, dict) else []
    if origin in (typing.Union, types.UnionType):
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        return [(classes[0], value, key)] if len(classes) == 1 and isinstance(value, dict) else []
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, list):
        return [part for i, v in enumerate(value) for part in _nested_dataclasses(args[0], v, f"{key}[{i}]")]
    return []


def _check_keys(cls: type, data: dict[str, Any], prefix: str, where: str) -> None:
    """Refuses unknown and missing keys, recursively; types are left to `config.from_dict`."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecordsError(f"unknown key {prefix + name!r} in {where}{hint}; allowed: {', '.join(allowed)}")
    for f in dataclasses.fields(cls):
        name = f.name
        if name not in data:
            if f.metadata.get(config.OMIT_DEFAULT):  # written only when set (`config.OMIT_DEFAULT`)
                continue
            raise RecordsError(f"{where}: missing key {prefix + name!r}")
        for sub_cls, sub_data, sub_key in _nested_dataclasses(hints[name], data[name], prefix + name):
            _check_keys(sub_cls, sub_data, f"{sub_key}.", where)


# --------------------------------------------------------------------------- schema


def _fixed_list(value_type: pa.DataType, *shape: int) -> pa.DataType:
    """Non-nullable nested fixed-size lists of ``value_type`` with the given outer-to-inner shape."""
    for size in reversed(shape):
        value_type = pa.list_(pa.field("item", value_type, nullable=False), size)
    return value_type


def reinforced_schema(
    teachers: Sequence[TeacherSpec],
    num_augmentations: int,
    num_syn_captions: int,
    num_aug_ops: int = AugmentSpec().num_ops,
    has_uid: bool = False,
    schema_version: int = SCHEMA_VERSION,
) -> pa.Schema:
    """The Arrow schema of a reinforced shard (module docstring).

    Args:
        teachers: Teachers, in column order.
        num_augmentations: K.
        num_syn_captions: S; 0 leaves out the ``syn_captions`` column.
        num_aug_ops: RandAugment ops a view (``AugmentSpec.num_ops``), which fixes L.
        has_uid: Include the nullable ``uid`` column.
        schema_version: The layout version (`SCHEMA_VERSIONS`); from `VIEW_MAJOR` on, each row of a per-view or
            per-text-row column is a column of its own (`stored_schema`).
    """
    for spec in teachers:
        validate_teacher_name(spec.name)
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(IMAGE_EXT, pa.string(), nullable=False),
        pa.field(CAPTION, pa.string(), nullable=False),
    ]
    if has_uid:
        fields.append(pa.field(UID, pa.string(), nullable=True))
    if num_syn_captions > 0:  # pyarrow cannot write a fixed_size_list of size 0
        fields.append(pa.field(SYN_CAPTIONS, _fixed_list(pa.string(), num_syn_captions), nullable=False))
    fields.append(
        pa.field(AUG_PARAMS, _fixed_list(pa.float32(), num_augmentations, augparams.encoded_length(num_aug_ops)), False)
    )
    for spec in teachers:
        fields += [
            pa.field(image_emb_column(spec.name), _fixed_list(pa.float16(), num_augmentations, spec.embed_dim), False),
            pa.field(
                text_emb_column(spec.name), _fixed_list(pa.float16(), 1 + num_syn_captions, spec.embed_dim), False
            ),
        ]
    return stored_schema(pa.schema(fields), schema_version)


def stored_schema(record: pa.Schema, schema_version: int) -> pa.Schema:
    """The stored schema of columns ``record`` (the record layout: `Manifest.record_schema`) in layout version
    ``schema_version``: the same for version 1; from `VIEW_MAJOR` on, each per-row column (`is_row_major`) of shape
    (R, ...) becomes R columns of shape (...), named by `row_column`, in row order and in its place."""
    _check(schema_version in SCHEMA_VERSIONS, _version_message(schema_version, "the layout"))
    if schema_version < VIEW_MAJOR:
        return record
    fields = []
    for field_ in record:
        if is_row_major(field_.name):
            row_type = field_.type.value_type
            fields += [pa.field(row_column(field_.name, r), row_type, False) for r in range(field_.type.list_size)]
        else:
            fields.append(field_)
    return pa.schema(fields)


def part_schema(manifest: Manifest, part: PartSpec, record: bool = False) -> pa.Schema:
    """The Arrow schema every file of ``part`` has: `KEY`, then the part's columns (`PartSpec`), in the dataset's
    layout version (`stored_schema`); with ``record``, as `build_table` takes them (`Manifest.record_schema`)."""
    version = 1 if record else manifest.schema_version
    fields = [pa.field(KEY, pa.string(), nullable=False)]
    if part.kind == "captions":
        S_set = part.num_syn_captions
        fields.append(pa.field(syn_captions_column(part.caption_set), _fixed_list(pa.string(), S_set), False))
        for name in part.teachers:
            D = manifest.teacher(name).embed_dim
            fields.append(
                pa.field(set_text_emb_column(name, part.caption_set), _fixed_list(pa.float16(), S_set, D), False)
            )
        return stored_schema(pa.schema(fields), version)
    spec, K, S = part.teacher, manifest.num_augmentations, manifest.num_syn_captions
    fields += [
        pa.field(image_emb_column(spec.name), _fixed_list(pa.float16(), K, spec.embed_dim), False),
        pa.field(text_emb_column(spec.name), _fixed_list(pa.float16(), 1 + S, spec.embed_dim), False),
    ]
    sets = manifest.caption_sets
    for caption_set in part.caption_sets:
        _check(caption_set in sets, f"part {part.name!r}: no caption set {caption_set!r} in the dataset")
        shape = (sets[caption_set], spec.embed_dim)
        fields.append(pa.field(set_text_emb_column(spec.name, caption_set), _fixed_list(pa.float16(), *shape), False))
    return stored_schema(pa.schema(fields), version)


@dataclass(frozen=True)
class PartLayout:
    """What a part pass writes: ``part`` of ``manifest`` (the dataset as it is before the part is added). It stands
    where a writer takes a `Manifest` (``schema()``, `build_table`), so one writer serves shards and parts."""

    manifest: Manifest
    part: PartSpec

    @property
    def schema_version(self) -> int:
        return self.manifest.schema_version

    def schema(self) -> pa.Schema:
        return part_schema(self.manifest, self.part)

    def record_schema(self) -> pa.Schema:
        return part_schema(self.manifest, self.part, record=True)


def _describe_type(value_type: pa.DataType) -> str:
    """``(30, 768) float16`` for nested fixed-size lists, the Arrow type name otherwise."""
    shape = []
    while pa.types.is_fixed_size_list(value_type):
        shape.append(value_type.list_size)
        value_type = value_type.value_type
    name = np.dtype(value_type.to_pandas_dtype()).name if pa.types.is_floating(value_type) else str(value_type)
    return f"{tuple(shape)} {name}" if shape else name


def schema_differences(expected: pa.Schema, actual: pa.Schema) -> list[str]:
    """Human-readable differences between an expected and an actual shard schema; empty when they fit.

    Types are compared by shape and leaf type (child field names and nullability are ignored, so a file
    written by another Parquet tool still fits).
    """
    problems = []
    missing = [name for name in expected.names if name not in actual.names]
    unexpected = [name for name in actual.names if name not in expected.names]
    if missing:
        problems.append(f"missing columns {missing}")
    if unexpected:
        problems.append(f"unexpected columns {unexpected}")
    for name in expected.names:
        if name in actual.names:
            want, got = _describe_type(expected.field(name).type), _describe_type(actual.field(name).type)
            if want != got:
                problems.append(f"column {name!r} is {got}, the manifest says {want}")
    return problems


# --------------------------------------------------------------------------- building tables


def _strings(values: Any, column: str, num_rows: int, nullable: bool = False) -> pa.Array:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_pylist()
    try:
        array = pa.array(list(values), type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RecordsError(f"column {column!r} must hold strings: {e}") from None
    _check(len(array) == num_rows, f"column {column!r} has {len(array)} rows, {KEY!r} has {num_rows}")
    _check(nullable or array.null_count == 0, f"column {column!r} has {array.null_count} missing values")
    return array


def _fixed_shape(values: Any, dtype: type[np.generic], shape: tuple[int, ...], column: str) -> np.ndarray:
    """``values`` as a C-contiguous array of exactly ``shape``, or RecordsError naming the column and shapes."""
    if isinstance(values, pa.Array | pa.ChunkedArray) and pa.types.is_fixed_size_list(values.type):
        values = fixed_shape_numpy(values)  # a column of a stored shard, e.g. when adding a teacher
    try:
        array = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError) as e:
        raise RecordsError(f"column {column!r}: expected a numeric array of shape {shape}: {e}") from None
    if array.size == 0 and shape[0] == 0:
        array = array.reshape(shape)
    _check(array.shape == shape, f"column {column!r} has shape {array.shape}, expected {shape}")
    return np.ascontiguousarray(array)


def _nested_array(values_NX: np.ndarray) -> pa.Array:
    """Wraps an (N, ...) C-contiguous array as nested fixed-size lists of its dtype, without copying."""
    array = pa.array(values_NX.reshape(-1))
    for depth in range(values_NX.ndim - 1, 0, -1):
        array = pa.FixedSizeListArray.from_arrays(array, type=_fixed_list(array.type, values_NX.shape[depth]))
    return array


def _stored_arrays(column: str, values_NRX: np.ndarray, schema_version: int) -> dict[str, pa.Array]:
    """Per-row column ``column`` as stored in layout ``schema_version`` (`stored_schema`): one nested array, or one
    a row (each row's values copied together, so a read of it is one contiguous column)."""
    if schema_version < VIEW_MAJOR:
        return {column: _nested_array(values_NRX)}
    return {
        row_column(column, r): _nested_array(np.ascontiguousarray(values_NRX[:, r])) for r in range(values_NRX.shape[1])
    }


def _encode_aug_params(values: Any, num_rows: int, num_augmentations: int, length: int) -> np.ndarray:
    """The (N, K, L) float32 encoding of the views: already-encoded arrays, or `augparams.AugParams` objects."""
    if not isinstance(values, np.ndarray | pa.Array | pa.ChunkedArray):
        values = [
            augparams.views_to_array(views) if len(views) and isinstance(views[0], augparams.AugParams) else views
            for views in values
        ]
    values_NKL = _fixed_shape(values, np.float32, (num_rows, num_augmentations, length), AUG_PARAMS)
    _check(bool(np.isfinite(values_NKL).all()), f"column {AUG_PARAMS!r} has non-finite values")
    return values_NKL


def _embeddings(values: Any, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """Embeddings as fp16 (N, R, D), checked to be finite and L2-normalised."""
    values_NRD = _fixed_shape(values, np.float16, shape, column)
    if values_NRD.size:
        norms_NR = np.linalg.norm(values_NRD.astype(np.float32), axis=-1)
        bad = ~(np.abs(norms_NR - 1.0) <= NORM_TOLERANCE)  # NaN and inf count as bad
        if bad.any():
            row, index = (int(i) for i in np.argwhere(bad)[0])
            raise RecordsError(
                f"column {column!r}: {int(bad.sum())} embeddings are not L2-normalised (after fp16), e.g. row {row} "
                f"[{index}] has norm {norms_NR[row, index]:.4f}; tolerance {NORM_TOLERANCE}"
            )
    return values_NRD


def _syn_caption_array(values: Any, column: str, num_rows: int, value_type: pa.DataType) -> pa.Array:
    """N rows of S_set captions as a fixed-size list column."""
    S = value_type.list_size
    rows = values.to_pylist() if isinstance(values, pa.Array | pa.ChunkedArray) else values
    rows = [list(captions) for captions in rows]
    lengths = {len(captions) for captions in rows}
    _check(len(rows) == num_rows, f"column {column!r} has {len(rows)} rows, {KEY!r} has {num_rows}")
    _check(lengths <= {S}, f"column {column!r} must hold S={S} captions a row, got lengths {sorted(lengths)}")
    flat = _strings([c for captions in rows for c in captions], column, num_rows * S)
    return pa.FixedSizeListArray.from_arrays(flat, type=value_type)


def _build_part_table(columns: Mapping[str, Any], layout: PartLayout, keys: pa.Array) -> pa.Table:
    arrays = {KEY: keys}
    for field_ in layout.record_schema():
        if field_.name == KEY:
            continue
        if is_syn_captions_column(field_.name):
            arrays[field_.name] = _syn_caption_array(columns[field_.name], field_.name, len(keys), field_.type)
        else:
            shape = _describe_shape(field_.type)
            values = _embeddings(columns[field_.name], field_.name, (len(keys), *shape))
            arrays.update(_stored_arrays(field_.name, values, layout.schema_version))
    schema = layout.schema()
    table = pa.Table.from_arrays([arrays[name] for name in schema.names], schema=schema)
    assert table.schema.equals(schema), "build_table produced a schema other than the part's"
    return table


def _describe_shape(value_type: pa.DataType) -> tuple[int, ...]:
    shape = []
    while pa.types.is_fixed_size_list(value_type):
        shape.append(value_type.list_size)
        value_type = value_type.value_type
    return tuple(shape)


def build_table(columns: Mapping[str, Any], manifest: Manifest | PartLayout) -> pa.Table:
    """Builds one shard's table from columnar data, checking every column against the manifest's layout.

    Writers hand it the same arrays whatever the dataset's layout version; it lays them out by version
    (`stored_schema`: in a view-major dataset, each row of a per-view or per-text-row array becomes a column).

    Args:
        columns: Exactly the columns of ``manifest.record_schema()``, keyed by this module's names: `KEY`,
            `CAPTION`, `IMAGE_EXT` string sequences (image_ext lowercase without a dot, e.g. ``jpg``);
            `IMAGE` a sequence of bytes; `UID` (when ``manifest.has_uid``) strings or None;
            `SYN_CAPTIONS` (when S > 0) N sequences of S strings;
            `AUG_PARAMS` an (N, K, L) numeric array or N sequences of K `augparams.AugParams`;
            `image_emb_column(t)` (N, K, D) and `text_emb_column(t)` (N, 1+S, D) arrays of any float dtype
            (numpy, or anything ``np.asarray`` takes), L2-normalised; they are stored as fp16. The columns
            of a stored shard are accepted as they are read, so adding a teacher is: read the shard, add the
            new teacher's two columns, build with the new manifest, write.
        manifest: Gives teachers, K, S and the number of RandAugment ops; its shards are not used. A `PartLayout`
            builds a part's file instead: `KEY` and the part's columns (caption sets as N sequences of S_set
            strings, embeddings as above).

    Returns:
        A table with ``manifest.schema()``, one chunk a column.

    Raises:
        RecordsError: A missing or unknown column, a wrong row count or shape, missing values, duplicate keys,
            or embeddings that are not finite and L2-normalised. The message names the column.
    """
    record = manifest.record_schema()
    missing = [name for name in record.names if name not in columns]
    unknown = [name for name in columns if name not in record.names]
    _check(not missing and not unknown, f"build_table: missing columns {missing}, unknown columns {unknown}")
    keys = _strings(columns[KEY], KEY, len(columns[KEY]))
    num_rows = len(keys)
    _check(len(set(keys.to_pylist())) == num_rows, f"column {KEY!r} has duplicate keys")
    if isinstance(manifest, PartLayout):
        return _build_part_table(columns, manifest, keys)
    schema, version = manifest.schema(), manifest.schema_version
    K, S = manifest.num_augmentations, manifest.num_syn_captions
    arrays: dict[str, pa.Array] = {KEY: keys}
    arrays[CAPTION] = _strings(columns[CAPTION], CAPTION, num_rows)
    arrays[IMAGE_EXT] = _strings(columns[IMAGE_EXT], IMAGE_EXT, num_rows)
    if manifest.has_uid:
        arrays[UID] = _strings(columns[UID], UID, num_rows, nullable=True)
    bad_ext = sorted({ext for ext in arrays[IMAGE_EXT].to_pylist() if not _IMAGE_EXT_VALUE.fullmatch(ext)})
    _check(not bad_ext, f"column {IMAGE_EXT!r} values must be lowercase extensions without a dot, got {bad_ext}")

    images = columns[IMAGE]
    try:
        images = images if isinstance(images, pa.Array | pa.ChunkedArray) else pa.array(list(images), pa.binary())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RecordsError(f"column {IMAGE!r} must hold encoded image bytes: {e}") from None
    images = images.combine_chunks() if isinstance(images, pa.ChunkedArray) else images
    arrays[IMAGE] = images.cast(pa.binary())
    _check(len(arrays[IMAGE]) == num_rows, f"column {IMAGE!r} has {len(arrays[IMAGE])} rows, {KEY!r} has {num_rows}")
    _check(arrays[IMAGE].null_count == 0, f"column {IMAGE!r} has {arrays[IMAGE].null_count} missing values")

    if S > 0:
        arrays[SYN_CAPTIONS] = _syn_caption_array(
            columns[SYN_CAPTIONS], SYN_CAPTIONS, num_rows, record.field(SYN_CAPTIONS).type
        )

    aug_NKL = _encode_aug_params(columns[AUG_PARAMS], num_rows, K, manifest.aug_param_length)
    arrays.update(_stored_arrays(AUG_PARAMS, aug_NKL, version))
    for spec in manifest.teachers:
        for column, rows in ((image_emb_column(spec.name), K), (text_emb_column(spec.name), 1 + S)):
            values = _embeddings(columns[column], column, (num_rows, rows, spec.embed_dim))
            arrays.update(_stored_arrays(column, values, version))

    table = pa.Table.from_arrays([arrays[name] for name in schema.names], schema=schema)
    assert table.schema.equals(schema), "build_table produced a schema other than the manifest's"
    return table


# --------------------------------------------------------------------------- reading arrays


def _column(data: pa.Table | pa.RecordBatch, name: str) -> pa.ChunkedArray | pa.Array:
    if name not in data.schema.names:
        raise RecordsError(f"no column {name!r}; the data has {data.schema.names}")
    return data.column(name)


def fixed_shape_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of nested fixed-size lists as an (N, *shape) numpy array.

    Zero-copy (a read-only view of Arrow memory) when the column is a single chunk, as a shard written by
    `write_shard` and read whole is; several chunks are concatenated (one copy).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    shape = []
    value_type = column.type
    while pa.types.is_fixed_size_list(value_type):
        shape.append(value_type.list_size)
        value_type = value_type.value_type
    if not shape:
        raise RecordsError(f"expected a fixed-size list column, got {column.type}")
    parts = []
    for chunk in chunks:
        values = chunk
        for _ in shape:
            _check(values.null_count == 0, "a fixed-size list column has missing values")
            values = values.flatten()  # respects slice offsets, unlike .values
        parts.append(values.to_numpy(zero_copy_only=True).reshape(len(chunk), *shape))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty((0, *shape), dtype=value_type.to_pandas_dtype())
    return np.concatenate(parts)


def stacked(data: pa.Table | pa.RecordBatch, column: str) -> np.ndarray:
    """Per-row column ``column`` of the record layout (`is_row_major`) as an (N, R, ...) array, from either layout:
    the nested column (version 1, zero-copy as `fixed_shape_numpy`), or the columns of its rows (`row_column`; all R
    of them must be in ``data``; one copy)."""
    names = data.schema.names
    if column in names:
        return fixed_shape_numpy(data.column(column))
    prefix = column + "__"
    rows = sorted(
        int(n[len(prefix) :]) for n in names if n.startswith(prefix) and _ROW_INDEX.fullmatch(n[len(prefix) :])
    )
    _check(bool(rows), f"no column {column!r} nor columns of its rows; the data has {names}")
    _check(rows == list(range(len(rows))), f"column {column!r}: the data holds its rows {rows}, not all of 0..R-1")
    return np.stack([fixed_shape_numpy(data.column(row_column(column, r))) for r in rows], axis=1)


def image_embeddings(data: pa.Table | pa.RecordBatch, teacher: str) -> np.ndarray:
    """``teacher``'s image embeddings, fp16 (N, K, D); row k is view k of `aug_params`. Either layout (`stacked`)."""
    return stacked(data, image_emb_column(teacher))


def text_embeddings(data: pa.Table | pa.RecordBatch, teacher: str) -> np.ndarray:
    """``teacher``'s text embeddings, fp16 (N, 1+S, D); row 0 the real caption, rows 1..S `syn_captions`. Either
    layout (`stacked`)."""
    return stacked(data, text_emb_column(teacher))


def aug_params(data: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The encoded views, float32 (N, K, L); ``augparams.AugParams.from_array(views_NKL[i, k])`` decodes one. Either
    layout (`stacked`)."""
    return stacked(data, AUG_PARAMS)


# --------------------------------------------------------------------------- reading one drawn view


def caption_row(manifest: Manifest, caption_sets: Sequence[str], index: int) -> tuple[str, int]:
    """Synthetic caption ``index`` of the captions of ``caption_sets`` concatenated in that order (how training
    numbers them), as ``(its caption set, its row in the set)``."""
    sets = manifest.caption_sets
    for caption_set in caption_sets:
        _check(caption_set in sets, f"no caption set {caption_set!r} in this dataset; it has {list(sets)}")
        if 0 <= index < sets[caption_set]:
            return caption_set, index
        index -= sets[caption_set]
    raise RecordsError(f"caption sets {list(caption_sets)} have {sum(sets[s] for s in caption_sets)} captions a row")


def set_text_rows(teacher: str, caption_set: str) -> tuple[str, int]:
    """``(column, first row)`` of ``teacher``'s text embeddings of caption set ``caption_set``: rows 1.. of
    `text_emb_column` for the base shards' own set, rows 0.. of `set_text_emb_column` for an added one."""
    if caption_set == DEFAULT_CAPTION_SET:
        return text_emb_column(teacher), 1
    return set_text_emb_column(teacher, caption_set), 0


def drawn_columns(
    manifest: Manifest,
    teachers: Sequence[str] = (),
    caption_sets: Sequence[str] = (),
    view: int | None = None,
    syn_caption: int | None = None,
) -> list[str]:
    """The stored columns a read needs for one drawn view and synthetic caption of every sample: `KEY`, `IMAGE`,
    `CAPTION`, view ``view``'s parameters, the captions of ``caption_sets``, and of each of ``teachers`` the
    embedding of view ``view``, of the real caption and of synthetic caption ``syn_caption`` (numbered over the
    sets concatenated: `caption_row`).

    In a view-major dataset (`Manifest.view_major`) that is one row column each (`row_column`); ``view`` or
    ``syn_caption`` None takes every row instead (a draw per sample). A version 1 dataset stores all rows in one
    column, so it gives the whole columns whatever the draw. Columns of parts are named as the base's: pass them
    to `read_shard_with_parts`.
    """
    K = manifest.num_augmentations
    _check(view is None or (_is_int(view) and 0 <= view < K), f"view must be in [0, {K}), got {view!r}")

    def rows(column: str, chosen: Sequence[int] | None) -> list[str]:
        stored = manifest.stored_columns(column)
        return stored if not manifest.view_major or chosen is None else [stored[r] for r in chosen]

    views = None if view is None else [view]
    columns = [KEY, IMAGE, CAPTION, *rows(AUG_PARAMS, views)]
    columns += [syn_captions_column(s) for s in caption_sets]
    if syn_caption is None:
        syn_rows = [(s, None) for s in caption_sets]
    else:
        syn_rows = [caption_row(manifest, caption_sets, syn_caption)]
    for teacher in teachers:
        columns += rows(image_emb_column(teacher), views)
        columns += rows(text_emb_column(teacher), [0])  # the real caption
        for caption_set, row in syn_rows:
            column, first = set_text_rows(teacher, caption_set)
            count = manifest.caption_sets[caption_set]
            columns += rows(column, range(first, first + count) if row is None else [first + row])
    return list(dict.fromkeys(columns))


# --------------------------------------------------------------------------- shard files


def _write_options(column_names: Sequence[str], embedding_compression: str) -> dict[str, Any]:
    """Parquet writer settings of a shard (module docstring): the same for a whole-table and a streamed write."""
    embeddings = {n for n in column_names if n.startswith((IMAGE_EMB_PREFIX, TEXT_EMB_PREFIX))}
    return {
        "compression": {
            n: embedding_compression if n in embeddings else "none" if n == IMAGE else "zstd" for n in column_names
        },
        "use_dictionary": [IMAGE_EXT] if IMAGE_EXT in column_names else False,
        "write_statistics": [KEY] if KEY in column_names else False,
    }


def write_shard(
    uri: str, table: pa.Table, row_group_size: int | None = None, embedding_compression: str = "none"
) -> None:
    """Writes a table (from `build_table`) as one Parquet shard, atomically.

    The file appears under ``uri`` only once complete (`storage.atomic_write`). Embeddings and image bytes are
    written without dictionary encoding, image bytes uncompressed, text columns with zstd (module docstring).

    Args:
        uri: Destination, ending in ``.parquet``.
        table: The shard's rows.
        row_group_size: Rows a row group; None writes one row group for shards of up to ~1M rows, so a
            whole-shard read gives single-chunk columns and zero-copy embedding arrays.
        embedding_compression: Parquet codec of the embedding columns: ``none`` decodes fastest, ``zstd``
            stores ~8 % fewer bytes (less network from object storage) at ~1.3x the decode time. Readers
            handle either, so this is the writer's choice, not part of the schema.
    """
    _check(uri.endswith(SHARD_SUFFIX), f"shard URI {uri!r} must end in {SHARD_SUFFIX}")
    with storage.atomic_write(uri) as out:
        pq.write_table(
            table, out, row_group_size=row_group_size, **_write_options(table.column_names, embedding_compression)
        )


class ShardStreamWriter:
    """Writes one shard a row group at a time, atomically: the streamed twin of `write_shard`, whose memory is one
    row group, not the shard.

    The file appears under ``uri`` only at `commit` (`storage.atomic_write`: a hidden temporary file renamed, or an
    S3 multipart upload completed); `abort` (or any error) leaves nothing. Footer metadata known only at the end
    (the shard's skip counts) is passed to `commit` and stored as Parquet key-value metadata; `read_shard_footer`
    returns it in the schema's metadata, as it returns metadata a whole-table write stored in the schema itself.
    """

    def __init__(self, uri: str, schema: pa.Schema, embedding_compression: str = "none") -> None:
        _check(uri.endswith(SHARD_SUFFIX), f"shard URI {uri!r} must end in {SHARD_SUFFIX}")
        self.schema = schema
        self._atomic = storage.atomic_write(uri)
        out = self._atomic.__enter__()
        try:
            self._writer = pq.ParquetWriter(out, schema, **_write_options(schema.names, embedding_compression))
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self.num_rows = 0

    def write(self, table: pa.Table) -> None:
        """Appends ``table`` (from `build_table`, this writer's schema) as one row group (up to ~1M rows)."""
        self._writer.write_table(table)  # a table of another schema raises
        self.num_rows += table.num_rows

    def commit(self, metadata: Mapping[bytes, bytes] | None = None) -> None:
        """Closes the file with ``metadata`` in its footer and makes it appear under its URI."""
        try:
            if metadata:
                self._writer.add_key_value_metadata(dict(metadata))
            self._writer.close()
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Discards what was written: nothing appears under the URI."""
        aborted = RuntimeError("shard write aborted")
        with contextlib.suppress(Exception):  # the file is discarded whatever state the writer is in
            self._writer.close()
        self._atomic.__exit__(RuntimeError, aborted, None)


def read_shard(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Reads a shard (or some of its columns)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        table = parquet.read(columns=list(columns) if columns is not None else None)
        return table.replace_schema_metadata(_footer_metadata(table.schema, parquet.metadata))


def read_shard_footer(uri: str) -> tuple[int, pa.Schema]:
    """``(num_rows, schema)`` of a shard from its Parquet footer only (no data pages are read)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        return parquet.metadata.num_rows, schema.with_metadata(_footer_metadata(schema, parquet.metadata))


def _footer_metadata(schema: pa.Schema, file_metadata: pq.FileMetaData) -> dict[bytes, bytes]:
    """The schema's metadata with the file's key-value metadata: what a streamed write adds at its end
    (`ShardStreamWriter.commit`) is not in the Arrow schema stored when the file was opened, so both kinds of shard
    read alike."""
    extra = {k: v for k, v in (file_metadata.metadata or {}).items() if k != b"ARROW:schema"}
    return {**(schema.metadata or {}), **extra}


def read_shard_with_parts(uri_dir: str, manifest: Manifest, shard_path: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of base shard ``shard_path`` (as the manifest lists it), each read from the file that holds it:
    the shard, or a part's file for it (`Manifest.part_of_column`); a part that holds none of them is not opened.
    Columns are stored names (`drawn_columns`), or names of the record layout (`Manifest.record_schema`), which a
    view-major dataset gives back as that layout's ``(R, ...)`` column, its rows read and stacked.

    Parts join by position: a part file holds the base shard's rows in its order. The join is checked here, by row
    count and then by `KEY`, before any column is used.

    Raises:
        RecordsError: A column no file of the dataset holds; a part file whose rows or keys differ from its base
            shard's (the message names the part and the shard).
    """
    paths = [s.path for s in manifest.shards]
    _check(shard_path in paths, f"no shard {shard_path!r} in the manifest of {uri_dir!r}")
    stored = {column: manifest.stored_columns(column) for column in columns}
    wanted: dict[str | None, list[str]] = {None: []}
    for column in dict.fromkeys(name for names in stored.values() for name in names):
        part = manifest.part_of_column(column)
        if part is None and column not in manifest.schema().names:
            raise RecordsError(f"no file of dataset {uri_dir!r} holds column {column!r}")
        wanted.setdefault(part.name if part else None, []).append(column)
    base_columns = list(dict.fromkeys([*wanted[None], *([KEY] if len(wanted) > 1 else [])]))
    base = read_shard(storage.join(uri_dir, *shard_path.split("/")), base_columns)
    tables = {None: base}
    for name in [n for n in wanted if n is not None]:
        uri = storage.join(uri_dir, *part_file(name, shard_path).split("/"))
        try:
            table = read_shard(uri, [KEY, *[c for c in wanted[name] if c != KEY]])
        except (OSError, pa.ArrowException) as e:
            raise RecordsError(f"part {name!r}, shard {shard_path!r}: cannot read {uri}: {e}") from None
        if table.num_rows != base.num_rows:
            raise RecordsError(
                f"part {name!r}, shard {shard_path!r}: {table.num_rows} rows, the base shard has {base.num_rows}: "
                "the part is not aligned with its base shard"
            )
        if not table.column(KEY).equals(base.column(KEY)):
            keys = zip(table.column(KEY).to_pylist(), base.column(KEY).to_pylist(), strict=True)
            row, (got, want) = next((i, pair) for i, pair in enumerate(keys) if pair[0] != pair[1])
            raise RecordsError(
                f"part {name!r}, shard {shard_path!r}: row {row} has key {got!r}, the base shard's {want!r}: the "
                "part is not aligned with its base shard"
            )
        tables[name] = table
    owner = {column: name for name, names in wanted.items() for column in names}

    def value(column: str) -> pa.ChunkedArray | pa.Array:
        if stored[column] == [column]:
            return tables[owner[column]].column(column)
        rows = [fixed_shape_numpy(tables[owner[name]].column(name)) for name in stored[column]]
        return _nested_array(np.stack(rows, axis=1))  # a record-layout column read from a view-major dataset

    return pa.table({column: value(column) for column in columns})


FOOTER_READ_THREADS = 32


def read_shard_footers(uris: Sequence[str], threads: int = FOOTER_READ_THREADS) -> list[tuple[int, pa.Schema]]:
    """`read_shard_footer` of each of ``uris``, in their order, ``threads`` at a time. A job reads every shard's
    footer when it resumes and when it finishes; on object storage each is a round trip of tens of milliseconds, so
    thousands of shards read one after another take minutes. The first error raises, as it would one at a time."""
    if len(uris) <= 1:
        return [read_shard_footer(uri) for uri in uris]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        return list(pool.map(read_shard_footer, uris))


# --------------------------------------------------------------------------- manifest files and datasets


def manifest_uri(uri_dir: str) -> str:
    return storage.join(uri_dir, MANIFEST_NAME)


def read_manifest(uri_dir: str) -> Manifest:
    """Reads and strictly parses ``<uri_dir>/manifest.json``; RecordsError when it is missing or malformed."""
    uri = manifest_uri(uri_dir)
    if not storage.exists(uri):
        orphans = storage.list_files(uri_dir, (SHARD_SUFFIX,), recursive=True)
        hint = (
            f"; {len(orphans)} parquet files lie there without one: a reinforcement job that has not finished "
            "or crashed (the manifest is written last)"
            if orphans
            else ""
        )
        raise RecordsError(f"no {MANIFEST_NAME} under {uri_dir!r}: not a reinforced dataset{hint}")
    return Manifest.from_json(storage.read_bytes(uri), where=f"manifest {uri}")


def read_provenance(schema: pa.Schema) -> dict | None:
    """What the job that wrote a shard or part file put in its footer (`SHARD_METADATA_KEY`: its fingerprint as
    ``run_fingerprint``, its source, its skip counts), or None for a file no clipdr job wrote."""
    raw = (schema.metadata or {}).get(SHARD_METADATA_KEY)
    return json.loads(raw) if raw else None


def _shard_problem(uri: str, info: ShardInfo, expected: pa.Schema, fingerprint: str | None = None) -> str | None:
    try:
        num_rows, schema = read_shard_footer(uri)
    except (OSError, pa.ArrowException) as e:
        return f"{info.path}: cannot read its Parquet footer: {e}"
    problems = schema_differences(expected, schema)
    if num_rows != info.num_rows:
        problems.insert(0, f"the manifest says {info.num_rows} rows, the Parquet footer {num_rows}")
    if fingerprint is not None:
        found = (read_provenance(schema) or {}).get("run_fingerprint")
        if found != fingerprint:
            problems.append(f"its footer's fingerprint is {found!r}, the part's {fingerprint!r} (made by another pass)")
    return f"{info.path}: {'; '.join(problems)}" if problems else None


def check_dataset(
    uri_dir: str,
    manifest: Manifest,
    check_shards: bool = True,
    extra_files: Literal["warn", "error"] = "warn",
) -> list[str]:
    """Checks that the shards and part files under ``uri_dir`` are those the manifest describes; returns the shards'
    URIs.

    Raises:
        RecordsError: A listed shard or part file is missing; a part's folder holds a file that is not one of its
            base shards'; with ``check_shards``, a footer's row count or schema differs from the manifest, or a part
            file's footer lacks the part's fingerprint (all such files are named, parts with their part); with
            ``extra_files="error"``, parquet files lie there that the manifest does not list, unlisted parts
            (a part pass that has not finished) included.

    Extra parquet files only warn (`RecordsWarning`) by default: readers take the manifest's shards, never a
    directory listing, so files left by a crashed or partial rerun cannot leak into training; refusing would
    make a complete dataset unusable over a harmless leftover. Pass ``extra_files="error"`` to refuse them.
    """
    return _check_dataset(uri_dir, manifest, check_shards, extra_files, stacklevel=3)


def _shown(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_dataset(
    uri_dir: str, manifest: Manifest, check_shards: bool, extra_files: str, stacklevel: int
) -> list[str]:
    _check(extra_files in ("warn", "error"), f"extra_files must be 'warn' or 'error', got {extra_files!r}")
    uris = manifest.shard_uris(uri_dir)
    prefix = storage.join(uri_dir, "")
    parts_prefix = storage.join(uri_dir, PARTS_DIR, "")
    everything = storage.list_files(uri_dir, (SHARD_SUFFIX,), recursive=True)
    present = {u for u in everything if not u.startswith(parts_prefix)}
    missing = [s.path for s, uri in zip(manifest.shards, uris, strict=True) if uri not in present]
    if missing:
        raise RecordsError(
            f"dataset {uri_dir!r}: {len(missing)} shards listed in its manifest are missing: {_shown(missing)}"
        )
    extra = sorted(u.removeprefix(prefix) for u in present - set(uris))
    part_files = {p.name: [storage.join(uri_dir, *s.path.split("/")) for s in p.shards] for p in manifest.parts}
    for part in manifest.parts:
        files = part_files[part.name]
        folder = storage.join(uri_dir, PARTS_DIR, part.name, "")
        found = {u for u in everything if u.startswith(folder)}
        lacking = [
            (b.path, s.path) for s, f, b in zip(part.shards, files, manifest.shards, strict=True) if f not in found
        ]
        if lacking:
            raise RecordsError(
                f"dataset {uri_dir!r}: part {part.name!r} lacks its files of {len(lacking)} shards, e.g. shard "
                f"{lacking[0][0]!r} (file {lacking[0][1]!r} is missing)"
            )
        stray = sorted(u.removeprefix(prefix) for u in found - set(files))
        if stray:
            raise RecordsError(
                f"dataset {uri_dir!r}: part {part.name!r} holds files of no base shard in its manifest: "
                f"{_shown(stray)} (a part is one file a base shard, at {PARTS_DIR}/<part>/<shard path>)"
            )
    unlisted = sorted(
        {u.removeprefix(parts_prefix).split("/")[0] for u in everything if u.startswith(parts_prefix)}
        - {p.name for p in manifest.parts}
    )
    messages = []
    if extra:
        messages.append(
            f"dataset {uri_dir!r} holds {len(extra)} parquet files its manifest does not list ({_shown(extra)}); "
            "left by a crashed or partial run? They are not read."
        )
    if unlisted:
        messages.append(
            f"dataset {uri_dir!r} holds parts its manifest does not list ({_shown(unlisted)}): a part pass that has "
            "not finished (a part is listed only once every base shard has its file)? They are not read."
        )
    for message in messages:
        if extra_files == "error":
            raise RecordsError(message)
        warnings.warn(message, RecordsWarning, stacklevel=stacklevel)
    if check_shards and uris:
        checks = [(uri, info, manifest.schema(), None, "") for uri, info in zip(uris, manifest.shards, strict=True)]
        for part in manifest.parts:
            schema = part_schema(manifest, part)
            checks += [
                (uri, info, schema, part.fingerprint, f"part {part.name!r}, shard {base.path!r}: ")
                for uri, info, base in zip(part_files[part.name], part.shards, manifest.shards, strict=True)
            ]
        with concurrent.futures.ThreadPoolExecutor(min(_FOOTER_READERS, len(checks))) as pool:
            found = pool.map(lambda check: _shard_problem(*check[:4]), checks)
            problems = [f"{check[4]}{p}" for check, p in zip(checks, found, strict=True) if p is not None]
        if problems:
            shown = "\n  ".join(problems[:10]) + (
                f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            )
            raise RecordsError(f"dataset {uri_dir!r}: {len(problems)} shards do not match its manifest:\n  {shown}")
    return uris


def write_manifest(uri_dir: str, manifest: Manifest, verify: bool = True) -> str:
    """Writes ``<uri_dir>/manifest.json`` atomically; returns its URI.

    Jobs write the manifest LAST, after every shard it lists is complete: its presence is what marks a
    dataset finished, and it describes only complete shards. A job that rewrites an existing dataset
    directory deletes the old manifest first, so readers never pair it with new shards.

    Args:
        uri_dir: The dataset directory.
        manifest: The final manifest.
        verify: First check the listed shards exist and their footers match (`check_dataset`), so a bad
            manifest is caught by the job that made it rather than by the next training run.
    """
    if verify:
        _check_dataset(uri_dir, manifest, check_shards=True, extra_files="warn", stacklevel=3)
    uri = manifest_uri(uri_dir)
    storage.write_bytes(uri, manifest.to_json().encode())
    return uri


@dataclass(frozen=True)
class ReinforcedDataset:
    """A validated reinforced dataset: its manifest and the URIs of its shards, in manifest order."""

    uri: str
    manifest: Manifest
    shard_uris: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows


def open_dataset(
    uri_dir: str,
    require_teachers: Sequence[str] = (),
    min_syn_captions: int = 0,
    check_shards: bool = True,
    extra_files: Literal["warn", "error"] = "warn",
) -> ReinforcedDataset:
    """Opens a reinforced dataset after checking it is complete and fits what the caller needs.

    Args:
        uri_dir: The dataset directory (path, ``file://`` or ``s3://``).
        require_teachers: Teachers whose embeddings the caller needs.
        min_syn_captions: Fewest synthetic captions a sample the caller needs (of all caption sets together).
        check_shards: Read every shard's Parquet footer (metadata only) to compare row counts and schemas.
        extra_files: What parquet files the manifest does not list cause: ``warn`` or ``error`` (`check_dataset`).

    Raises:
        RecordsError: Saying what differs: no manifest; a schema_version this code does not read; required
            teachers the data lacks (both sets listed); too few synthetic captions; missing shards; footers
            whose row counts or column shapes differ from the manifest; extra files with ``extra_files="error"``.
    """
    manifest = read_manifest(uri_dir)
    lacking = [t for t in require_teachers if t not in manifest.teacher_names]
    if lacking:
        raise RecordsError(
            f"dataset {uri_dir!r} lacks teachers {lacking}: it has {list(manifest.teacher_names)}, "
            f"the caller requires {list(require_teachers)}"
        )
    num_syn_captions = sum(manifest.caption_sets.values())
    if num_syn_captions < min_syn_captions:
        raise RecordsError(
            f"dataset {uri_dir!r} has {num_syn_captions} synthetic captions a sample, the caller needs at least "
            f"{min_syn_captions} (all its caption sets together)"
        )
    uris = _check_dataset(uri_dir, manifest, check_shards, extra_files, stacklevel=3)
    return ReinforcedDataset(uri=uri_dir, manifest=manifest, shard_uris=tuple(uris))
