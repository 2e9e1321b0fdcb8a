"""Evaluation datasets in clip_benchmark's webdataset layout: discovery and sample streams.

A zero-shot classification task is a folder (path or ``s3://``)::

    <task>/classnames.txt                          one class name a line; a label indexes these lines
    <task>/zeroshot_classification_templates.txt   one prompt a line, ``{c}`` where the class name goes
    <task>/test/0.tar, 1.tar, ...                  key.<jpg|jpeg|png|webp> + key.cls (the label, an integer)

A folder of such task folders (the synthetic world's ``zeroshot/``) holds several tasks. A retrieval dataset is
a folder of webdataset tars, in ``<name>/test/`` (clip_benchmark) or directly in ``<name>/`` (the world's
``retrieval/``): key.<image> + key.txt with the captions one a line, or key.json holding a list of captions or
``{"captions": [...]}`` (a ``.txt`` wins; the world's ``.json`` is scene metadata). A retrieval folder without
tars may hold Parquet source shards (`clipdr.data.sources` layout, one caption per image).

Dataset names (metric names) are folder names, with clip_benchmark's ``wds_`` prefix dropped. Tars are read
with `clipdr.data.sources.iter_tar_groups`; images are decoded by the caller, which caches them.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from clipdr import storage
from clipdr.data import sources

logger = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
SPLIT = "test"
LABEL_EXTENSION = "cls"
CLASS_PLACEHOLDER = "{c}"
_WANTED = frozenset({*sources.IMAGE_EXTENSIONS, LABEL_EXTENSION, sources.CAPTION_EXTENSION, sources.META_EXTENSION})


@dataclass(frozen=True)
class ZeroShotTask:
    """One zero-shot classification dataset.

    Attributes:
        name: Its name in metric names.
        uri: Its folder.
        classnames: Class names; label i is ``classnames[i]``.
        templates: Prompts with ``{c}``.
        shards: Its tar shards, in reading order.
    """

    name: str
    uri: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    shards: tuple[str, ...]

    def prompts(self) -> list[str]:
        """Every (class, template) prompt, class-major: ``C * T`` strings."""
        return [t.replace(CLASS_PLACEHOLDER, c) for c in self.classnames for t in self.templates]


@dataclass(frozen=True)
class RetrievalSet:
    """One image-text retrieval dataset: its name, folder and shards (tars, or Parquet source shards)."""

    name: str
    uri: str
    shards: tuple[str, ...]


@dataclass(frozen=True)
class EvalSample:
    """One sample as stored: the encoded image and its label (zero-shot) or captions (retrieval)."""

    key: str
    image_bytes: bytes
    label: int = -1
    captions: tuple[str, ...] = ()


def dataset_name(uri: str) -> str:
    return storage.basename(uri).removeprefix("wds_")


def _shard_order(uri: str) -> tuple[int, int | str]:
    # clip_benchmark numbers shards 0.tar .. n-1.tar: 10.tar comes after 9.tar, not after 1.tar.
    stem = storage.basename(uri).split(".", 1)[0]
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _tars(uri: str) -> list[str]:
    return sorted(storage.list_files(uri, suffixes=sources.TAR_SUFFIXES), key=_shard_order)


def _read_lines(uri: str) -> tuple[str, ...]:
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _task(uri: str) -> ZeroShotTask:
    name = dataset_name(uri)
    classnames = _read_lines(storage.join(uri, CLASSNAMES_FILE))
    templates_uri = storage.join(uri, TEMPLATES_FILE)
    if not storage.exists(templates_uri):
        raise ValueError(f"zero-shot task {name!r} has no {TEMPLATES_FILE} ({uri})")
    templates = _read_lines(templates_uri)
    if not classnames or not templates:
        raise ValueError(f"zero-shot task {name!r} has {len(classnames)} class names and {len(templates)} templates")
    missing = [t for t in templates if CLASS_PLACEHOLDER not in t]
    if missing:
        raise ValueError(f"zero-shot task {name!r}: templates without {CLASS_PLACEHOLDER}: {missing} ({templates_uri})")
    shards = _tars(storage.join(uri, SPLIT)) or _tars(uri)
    if not shards:
        raise ValueError(f"zero-shot task {name!r} has no tar shards in {storage.join(uri, SPLIT)} or {uri}")
    return ZeroShotTask(name, uri, classnames, templates, tuple(shards))


def find_zeroshot_tasks(uri: str) -> list[ZeroShotTask]:
    """The tasks at ``uri``: the task folder itself, or every task folder directly inside it (sorted by name).

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ValueError: No task is there, or one is incomplete (no templates, no shards, a template without ``{c}``).
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"zero-shot dataset {uri!r} does not exist")
    if storage.exists(storage.join(uri, CLASSNAMES_FILE)):
        return [_task(uri)]
    prefix = storage.join(uri, "")
    folders = sorted(
        {
            found[len(prefix) :].rsplit("/", 1)[0].replace("\\", "/")
            for found in storage.list_files(uri, suffixes=(CLASSNAMES_FILE,), recursive=True)
            if storage.basename(found) == CLASSNAMES_FILE
        }
    )
    tasks = [_task(storage.join(uri, folder)) for folder in folders if folder and "/" not in folder]
    if not tasks:
        raise ValueError(
            f"no zero-shot task at {uri!r}: expected {CLASSNAMES_FILE} in it or in its sub-folders "
            "(clip_benchmark webdataset layout)"
        )
    return sorted(tasks, key=lambda task: task.name)


def find_retrieval_set(uri: str) -> RetrievalSet:
    """The retrieval dataset at ``uri``: tars in ``uri/test/`` or ``uri/``, else Parquet source shards under it.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ValueError: It holds no shards.
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"retrieval dataset {uri!r} does not exist")
    shards = _tars(storage.join(uri, SPLIT)) or _tars(uri)
    if not shards:
        found = storage.list_files(uri, suffixes=sources.PARQUET_SUFFIXES, recursive=True)
        shards = sorted(found, key=_shard_order)
    if not shards:
        raise ValueError(f"retrieval dataset {uri!r} has no tar shards (in {SPLIT}/ or itself) nor Parquet shards")
    return RetrievalSet(dataset_name(uri), uri, tuple(shards))


def _captions(group: dict) -> tuple[str, ...]:
    raw_text = group.get(sources.CAPTION_EXTENSION)
    if isinstance(raw_text, bytes):
        return tuple(line.strip() for line in raw_text.decode("utf-8-sig").splitlines() if line.strip())
    raw_json = group.get(sources.META_EXTENSION)
    if isinstance(raw_json, bytes):
        try:
            data = json.loads(raw_json)
        except ValueError:
            return ()
        if isinstance(data, dict):
            data = data.get("captions", data.get("caption", []))
        if isinstance(data, str):
            data = [data]
        if isinstance(data, list):
            return tuple(c.strip() for c in data if isinstance(c, str) and c.strip())
    return ()


def _image(group: dict) -> bytes | None:
    ext = next((e for e in sources.IMAGE_EXTENSIONS if e in group), None)
    data = group[ext] if ext else None
    return data if isinstance(data, bytes) else None  # TooLarge members count as missing


def stratified_subset(labels: Sequence[int], max_samples: int, seed: int) -> list[int]:
    """Indices of a seeded, class-stratified subset of ``max_samples`` of the samples with these labels, in order.

    Each class gets ``floor(n_c * max_samples / n)`` or one more (largest remainders first, ties in a seeded
    order), so its share of the subset is its share of the dataset to within one sample, and its members are a
    seeded uniform draw among its samples. All labels equal: a seeded uniform subset. ``max_samples`` <= 0 or
    >= ``len(labels)``: every index.
    """
    num = len(labels)
    if max_samples <= 0 or max_samples >= num:
        return list(range(num))
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = collections.defaultdict(list)
    for index, label in enumerate(labels):
        members[label].append(index)
    classes = sorted(members)
    quota = {c: len(members[c]) * max_samples // num for c in classes}
    tie_order = dict(zip(classes, rng.permutation(len(classes)).tolist(), strict=True))
    by_remainder = sorted(classes, key=lambda c: (-(len(members[c]) * max_samples % num), tie_order[c]))
    for c in by_remainder[: max_samples - sum(quota.values())]:
        quota[c] += 1
    chosen = [members[c][i] for c in classes for i in rng.choice(len(members[c]), quota[c], replace=False).tolist()]
    return sorted(chosen)


def _subset(
    read: Callable[[collections.Counter], Iterator[EvalSample]],
    skipped: collections.Counter,
    max_samples: int,
    seed: int,
    label: Callable[[EvalSample], int],
) -> Iterator[EvalSample]:
    """All samples of ``read``, or, with ``max_samples``, a `stratified_subset` by ``label``: a first pass reads
    the labels (and counts the skipped samples), a second yields the chosen ones. Reading is deterministic, so a
    sample's position is the same in both passes."""
    if max_samples <= 0:
        yield from read(skipped)
        return
    chosen = set(stratified_subset([label(sample) for sample in read(skipped)], max_samples, seed))
    for position, sample in enumerate(read(collections.Counter())):
        if position in chosen:
            yield sample


def iter_zeroshot_samples(
    task: ZeroShotTask, skipped: collections.Counter, max_samples: int = 0, seed: int = 0
) -> Iterator[EvalSample]:
    """The task's samples in shard order; with ``max_samples`` > 0 a seeded `stratified_subset` of them by class.

    clip_benchmark's exports are in dataset order (ImageNet's by class), so the first N would be a few classes.
    Samples without an image or a label are counted in ``skipped``; a label outside the class list is a data
    error and raises ``ValueError`` naming the shard and key.
    """
    return _subset(lambda counter: _zeroshot_samples(task, counter), skipped, max_samples, seed, lambda s: s.label)


def _zeroshot_samples(task: ZeroShotTask, skipped: collections.Counter) -> Iterator[EvalSample]:
    config = sources.DEFAULT_READER_CONFIG
    for shard in task.shards:
        try:
            for key, group in sources.iter_tar_groups(shard, config, wanted=_WANTED):
                image, raw_label = _image(group), group.get(LABEL_EXTENSION)
                if image is None or not isinstance(raw_label, bytes):
                    skipped["missing_image" if image is None else "missing_label"] += 1
                    continue
                try:
                    label = int(raw_label.decode().strip())
                except ValueError:
                    raise ValueError(f"{shard}: sample {key!r} has label {raw_label[:40]!r}, not an integer") from None
                if not 0 <= label < len(task.classnames):
                    raise ValueError(
                        f"{shard}: sample {key!r} has label {label}, outside the {len(task.classnames)} classes of "
                        f"{task.uri}/{CLASSNAMES_FILE}"
                    )
                yield EvalSample(key, image, label=label)
        except (sources.UnreadableShardError, sources.BrokenShardError) as e:
            skipped["broken_shard"] += 1
            logger.warning("evaluation shard %s is unreadable or broken, keeping what was read: %s", shard, e)


def iter_retrieval_samples(
    dataset: RetrievalSet, skipped: collections.Counter, max_samples: int = 0, seed: int = 0
) -> Iterator[EvalSample]:
    """The dataset's samples (image + at least one caption) in shard order; with ``max_samples`` > 0 a seeded
    uniform subset of them (`stratified_subset` with one class)."""
    return _subset(lambda counter: _retrieval_samples(dataset, counter), skipped, max_samples, seed, lambda s: 0)


def _retrieval_samples(dataset: RetrievalSet, skipped: collections.Counter) -> Iterator[EvalSample]:
    for shard in dataset.shards:
        if shard.lower().endswith(sources.PARQUET_SUFFIXES):
            pairs = ((s.key, s.image_bytes, (s.caption,)) for s in sources.iter_shard(shard, skipped))
        else:
            pairs = _tar_pairs(shard, skipped)
        for key, image, captions in pairs:
            yield EvalSample(key, image, captions=captions)


def _tar_pairs(shard: str, skipped: collections.Counter) -> Iterator[tuple[str, bytes, tuple[str, ...]]]:
    try:
        for key, group in sources.iter_tar_groups(shard, sources.DEFAULT_READER_CONFIG, wanted=_WANTED):
            image, captions = _image(group), _captions(group)
            if image is None or not captions:
                skipped["missing_image" if image is None else "missing_caption"] += 1
                continue
            yield key, image, captions
    except (sources.UnreadableShardError, sources.BrokenShardError) as e:
        skipped["broken_shard"] += 1
        logger.warning("evaluation shard %s is unreadable or broken, keeping what was read: %s", shard, e)
