"""What a training run ships to Ray's processes, importable without torch or open_clip.

Every fit starts fresh processes that unpickle the training function and the input stream only to hold and
forward them: Ray Train's controller and dataset manager, and Ray Data's split coordinator, one after the other
before the first step. A pickle that refers to `clipdr.train.loop` or `clipdr.train.data` makes each of them import
torch, open_clip and (through it) transformers, scikit-learn and scipy: about 8 s of CPU apiece on a 2-core machine
(a fit's Ray timeline, docs/train.md). What this module ships names the real work by plain data and imports it
when first called, in the process that does the work: the Train worker and the loader tasks.
"""

from __future__ import annotations

import functools
import json
from typing import Any

REPLAY = "replay"  # `data.ReplayBatch`: reinforced records -> student batches
AUGMENT = "augment"  # `data.AugmentBatch`: raw source samples -> fresh views (mode clip)


def train_loop(config: dict) -> None:
    """The ``train_loop_per_worker`` of every run (`clipdr.train.loop.train_loop_per_worker`)."""
    from clipdr.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def read_source_shard(row: dict) -> list[dict]:
    """Every valid sample of the raw source shard ``row["uri"]`` as a row (key, image bytes, caption); corrupt
    samples are skipped as the source readers skip them."""
    import collections

    from clipdr import records
    from clipdr.data import sources

    skipped: collections.Counter = collections.Counter()
    return [
        {records.KEY: s.key, records.IMAGE: s.image_bytes, records.CAPTION: s.caption}
        for s in sources.iter_shard(row["uri"], skipped)
    ]


def count_source_shard(uri: str) -> int:
    """Valid samples of the raw source shard ``uri``: `read_source_shard`'s rows, counted where they are read."""
    import collections

    from clipdr.data import sources

    return sum(1 for _ in sources.iter_shard(uri, collections.Counter()))


class ReadWithParts:
    """A ``map_batches`` callable reading, for each ``shard`` path of a batch, ``columns`` of that base shard of the
    dataset at ``uri`` joined with its part files (`records.read_shard_with_parts`); shipped as plain data."""

    def __init__(self, uri: str, manifest: dict, columns: list[str]) -> None:
        self.uri = uri
        self.manifest = json.dumps(manifest, sort_keys=True)
        self.columns = list(columns)

    def __call__(self, batch: dict) -> Any:
        import pyarrow as pa

        from clipdr import records

        manifest = _manifest(self.manifest)
        tables = [records.read_shard_with_parts(self.uri, manifest, str(p), self.columns) for p in batch["shard"]]
        return pa.concat_tables(tables)


@functools.lru_cache(maxsize=4)
def _manifest(text: str) -> Any:
    from clipdr import records

    return records.Manifest.from_dict(json.loads(text))


class BatchTransform:
    """A ``map_batches`` callable shipped as plain data: which transform (`REPLAY` or `AUGMENT`) and its arguments.

    The transform is built at the first batch a process sees and reused for the next ones: pooled loader tasks
    share it, and the tokenizer loads once per process.

    Args:
        kind: `REPLAY` (arguments of `data.ReplayBatch`, with ``manifest`` as its dict) or `AUGMENT` (those of
            `data.AugmentBatch`, with ``augment_cfg`` as its dict); ``preprocess`` is a `data.StudentPreprocess`
            as a dict in both.
        **arguments: JSON-serialisable arguments of the transform.
    """

    def __init__(self, kind: str, **arguments: Any) -> None:
        if kind not in (REPLAY, AUGMENT):
            raise ValueError(f"unknown batch transform {kind!r}; use {REPLAY!r} or {AUGMENT!r}")
        self.kind = kind
        self.arguments = json.dumps(arguments, sort_keys=True)

    def __call__(self, batch: Any) -> dict:
        return _build(self.kind, self.arguments)(batch)


@functools.lru_cache(maxsize=4)
def _build(kind: str, arguments: str) -> Any:
    from clipdr import config, records
    from clipdr.train import data

    args = json.loads(arguments)
    preprocess = data.StudentPreprocess(**args.pop("preprocess"))
    if kind == REPLAY:
        manifest = records.Manifest.from_dict(args.pop("manifest"))
        return data.ReplayBatch(manifest, preprocess, **args)
    augment_cfg = config.from_dict(config.AugmentConfig, args.pop("augment_cfg"), "augment")
    return data.AugmentBatch(records.AugmentSpec.from_config(augment_cfg), preprocess, **args)
