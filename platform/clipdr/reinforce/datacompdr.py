"""DataCompDR conversion: a joined DataCompDR source (`clipdr.data.datacompdr`, the published format) into clipdr's
reinforced format, without recomputing anything; ``clipdr datacompdr`` runs it as a Ray job (`run`).

Conversion (`convert`): one source tar -> one reinforced Parquet shard of the same relative name, written with
`records.build_table` / `records.write_shard` (atomic); the manifest is written last with `records.write_manifest`.
Each shard's Parquet footer carries provenance (source shard, its size, a digest of the conversion settings) and its
skip counts, so a rerun reuses the shards that match and converts only the rest; the skip counts of reused shards
come from their footers. A source shard that cannot be opened at all writes nothing (retried on the next run).
``Manifest.augment_seed`` is meaningless here: the views come from Apple's generator, not `augment.sample`.

Caption sets. ``syn_text`` (DataCompDR's one set) is the base's ``default`` set; every other set the layout imports
(`DataCompDRLayout.caption_sets`, e.g. DFNDR's ``syn_text_dfn_mscoco38k``) is a ``captions`` part, one file a base
shard at `records.part_file`, written as ``reinforce.add = "captions"`` writes a set (`records.PartLayout`,
`records.build_table`; `KEY`, the set's captions, each teacher's text embeddings of them, in the base shard's row
order) and carrying the part's fingerprint in its footer, so training reads it with no code of its own. A shard is
reused only when its base file and every part file match.

Shape suffixes: K views a sample, S synthetic captions, L the length of a view's parameters, D one teacher's width.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipdr import augparams, records, storage
from clipdr.config import Config, fields_dict
from clipdr.data import sources
from clipdr.data.datacompdr import (
    DATACOMPDR_CAPTIONER,
    DATACOMPDR_TEACHERS,
    DEFAULT_LAYOUT,
    SYN_TEXT_KEY,
    DataCompDRError,
    DataCompDRLayout,
    find_caption_sets,
    iter_shard,
    source_captioner,
)
from clipdr.data.sources import DEFAULT_READER_CONFIG, ReaderConfig, SkipReason, SourceShard
from clipdr.records import CaptionerSpec, Manifest, ShardInfo, TeacherSpec

logger = logging.getLogger(__name__)

_FOOTER_KEY = b"clipdr.datacompdr"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataCompDRError(message)


@dataclass(frozen=True)
class ShardResult:
    """The outcome of one source shard.

    Attributes:
        shard: The source shard.
        info: The reinforced shard, None when the source could not be read at all (nothing was written).
        skipped: Skipped samples (and shard failures) by reason.
        max_norm_error: Largest ``|norm - 1|`` of its kept embeddings before renormalising.
        reused: Whether an existing reinforced shard from an earlier run was kept.
    """

    shard: SourceShard
    info: ShardInfo | None
    skipped: dict[str, int]
    max_norm_error: float
    reused: bool = False


def list_source_shards(source_uri: str) -> list[SourceShard]:
    """The tar shards of a DataCompDR source (a directory, recursively, or one tar), sorted by path.

    Raises:
        FileNotFoundError: Nothing exists at ``source_uri``.
        DataCompDRError: It holds no tar shards.
    """
    shards = [s for s in sources.describe_shards(source_uri) if s.path.lower().endswith(sources.TAR_SUFFIXES)]
    _check(bool(shards), f"no DataCompDR tar shards ({', '.join(sources.TAR_SUFFIXES)}) under {source_uri!r}")
    return shards


def _settings_digest(teachers: Sequence[TeacherSpec], layout: DataCompDRLayout) -> str:
    """Digest of what shapes a converted shard's content, so a rerun with other settings reconverts."""
    layout_dict = dataclasses.asdict(layout)
    if not layout.caption_sets:  # conversions made before the key existed keep their digest
        del layout_dict["caption_sets"]
    payload = {"teachers": [fields_dict(t) for t in teachers], "layout": layout_dict}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def caption_set_parts(
    teachers: Sequence[TeacherSpec], layout: DataCompDRLayout, shards: Sequence[ShardInfo] = ()
) -> tuple[records.PartSpec, ...]:
    """The ``captions`` parts of ``layout.caption_sets``, in order, each with one file a base shard of ``shards``.

    A part's fingerprint is a digest of the conversion settings and its source key: the same for every file of the
    part, and unchanged by shards added to the source, so files are reused shard by shard as base shards are.
    """
    settings = _settings_digest(teachers, layout)
    parts = []
    for name, (key, count) in zip(layout.set_names, layout.caption_sets, strict=True):
        part_name = records.part_name("captions", name)
        payload = {"settings": settings, "key": key, "num_syn_captions": count}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
        files = tuple(ShardInfo(records.part_file(part_name, s.path), s.num_rows) for s in shards)
        parts.append(
            records.PartSpec(
                name=part_name,
                kind="captions",
                fingerprint=f"datacompdr:{digest}",
                caption_set=name,
                num_syn_captions=count,
                captioner=source_captioner(key),
                teachers=tuple(t.name for t in teachers),
                shards=files,
            )
        )
    return tuple(parts)


def build_manifest(
    source_uri: str,
    shards: Sequence[SourceShard],
    *,
    teachers: Sequence[TeacherSpec] = DATACOMPDR_TEACHERS,
    layout: DataCompDRLayout = DEFAULT_LAYOUT,
    captioner: CaptionerSpec = DATACOMPDR_CAPTIONER,
    results: Sequence[ShardResult] = (),
) -> Manifest:
    """The manifest of a conversion: up front (no ``results``) for `records.build_table`, or final.

    Raises:
        records.RecordsError: Teachers that do not make a valid manifest (names, duplicates).
    """
    skipped: collections.Counter = collections.Counter()
    for result in results:
        skipped.update(result.skipped)
    infos = tuple(r.info for r in results if r.info is not None)
    return Manifest(
        teachers=tuple(teachers),
        augment=layout.augment,
        num_augmentations=layout.num_augmentations,
        num_syn_captions=layout.num_syn_captions,
        source_uri=source_uri,
        source_fingerprint=sources.fingerprint(shards),
        captioner=captioner if layout.num_syn_captions else None,  # S = 0: syn_text is not imported
        augment_seed=0,  # meaningless here: Apple's generator drew the views
        shards=infos,
        skipped=dict(skipped),
        has_uid=True,  # DataComp's uid, from each sample's json member: how users join back to DataComp metadata
        parts=caption_set_parts(teachers, layout, infos),
    )


def _provenance(shard: SourceShard, settings: str) -> dict[str, Any]:
    return {"source": shard.path, "source_size": shard.size, "settings": settings}


def completed_shard(
    output_uri: str, shard: SourceShard, manifest: Manifest, layout: DataCompDRLayout = DEFAULT_LAYOUT
) -> ShardResult | None:
    """The result of an earlier run's reinforced shard for ``shard``, or None when it must be (re)converted.

    A shard is reused when its footer reads, its schema fits the manifest and its provenance (source path, size,
    settings digest) matches; its skip counts come from the footer.
    """
    uri = storage.join(output_uri, *shard.output_path.split("/"))
    if not storage.exists(uri):
        return None
    expected = _provenance(shard, _settings_digest(manifest.teachers, layout))
    try:
        num_rows, schema = records.read_shard_footer(uri)
        meta = json.loads((schema.metadata or {})[_FOOTER_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as e:
        logger.info("reconverting %s: its footer does not read (%s)", uri, e)
        return None
    if records.schema_differences(manifest.schema(), schema) or {k: meta.get(k) for k in expected} != expected:
        logger.info("reconverting %s: it was written from another source shard or with other settings", uri)
        return None
    for part in manifest.parts:
        part_uri = storage.join(output_uri, *records.part_file(part.name, shard.output_path).split("/"))
        try:
            part_rows, part_schema = records.read_shard_footer(part_uri)
        except (OSError, pa.ArrowException) as e:  # missing: the run died between the base file and this one
            logger.info("reconverting %s: its part file %s does not read (%s)", uri, part_uri, e)
            return None
        provenance = records.read_provenance(part_schema) or {}
        if (
            part_rows != num_rows
            or records.schema_differences(records.part_schema(manifest, part), part_schema)
            or {k: provenance.get(k) for k in (*expected, "run_fingerprint")}
            != {**expected, "run_fingerprint": part.fingerprint}
        ):
            logger.info("reconverting %s: its part file %s was written by another conversion", uri, part_uri)
            return None
    return ShardResult(
        shard=shard,
        info=ShardInfo(path=shard.output_path, num_rows=num_rows),
        skipped={str(k): int(v) for k, v in meta.get("skipped", {}).items()},
        max_norm_error=float(meta.get("max_norm_error", 0.0)),
        reused=True,
    )


def convert_shard(
    shard: SourceShard,
    output_uri: str,
    manifest: Manifest,
    *,
    layout: DataCompDRLayout = DEFAULT_LAYOUT,
    config: ReaderConfig = DEFAULT_READER_CONFIG,
    embedding_compression: str = "none",
    row_group_size: int | None = None,
) -> ShardResult:
    """Converts one source tar into one reinforced Parquet shard under ``output_uri`` (atomically).

    Memory: `records.write_shard` writes one table, so the whole shard is held until it is written: for a
    12.5k-sample DataCompDR-12M shard ~1.4 GB of fp16 embeddings plus the image bytes, more while the table is built.

    Args:
        shard: The source tar.
        output_uri: The reinforced dataset directory.
        manifest: The conversion's manifest (`build_manifest`); gives the teachers, K, S and the schema.
        layout: The source's layout; must agree with ``manifest``.
        config: Reader limits.
        embedding_compression: Parquet codec of the embedding columns (`records.write_shard`).
        row_group_size: Rows a Parquet row group (`records.write_shard`); None writes one row group, which the
            writer buffers whole.

    Returns:
        What was written (``info`` None when the source could not be opened; nothing is written then).
    """
    teachers = manifest.teachers
    _check(
        (layout.num_augmentations, layout.num_syn_captions, layout.augment)
        == (manifest.num_augmentations, manifest.num_syn_captions, manifest.augment),
        "layout and manifest disagree on K, S or the augmentation config",
    )
    skipped: collections.Counter = collections.Counter()
    rows: dict[str, list] = {
        name: [] for name in (records.KEY, records.IMAGE, records.IMAGE_EXT, records.CAPTION, records.UID)
    }
    syn_captions, views = [], []
    image_emb: dict[str, list[np.ndarray]] = {t.name: [] for t in teachers}
    text_emb: dict[str, list[np.ndarray]] = {t.name: [] for t in teachers}
    set_captions: dict[str, list] = {p.caption_set: [] for p in manifest.parts}
    set_emb: dict[tuple[str, str], list[np.ndarray]] = {
        (p.caption_set, t.name): [] for p in manifest.parts for t in teachers
    }
    worst = 0.0
    for sample in iter_shard(shard.uri, skipped, teachers=teachers, layout=layout, config=config):
        rows[records.KEY].append(sample.key)
        rows[records.IMAGE].append(sample.image_bytes)
        rows[records.IMAGE_EXT].append(sample.image_ext)
        rows[records.CAPTION].append(sample.caption)
        rows[records.UID].append(sample.uid)
        syn_captions.append(list(sample.syn_captions))
        views.append(augparams.views_to_array(sample.views))
        for spec in teachers:  # fp16 right away: half the memory of a shard held whole
            image_emb[spec.name].append(sample.image_emb[spec.name].astype(np.float16))
            text_emb[spec.name].append(sample.text_emb[spec.name].astype(np.float16))
        for name, captions in set_captions.items():
            captions.append(list(sample.set_captions[name]))
            for spec in teachers:
                set_emb[name, spec.name].append(sample.set_text_emb[name][spec.name].astype(np.float16))
        worst = max(worst, sample.norm_error)
    counts = {str(k): int(v) for k, v in sorted(skipped.items())}
    if skipped[str(SkipReason.UNREADABLE_SHARD)]:
        return ShardResult(shard=shard, info=None, skipped=counts, max_norm_error=worst)

    K, S, L = manifest.num_augmentations, manifest.num_syn_captions, manifest.aug_param_length
    columns: dict[str, Any] = dict(rows)
    if S:  # S = 0: syn_text is not imported, and the schema has no syn_captions column
        columns[records.SYN_CAPTIONS] = syn_captions
    columns[records.AUG_PARAMS] = np.stack(views) if views else np.zeros((0, K, L), np.float32)
    for spec in teachers:
        D = spec.embed_dim
        columns[records.image_emb_column(spec.name)] = _stack(image_emb.pop(spec.name), (K, D))
        columns[records.text_emb_column(spec.name)] = _stack(text_emb.pop(spec.name), (1 + S, D))
    table = records.build_table(columns, manifest)
    provenance = _provenance(shard, _settings_digest(teachers, layout))
    footer = {**provenance, "skipped": counts, "max_norm_error": worst}
    table = table.replace_schema_metadata({_FOOTER_KEY: json.dumps(footer, sort_keys=True).encode()})
    uri = storage.join(output_uri, *shard.output_path.split("/"))
    keys = rows[records.KEY]
    del columns, rows, syn_captions, views  # the table holds what is still needed
    records.write_shard(uri, table, row_group_size=row_group_size, embedding_compression=embedding_compression)
    for part in manifest.parts:  # after the base file: a part file never exists without the base it aligns with
        name = part.caption_set
        part_columns: dict[str, Any] = {records.KEY: keys, records.syn_captions_column(name): set_captions.pop(name)}
        for spec in teachers:
            column = records.set_text_emb_column(spec.name, name)
            part_columns[column] = _stack(set_emb.pop((name, spec.name)), (part.num_syn_captions, spec.embed_dim))
        part_table = records.build_table(part_columns, records.PartLayout(manifest, part))
        meta = {**provenance, "run_fingerprint": part.fingerprint}
        part_table = part_table.replace_schema_metadata(
            {records.SHARD_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}
        )
        part_uri = storage.join(output_uri, *records.part_file(part.name, shard.output_path).split("/"))
        records.write_shard(
            part_uri, part_table, row_group_size=row_group_size, embedding_compression=embedding_compression
        )
    logger.info(
        "converted %s -> %s: %d rows, skipped %s, max |norm - 1| %.2e", shard.uri, uri, table.num_rows, counts, worst
    )
    return ShardResult(
        shard=shard,
        info=ShardInfo(path=shard.output_path, num_rows=table.num_rows),
        skipped=counts,
        max_norm_error=worst,
    )


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, *shape), np.float16)


def finish(output_uri: str, manifest: Manifest) -> Manifest:
    """Writes the final manifest, LAST, unless one equal but for ``created_at`` is there; returns the one kept.

    Args:
        output_uri: The reinforced dataset directory, every shard of ``manifest`` complete in it.
        manifest: The final manifest (`build_manifest` with the results of every shard).
    """
    uri = records.manifest_uri(output_uri)
    if storage.exists(uri):
        try:
            existing = records.read_manifest(output_uri)
        except records.RecordsError:
            existing = None
        if existing is not None and _without_time(existing) == _without_time(manifest):
            return existing
    records.write_manifest(output_uri, manifest)
    return manifest


def _without_time(manifest: Manifest) -> dict[str, Any]:
    data = manifest.to_dict()
    data.pop("created_at")
    return data


def _map_in_order(fn: Callable[[SourceShard], ShardResult], shards: list[SourceShard]) -> list[ShardResult]:
    return [fn(shard) for shard in shards]


def convert(
    source_uri: str,
    output_uri: str,
    *,
    teachers: Sequence[TeacherSpec] = DATACOMPDR_TEACHERS,
    layout: DataCompDRLayout = DEFAULT_LAYOUT,
    captioner: CaptionerSpec = DATACOMPDR_CAPTIONER,
    config: ReaderConfig = DEFAULT_READER_CONFIG,
    embedding_compression: str = "none",
    row_group_size: int | None = None,
    map_shards: Callable[[Callable[[SourceShard], ShardResult], list[SourceShard]], list[ShardResult]] = _map_in_order,
) -> Manifest:
    """Converts a joined DataCompDR source into a clipdr reinforced dataset, one Parquet shard per source tar.

    Idempotent and resumable: shards an earlier run completed with the same source and settings are kept (not
    rewritten), the rest are converted; the manifest is deleted before the first shard is (re)written and written
    last. Source shards are converted one after another; a cluster job maps `convert_shard` over
    `list_source_shards` instead and calls `finish` with `build_manifest` of the results.

    Args:
        source_uri: Directory of DataCompDR tars (recursively) or one tar; local, ``file://`` or ``s3://``.
        output_uri: The reinforced dataset directory.
        teachers: The teachers whose embeddings are concatenated, in order (DataCompDR: openai, datacomp_xl).
        layout: K, S, the record layout and the crop frame (DataCompDR-12M by default).
        captioner: Recorded in the manifest.
        config: Reader limits.
        embedding_compression: Parquet codec of the embedding columns.
        row_group_size: Rows a Parquet row group; None writes one per shard (`convert_shard` on memory).
        map_shards: Runs the per-shard conversion over the shards still to do and returns the results in order:
            in this process by default; `run` passes one that runs a Ray task per shard.

    Returns:
        The manifest now in ``output_uri``.

    Raises:
        FileNotFoundError: ``source_uri`` does not exist.
        DataCompDRError: It holds no tar shards, or the layout is inconsistent.
        records.RecordsError: Teachers that do not make a valid manifest.
    """
    shards = list_source_shards(source_uri)
    manifest = build_manifest(source_uri, shards, teachers=teachers, layout=layout, captioner=captioner)
    results: list[ShardResult | None] = [completed_shard(output_uri, s, manifest, layout) for s in shards]
    todo = [i for i, result in enumerate(results) if result is None]
    logger.info("DataCompDR %s -> %s: %d shards, %d to convert", source_uri, output_uri, len(shards), len(todo))
    if todo:
        storage.delete(records.manifest_uri(output_uri))  # never pair an old manifest with new shards
    converted = map_shards(
        functools.partial(
            convert_shard,
            output_uri=output_uri,
            manifest=manifest,
            layout=layout,
            config=config,
            embedding_compression=embedding_compression,
            row_group_size=row_group_size,
        ),
        [shards[i] for i in todo],
    )
    for i, result in zip(todo, converted, strict=True):
        results[i] = result
    done = [r for r in results if r is not None]
    unreadable = [r.shard.path for r in done if r.info is None]
    if unreadable:
        logger.warning(
            "%d source shards could not be read and are left out (a rerun retries): %s", len(unreadable), unreadable
        )
    worst = max((r.max_norm_error for r in done), default=0.0)
    logger.info(
        "DataCompDR embeddings: largest |norm - 1| before renormalising %.2e (tolerance %s)",
        worst,
        layout.norm_tolerance,
    )
    final = build_manifest(
        source_uri, shards, teachers=manifest.teachers, layout=layout, captioner=captioner, results=done
    )
    return finish(output_uri, final)


def choose_caption_sets(found: dict[str, int], chosen: Sequence[str] = ()) -> tuple[int, tuple[tuple[str, int], ...]]:
    """The layout's caption sets from those a source has (`find_caption_sets`): ``(S of syn_text, or 0; the other
    sets as (key, S_set))``, ``chosen`` (syn.json keys, in order) or all of ``found``.

    Raises:
        DataCompDRError: A chosen key the source lacks, or a duplicate.
    """
    keys = list(chosen) or list(found)
    _check(len(set(keys)) == len(keys), f"datacompdr.caption_sets names a set twice: {list(chosen)}")
    lacking = [k for k in keys if k not in found]
    _check(
        not lacking,
        f"datacompdr.caption_sets names {lacking}, which the source's syn.json lacks; it has {list(found) or 'none'}",
    )
    S = found[SYN_TEXT_KEY] if SYN_TEXT_KEY in keys else 0
    return S, tuple((k, found[k]) for k in keys if k != SYN_TEXT_KEY)


def run(cfg: Config, log: Callable[[str], None] = print) -> Manifest:
    """Converts ``cfg.datacompdr.source`` into ``cfg.datacompdr.output``, one Ray task a source shard (`convert`).

    The caption sets are those of the source's first sample with a ``syn.json`` (`find_caption_sets`), or the
    ``datacompdr.caption_sets`` chosen among them.

    Raises:
        DataCompDRError: Source or output unset, an inconsistent layout, a source without tar shards, or a chosen
            caption set the source lacks.
        FileNotFoundError: The source does not exist.
    """
    from clipdr.reinforce.pipeline import map_shards_on_ray  # Ray only when the job runs

    c = cfg.datacompdr
    _check(bool(c.source and c.output), "set datacompdr.source and datacompdr.output")
    shards = list_source_shards(c.source)
    found = find_caption_sets(shards[0].uri)
    num_syn_captions, caption_sets = choose_caption_sets(found, c.caption_sets)
    layout = DataCompDRLayout(
        num_augmentations=c.num_augmentations,
        num_syn_captions=num_syn_captions,
        caption_sets=caption_sets,
        reference_max_side=c.reference_max_side or None,
    )
    imported = [f"{SYN_TEXT_KEY} -> {records.DEFAULT_CAPTION_SET}"] if num_syn_captions else []
    imported += [f"{key} -> {name}" for (key, _), name in zip(caption_sets, layout.set_names, strict=True)]
    log(f"caption sets of the source (key: S): {found or 'none'}; imported as: {', '.join(imported) or 'none'}")
    manifest = convert(c.source, c.output, layout=layout, map_shards=map_shards_on_ray)
    log(f"{manifest.num_rows} samples ({manifest.num_skipped} skipped) -> {c.output}")
    return manifest
