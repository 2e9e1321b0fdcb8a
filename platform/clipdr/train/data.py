"""The training data path: per sample, draw a stored view and a synthetic caption, replay, tokenise, select targets.

The reinforced dataset (`clipdr.records`) stores, per sample, the image bytes, K augmentation parameter sets, S
synthetic captions and every teacher's embeddings of the K views and of the 1+S captions. Training does no
teacher work: for each sample and epoch it

1. draws an augmentation index ``k`` in [0, K) and a synthetic caption index ``j`` in [0, S) from a blake2b hash:
   of ``(seed, epoch)`` for a view-major dataset (`records.VIEW_MAJOR`), one (k, j) for every sample of the epoch,
   so the read fetches only those rows' columns (`shared_draw`, `records.drawn_columns`); of ``(seed, epoch, key)``
   for a version 1 dataset, whose rows are read whole anyway (`draw_indices`), and for j when a drawn caption set's
   captions are ordered (beam search: `SAMPLED_GENERATION_TYPES`). Stable across processes, workers and batch
   layouts, and never touching a global RNG. Why a shared draw leaves the training distribution as it is:
   docs/reinforce.md, "Reading only the drawn view";
2. decodes the image and replays view ``k`` at the student's resolution, interpolation and normalisation
   (`augment.replay`, the same function the reinforcement job rendered the teachers' views with);
3. tokenises the real caption and synthetic caption ``j`` with the student's tokenizer;
4. in ``reinforced`` mode, selects each teacher's stored embeddings of exactly that view and those captions:
   image row ``k``, text row 0 (real caption), text row ``1 + j`` (synthetic caption ``j``).

`ReplayBatch` does this for one batch of rows and is meant to run as a Ray Data ``map_batches`` UDF (a callable
class: the tokenizer loads once per actor) over ``batch_format="pyarrow"`` batches; it also takes a dict of
numpy arrays. Each output row depends only on its own input row and ``(seed, epoch)``, so outputs are identical
whatever the batch size, the split into blocks or the row order; the one exception is a row whose view does not
replay (a corrupt image, or a magnitude outside `augparams.check_op`): the previous good row of its batch stands in
for it, and a warning names it (`_replay_rows` says why it is replaced rather than dropped). `check_dataset`
opens a dataset for a training mode and refuses one that lacks what the mode needs.

Output columns (module constants; ``<t>`` a teacher name)::

    image                    uint8 (N, 3, H, W)    view k at the student's size (normalised on the device)
    text                     int64 (N, T)          the real caption's tokens
    syn_text                 int64 (N, T)          synthetic caption j's tokens         (with use_syn_captions)
    aug_index                int64 (N,)            k
    syn_index                int64 (N,)            j                                    (with use_syn_captions)
    teacher_image__<t>       float32 (N, D_t)      image_emb__<t>[:, k]                 (reinforced)
    teacher_text__<t>        float32 (N, D_t)      text_emb__<t>[:, 0]                  (reinforced)
    teacher_syn_text__<t>    float32 (N, D_t)      text_emb__<t>[:, 1 + j]              (reinforced, use_syn_captions)
    teacher_view__<t>        uint8 (N, 3, S_t, S_t) view k at teacher t's size (online_distill)
    teacher_tokens__<t>      int64 (N, T_t)        the real caption in teacher t's tokens (online_distill)
    teacher_syn_tokens__<t>  int64 (N, T_t)        caption j in teacher t's tokens (online_distill, use_syn_captions)

Views leave as uint8, a quarter of float32's bytes through the object store and the host-to-device copy; the
training step normalises them on its device with `augment.normalize` (the student's, or each teacher's, mean and
std), which gives the values `augment.replay` gives on the CPU.

In ``online_distill`` mode the teachers run inside the train step on exactly the views and captions the student
sees, so the loss is the reinforced loss with targets computed live instead of read.

Raw source shards (no reinforcement, mode ``clip`` only; used to train the demo's own teachers) go through
`AugmentBatch`: a fresh view is sampled per (seed, epoch, key) with `augment.sample` and rendered at the
student's preprocessing, giving ``image`` and ``text``.

Shape suffixes: N rows of a batch, K stored views a sample, L encoded view length, S synthetic captions, D a
teacher's embedding width, E = 1 + S text embeddings a sample, C channels (3), H and W the student's input size,
T the tokenizer's context length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from clipdr import augment, augparams, models, records
from clipdr.data import sources
from clipdr.train.plan import MODES, Mode

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names

IMAGE = "image"
TEXT = "text"
SYN_TEXT = "syn_text"
AUG_INDEX = "aug_index"
SYN_INDEX = "syn_index"
TEACHER_IMAGE_PREFIX = "teacher_image__"
TEACHER_TEXT_PREFIX = "teacher_text__"
TEACHER_SYN_TEXT_PREFIX = "teacher_syn_text__"
TEACHER_VIEW_PREFIX = "teacher_view__"
TEACHER_TOKENS_PREFIX = "teacher_tokens__"
TEACHER_SYN_TOKENS_PREFIX = "teacher_syn_tokens__"

_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")  # those `augment.replay` supports


def teacher_image_column(teacher: str) -> str:
    """Output column of ``teacher``'s embedding of the drawn view."""
    return TEACHER_IMAGE_PREFIX + records.validate_teacher_name(teacher)


def teacher_text_column(teacher: str) -> str:
    """Output column of ``teacher``'s embedding of the real caption."""
    return TEACHER_TEXT_PREFIX + records.validate_teacher_name(teacher)


def teacher_syn_text_column(teacher: str) -> str:
    """Output column of ``teacher``'s embedding of the drawn synthetic caption."""
    return TEACHER_SYN_TEXT_PREFIX + records.validate_teacher_name(teacher)


def teacher_view_column(teacher: str) -> str:
    """Output column of the drawn view rendered at ``teacher``'s preprocessing (``online_distill``)."""
    return TEACHER_VIEW_PREFIX + records.validate_teacher_name(teacher)


def teacher_tokens_column(teacher: str) -> str:
    """Output column of the real caption in ``teacher``'s tokens (``online_distill``)."""
    return TEACHER_TOKENS_PREFIX + records.validate_teacher_name(teacher)


def teacher_syn_tokens_column(teacher: str) -> str:
    """Output column of the drawn synthetic caption in ``teacher``'s tokens (``online_distill``)."""
    return TEACHER_SYN_TOKENS_PREFIX + records.validate_teacher_name(teacher)


def _mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; valid modes: {', '.join(MODES)}")
    return Mode(mode)


# --------------------------------------------------------------------------- dataset check


def check_dataset(
    uri: str, mode: str, teachers_required: Sequence[str] = (), min_syn_captions: int = 0
) -> records.ReinforcedDataset:
    """Opens a reinforced dataset for training in ``mode``, refusing one that lacks what the mode needs.

    Args:
        uri: The dataset directory (path, ``file://`` or ``s3://``).
        mode: ``reinforced`` needs the stored embeddings of every teacher in ``teachers_required`` (at least one);
            ``clip`` and ``online_distill`` read no stored embeddings, so ``teachers_required`` is not checked.
        teachers_required: Teachers whose embeddings the run distils from (``reinforced`` only).
        min_syn_captions: Fewest synthetic captions a sample the run needs: 1 when it trains on synthetic
            captions, 0 otherwise (any mode).

    Returns:
        The opened dataset (manifest checked against every shard's footer).

    Raises:
        ValueError: An unknown mode, or ``reinforced`` without teachers.
        records.RecordsError: The dataset does not fit; the message names the mode and what differs.
    """
    mode = _mode(mode)
    if isinstance(min_syn_captions, bool) or not isinstance(min_syn_captions, int) or min_syn_captions < 0:
        raise ValueError(f"min_syn_captions must be an integer >= 0, got {min_syn_captions!r}")
    teachers = list(teachers_required) if mode.reads_embeddings else []
    if mode.reads_embeddings and not teachers:
        raise ValueError("mode 'reinforced' distils from stored teacher embeddings: name at least one teacher")
    for name in teachers:
        records.validate_teacher_name(name)
    try:
        return records.open_dataset(uri, require_teachers=teachers, min_syn_captions=min_syn_captions)
    except records.RecordsError as e:
        raise records.RecordsError(f"cannot train in mode '{mode}' on this dataset: {e}") from None


# --------------------------------------------------------------------------- student preprocessing


@dataclass(frozen=True)
class StudentPreprocess:
    """What the data path needs of a student: its input size and normalisation, and its text context length.

    Attributes:
        image_size: ``(height, width)`` of the student's input views.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        interpolation: Resize interpolation of the crop (one `augment.replay` supports).
        context_length: T, tokens a caption is padded or truncated to.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    context_length: int

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"image_size must be a positive int or a (height, width) pair, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"mean and std need 3 channels each, std > 0; got mean {self.mean}, std {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} cannot replay stored views; use one of {_INTERPOLATIONS}"
            )
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {self.context_length!r}")

    @classmethod
    def of(
        cls, preprocess: models.Preprocess, image_size: int | Sequence[int], context_length: int
    ) -> StudentPreprocess:
        """From a model's preprocessing (`models.Preprocess`), input size and text context length."""
        return cls(image_size, preprocess.mean, preprocess.std, preprocess.interpolation, context_length)


def student_preprocess(name: str) -> StudentPreprocess:
    """The preprocessing of student ``name``, from its own config.

    A registered variant (`models.list_variants`) needs no model: the size and context length come from its
    open_clip JSON config, mean/std/interpolation from the registry (what `models.create_model` attaches). Any
    other open_clip model is built on the meta device (nothing allocated, no weights) and its
    ``visual.preprocess_cfg`` read.
    """
    if name in models.list_variants():
        cfg = models.model_config(name)
        preprocess = models.get_variant(name).preprocess
        return StudentPreprocess.of(preprocess, cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"])
    with torch.device("meta"):
        model = models.create_model(name, device="meta")
    pp_cfg = model.visual.preprocess_cfg
    return StudentPreprocess.of(models.Preprocess.from_open_clip(pp_cfg), pp_cfg["size"], int(model.context_length))


# --------------------------------------------------------------------------- draws

SAMPLED_GENERATION_TYPES = ("top_p", "top_k")
"""Decodings whose S captions of an image are independent draws, so caption j of one sample is exchangeable with
caption j of another and one j may serve a whole epoch (`shared_draw`). Beam search orders them by score: its sets
keep a draw per sample."""


def _hash64(seed: int, epoch: int, key: str, what: str) -> int:
    payload = json.dumps([int(seed), int(epoch), str(key), what]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def shared_draw(
    manifest: records.Manifest, seed: int, epoch: int, caption_sets: Sequence[str], num_syn_captions: int
) -> tuple[int | None, int | None]:
    """The view k and synthetic caption j that every sample uses in ``epoch``, a pure function of ``(seed, epoch)``.

    Args:
        manifest: The dataset's; only a view-major one (`records.Manifest.view_major`) shares a draw.
        seed: Run-level seed.
        epoch: Epoch number; each epoch draws afresh.
        caption_sets: The caption sets drawn from (empty: no synthetic caption is used).
        num_syn_captions: n, the first captions of those sets concatenated that j is drawn from (0: none).

    Returns:
        ``(k, j)``; None where the draw is per sample (`draw_indices`): both for a version 1 dataset, j when no
        caption is drawn or a set's captioner decodes other than by sampling (`SAMPLED_GENERATION_TYPES`).
    """
    if not manifest.view_major:
        return None, None
    view = _hash64(seed, epoch, "", "aug:epoch") % manifest.num_augmentations
    sampled = all(manifest.captioner_of(s).generation_type in SAMPLED_GENERATION_TYPES for s in caption_sets)
    if num_syn_captions < 1 or not caption_sets or not sampled:
        return view, None
    return view, _hash64(seed, epoch, "", "syn:epoch") % num_syn_captions


def draw_indices(
    seed: int, epoch: int, keys: Sequence[str], num_augmentations: int, num_syn_captions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The view and synthetic caption each sample uses in one epoch, a pure function of ``(seed, epoch, key)``.

    Args:
        seed: Run-level seed.
        epoch: Epoch number; each epoch draws afresh.
        keys: The samples' keys (`records.KEY`).
        num_augmentations: K, stored views a sample.
        num_syn_captions: S, synthetic captions a sample; 0 gives j = -1 (none).

    Returns:
        ``(aug_index_N, syn_index_N)``, int64: k in [0, K) and j in [0, S). Independent hashes, so k and j are
        uncorrelated; the 64-bit hash makes the modulo bias negligible.
    """
    if num_augmentations < 1:
        raise ValueError(f"num_augmentations (K) must be >= 1, got {num_augmentations}")
    aug_index_N = np.array([_hash64(seed, epoch, key, "aug") % num_augmentations for key in keys], dtype=np.int64)
    if num_syn_captions < 1:
        return aug_index_N, np.full(len(keys), -1, dtype=np.int64)
    syn_index_N = np.array([_hash64(seed, epoch, key, "syn") % num_syn_captions for key in keys], dtype=np.int64)
    return aug_index_N, syn_index_N


# --------------------------------------------------------------------------- the batch transform

Batch = pa.Table | pa.RecordBatch | Mapping[str, Any]


def _stack(values: Any) -> np.ndarray:
    """A (possibly object-dtype, nested) array of arrays as one regular numpy array."""
    array = np.asarray(values)
    if array.dtype != object or array.size == 0:
        return array
    return np.stack([_stack(v) for v in array])


def _column(batch: pa.Table | pa.RecordBatch, name: str) -> pa.Array | pa.ChunkedArray:
    if name not in batch.schema.names:
        raise records.RecordsError(f"no column {name!r}; the batch has {batch.schema.names}")
    return batch.column(name)


def _strings(batch: Batch, name: str) -> list[str]:
    if isinstance(batch, pa.Table | pa.RecordBatch):
        return [str(s) for s in _column(batch, name).to_pylist()]
    if name not in batch:
        raise records.RecordsError(f"no column {name!r}; the batch has {list(batch)}")
    return [str(s) for s in batch[name]]


def _images(batch: Batch) -> list[bytes]:
    if isinstance(batch, pa.Table | pa.RecordBatch):
        return _column(batch, records.IMAGE).to_pylist()
    return [bytes(b) for b in batch[records.IMAGE]]


def _check_set_embeddings(manifest: records.Manifest, teacher: str, caption_set: str) -> None:
    """RecordsError when the dataset holds no text embeddings of ``caption_set`` by ``teacher`` (the distillation
    targets of those captions)."""
    if caption_set == records.DEFAULT_CAPTION_SET:
        return  # rows 1..S of every teacher's text embeddings, a base teacher's or an added one's
    column = records.set_text_emb_column(teacher, caption_set)
    if manifest.part_of_column(column) is None:
        raise records.RecordsError(
            f"teacher {teacher!r} has no text embeddings of caption set {caption_set!r} ({column}): distil from "
            "teachers that embedded it, or leave the set out of train.syn_caption_sets"
        )


def _syn_captions(batch: Batch, num_rows: int, column: str = records.SYN_CAPTIONS) -> list[list[str]]:
    rows = _column(batch, column).to_pylist() if isinstance(batch, pa.Table | pa.RecordBatch) else batch[column]
    rows = [[str(c) for c in row] for row in rows]
    assert len(rows) == num_rows, (len(rows), num_rows)
    return rows


def _has(batch: Batch, name: str) -> bool:
    return name in (batch.schema.names if isinstance(batch, pa.Table | pa.RecordBatch) else batch)


def _select(batch: Batch, column: str, rows_N: np.ndarray, num_rows: int, shape: tuple[int, ...]) -> np.ndarray:
    """Row ``rows_N[i]`` of sample i of per-row column ``column`` (`records.is_row_major`, ``num_rows`` rows of
    ``shape``), from either layout: the whole nested column (version 1), or the drawn rows' own columns
    (`records.row_column`), the only ones a view-major read fetches. A row of -1 gives zeros and reads nothing."""
    N, wanted_N = len(rows_N), rows_N >= 0
    if _has(batch, column):
        values_NRX = _nested(batch, column, (num_rows, *shape))
        out = values_NRX[np.arange(N), np.where(wanted_N, rows_N, 0)]
        out[~wanted_N] = 0
        return out
    out = None
    for row in np.unique(rows_N[wanted_N]):
        name = records.row_column(column, int(row))
        if not _has(batch, name):
            names = batch.schema.names if isinstance(batch, pa.Table | pa.RecordBatch) else list(batch)
            raise records.RecordsError(f"no column {column!r} nor its row {name!r}; the batch has {names}")
        values_NX = _nested(batch, name, shape)
        out = np.zeros_like(values_NX) if out is None else out
        out[rows_N == row] = values_NX[rows_N == row]
    return np.zeros((N, *shape), dtype=np.float32) if out is None else out


def _nested(batch: Batch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Column ``name`` as an (N, *shape) array; RecordsError when it has another shape."""
    if isinstance(batch, pa.Table | pa.RecordBatch):
        array = records.fixed_shape_numpy(_column(batch, name))
    elif name not in batch:
        raise records.RecordsError(f"no column {name!r}; the batch has {list(batch)}")
    else:
        array = _stack(batch[name])
        if array.size == 0:
            array = array.reshape(0, *shape)
    if array.shape[1:] != shape:
        raise records.RecordsError(f"column {name!r} has rows of shape {array.shape[1:]}, the manifest says {shape}")
    return array


class ReplayBatch:
    """Turns a batch of reinforced records into a student batch (module docstring); a Ray Data UDF.

    Args:
        manifest: The dataset's manifest (K, S, aug param length, teachers and their D).
        preprocess: The student's preprocessing (`student_preprocess`).
        tokenizer_name: Model name whose open_clip tokenizer encodes the captions (the student's).
        seed: Run-level seed of the draws.
        epoch: Epoch of the draws.
        mode: A `plan.Mode`. Only ``reinforced`` reads and outputs teacher embeddings.
        use_syn_captions: Also draw, tokenise (and in ``reinforced`` mode, select the embedding of) one
            synthetic caption a sample; needs S >= 1.
        teachers: Teachers to output in ``reinforced`` mode; None for all of the manifest's, in its order.
        num_syn_captions: Draw the synthetic caption from the first n of the chosen sets' S (their captions
            concatenated); 0 for all S.
        caption_sets: The caption sets drawn from, in order (`records.Manifest.caption_sets`: ``default``, the
            base shards' own, whose text embeddings are rows 1..S of `records.text_emb_column`, and sets added as
            parts, whose embeddings are `records.set_text_emb_column`); None for every set of the manifest.
    """

    def __init__(
        self,
        manifest: records.Manifest,
        preprocess: StudentPreprocess,
        tokenizer_name: str,
        seed: int,
        epoch: int,
        mode: str = Mode.REINFORCED,
        use_syn_captions: bool = True,
        teachers: Sequence[str] | None = None,
        num_syn_captions: int = 0,
        caption_sets: Sequence[str] | None = None,
    ) -> None:
        mode = _mode(mode)
        sets = manifest.caption_sets
        self.caption_sets = tuple(sets if caption_sets is None else caption_sets)
        unknown = [s for s in self.caption_sets if s not in sets]
        if unknown:
            raise records.RecordsError(f"no caption sets {unknown} in this dataset; it has {list(sets)}")
        total = sum(sets[s] for s in self.caption_sets)
        if use_syn_captions and total < 1:
            raise ValueError(
                "use_syn_captions needs synthetic captions, but the dataset has none (num_syn_captions = 0)"
            )
        if not 0 <= num_syn_captions <= total:
            raise ValueError(f"num_syn_captions = {num_syn_captions}: the caption sets have {total} a sample (0: all)")
        names = list(manifest.teacher_names if teachers is None else teachers)
        for name in names:
            manifest.teacher(name)  # RecordsError naming the known teachers
            if mode.reads_embeddings and use_syn_captions:
                for caption_set in self.caption_sets:
                    _check_set_embeddings(manifest, name, caption_set)
        self.manifest = manifest
        self.preprocess = preprocess
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.mode = mode
        self.use_syn_captions = bool(use_syn_captions)
        self.num_syn_captions = num_syn_captions or total
        self.teachers = tuple(names) if mode.reads_embeddings else ()
        # A view-major dataset: the (k, j) every sample of this epoch uses; None where it is drawn per sample.
        drawn_sets = self.caption_sets if self.use_syn_captions else ()
        drawn_S = self.num_syn_captions if self.use_syn_captions else 0
        self.view, self.syn_caption = shared_draw(manifest, self.seed, self.epoch, drawn_sets, drawn_S)
        self.tokenizer = _tokenizer(tokenizer_name, preprocess.context_length)
        # online_distill: each teacher's preprocessing and tokenizer, to feed it the student's view and captions.
        self.online: list[tuple[records.TeacherSpec, Any]] = []
        if mode.runs_teachers_online:
            for name in names:
                spec = manifest.teacher(name)
                self.online.append((spec, _tokenizer(spec.model)))

    def _tokenize(self, texts: list[str]) -> np.ndarray:
        return _tokenize(self.tokenizer, texts, self.preprocess.context_length)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        manifest = self.manifest
        K, S = manifest.num_augmentations, manifest.num_syn_captions
        keys = _strings(batch, records.KEY)
        drawn_S = self.num_syn_captions if self.use_syn_captions else 0
        drawn_aug_N, drawn_syn_N = self._draw(keys, drawn_S)
        views_NL = _select(batch, records.AUG_PARAMS, drawn_aug_N, K, (manifest.aug_param_length,))
        pres = [self.preprocess] + [
            StudentPreprocess(spec.image_size, spec.mean, spec.std, spec.interpolation, 1) for spec, _ in self.online
        ]
        views, rows_N = _replay_rows(keys, _images(batch), views_NL, drawn_aug_N, pres)
        aug_index_N, syn_index_N = drawn_aug_N[rows_N], drawn_syn_N[rows_N]

        real_captions = _strings(batch, records.CAPTION)
        captions = [real_captions[i] for i in rows_N]
        out = {IMAGE: views[0], TEXT: self._tokenize(captions), AUG_INDEX: aug_index_N}
        if self.use_syn_captions:
            per_set = [self._set_captions(batch, s, len(keys)) for s in self.caption_sets]
            syn = [[c for row in rows for c in row] for rows in zip(*per_set, strict=True)]  # sets concatenated
            syn_captions = [syn[i][j] for i, j in zip(rows_N, syn_index_N, strict=True)]
            out[SYN_TEXT] = self._tokenize(syn_captions)
            out[SYN_INDEX] = syn_index_N
        for (spec, tokenizer), view_NCHW in zip(self.online, views[1:], strict=True):
            out[teacher_view_column(spec.name)] = view_NCHW
            length = int(getattr(tokenizer, "context_length", 77))
            out[teacher_tokens_column(spec.name)] = _tokenize(tokenizer, captions, length)
            if self.use_syn_captions:
                out[teacher_syn_tokens_column(spec.name)] = _tokenize(tokenizer, syn_captions, length)
        for name in self.teachers:
            D = manifest.teacher(name).embed_dim
            image_emb_ND = _select(batch, records.image_emb_column(name), drawn_aug_N, K, (D,))
            real_emb_ND = _select(batch, records.text_emb_column(name), np.zeros_like(drawn_aug_N), 1 + S, (D,))
            out[teacher_image_column(name)] = image_emb_ND[rows_N].astype(np.float32)
            out[teacher_text_column(name)] = real_emb_ND[rows_N].astype(np.float32)
            if self.use_syn_captions:
                syn_emb_ND = np.zeros((len(keys), D), dtype=np.float32)
                first_of_set = 0  # caption j of the sets concatenated is row j - first_of_set of its set
                for caption_set in self.caption_sets:
                    count = manifest.caption_sets[caption_set]
                    inside_N = (drawn_syn_N >= first_of_set) & (drawn_syn_N < first_of_set + count)
                    if inside_N.any():
                        column, first = records.set_text_rows(name, caption_set)
                        stored_rows = (1 + S) if caption_set == records.DEFAULT_CAPTION_SET else count
                        rows = np.where(inside_N, drawn_syn_N - first_of_set + first, -1)
                        syn_emb_ND[inside_N] = _select(batch, column, rows, stored_rows, (D,))[inside_N]
                    first_of_set += count
                out[teacher_syn_text_column(name)] = syn_emb_ND[rows_N]
        return out

    def _draw(self, keys: Sequence[str], drawn_S: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's (k, j): this epoch's shared ones (`shared_draw`), or per key (`draw_indices`) where none is."""
        K, N = self.manifest.num_augmentations, len(keys)
        per_key = self.view is None or (drawn_S > 0 and self.syn_caption is None)
        aug_index_N, syn_index_N = draw_indices(self.seed, self.epoch, keys, K, drawn_S) if per_key else (None, None)
        if self.view is not None:
            aug_index_N = np.full(N, self.view, dtype=np.int64)
        if self.syn_caption is not None or drawn_S == 0:
            syn_index_N = np.full(N, -1 if drawn_S == 0 else self.syn_caption, dtype=np.int64)
        return aug_index_N, syn_index_N

    def _set_captions(self, batch: Batch, caption_set: str, num_rows: int) -> list[list[str]]:
        return _syn_captions(batch, num_rows, records.syn_captions_column(caption_set))


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str, context_length: int | None = None) -> Any:
    """Model ``name``'s open_clip tokenizer, built once per process (transforms are rebuilt per epoch)."""
    return models.get_tokenizer(name, **({} if context_length is None else {"context_length": context_length}))


def _tokenize(tokenizer: Any, texts: list[str], context_length: int) -> np.ndarray:
    if not texts:
        return np.zeros((0, context_length), dtype=np.int64)
    return tokenizer(texts).numpy().astype(np.int64, copy=False)


def _replay_rows(
    keys: Sequence[str],
    images: Sequence[bytes],
    views_NL: np.ndarray,
    aug_index_N: np.ndarray,
    pres: Sequence[StudentPreprocess],
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each row's drawn view (``views_NL``, view ``aug_index_N`` of the row) replayed at every preprocessing of
    ``pres``; a row that fails is stood in for.

    A row whose image does not decode or whose stored view does not load or replay (a ValueError: e.g. a magnitude
    outside `augparams.check_op`, from a dataset written before conversions checked it) must not fail the batch, nor
    shorten it: every rank steps on whole batches of a fixed size, and an epoch is cut to a row count the plan
    fixed, so a missing row would desynchronise the ranks or end the stream early. The row is replaced by the
    previous good row of the batch (the next one for the first), which keeps every count; each replacement is
    logged with its key and reason. A batch with no good row raises: that is a broken dataset, not a bad sample.

    Returns:
        One (N, 3, H, W) uint8 array per preprocessing, and ``rows_N``: the input row each output row comes from
        (``i`` itself, or the row that stands in for it), to select its captions and embeddings with.
    """
    N = len(keys)
    out = [np.empty((N, 3, *pre.image_size), dtype=np.uint8) for pre in pres]
    good_N = np.ones(N, dtype=bool)
    failures = []
    for i, (key, image_bytes, view_L, k) in enumerate(zip(keys, images, views_NL, aug_index_N, strict=True)):
        try:
            image, view = sources.decode_rgb(image_bytes), augparams.AugParams.from_array(view_L)
            for view_NCHW, p in zip(out, pres, strict=True):
                view_NCHW[i] = augment.replay_uint8(image, view, p.image_size, p.interpolation).numpy()
        except ValueError as e:  # sources.InvalidSampleError is one
            good_N[i] = False
            failures.append(f"{key} (view {k}): {e}")
    rows_N = np.arange(N)
    if failures:
        if not good_N.any():
            raise ValueError(f"no row of a batch of {N} replays, e.g. {failures[0]}")
        logger.warning("replaced %d of %d rows that do not replay: %s", len(failures), N, "; ".join(failures))
        rows_N = np.maximum.accumulate(np.where(good_N, rows_N, -1))  # the last good row at or before each row
        rows_N[rows_N < 0] = np.flatnonzero(good_N)[0]  # rows before the first good row take that one
        for view_NCHW in out:
            view_NCHW[:] = view_NCHW[rows_N]
    return out, rows_N


def _render(images: Sequence[Any], params: Sequence[augparams.AugParams], pre: StudentPreprocess) -> np.ndarray:
    """(N, 3, H, W) uint8: each image's view replayed at ``pre``'s size and interpolation."""
    image_NCHW = np.empty((len(images), 3, *pre.image_size), dtype=np.uint8)
    for i, (image, view) in enumerate(zip(images, params, strict=True)):
        image_NCHW[i] = augment.replay_uint8(image, view, pre.image_size, pre.interpolation).numpy()
    return image_NCHW


class AugmentBatch:
    """Turns a batch of raw source samples (``key``, ``image`` bytes, ``caption``) into a ``clip`` student batch.

    Nothing is stored to replay, so each sample's view is sampled afresh from ``(seed, key, epoch)``
    (`augment.sample` with the epoch as the view index): deterministic, and different every epoch.

    Args:
        augment_spec: The augmentations to sample (the run config's, converted).
        preprocess: The student's preprocessing (`student_preprocess`).
        tokenizer_name: Model name whose open_clip tokenizer encodes the captions.
        seed: Run-level seed of the views.
        epoch: Epoch of the views.
    """

    def __init__(
        self,
        augment_spec: records.AugmentSpec,
        preprocess: StudentPreprocess,
        tokenizer_name: str,
        seed: int,
        epoch: int,
    ) -> None:
        augment.check_spec(augment_spec)
        self.augment_spec = augment_spec
        self.preprocess = preprocess
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.tokenizer = _tokenizer(tokenizer_name, preprocess.context_length)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        keys = _strings(batch, records.KEY)
        images = [sources.decode_rgb(b) for b in _images(batch)]
        params = [
            augment.sample(image.size, key, self.epoch, self.augment_spec, self.seed)
            for image, key in zip(images, keys, strict=True)
        ]
        return {
            IMAGE: _render(images, params, self.preprocess),
            TEXT: _tokenize(self.tokenizer, _strings(batch, records.CAPTION), self.preprocess.context_length),
        }
