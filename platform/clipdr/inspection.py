"""``clipdr inspect <dataset>``: what a reinforced dataset holds, shown before GPU-hours are spent training on it.

Prints the manifest (teachers and their default a_k, the captioner or its absence, K and S, sample, shard and skip
counts, bytes on storage and per sample, column by column), the real and synthetic captions of a few samples, and
writes a PNG contact sheet: one row per sample, its K stored views replayed from their stored parameters with
`augment.replay_uint8`, the function the reinforcement rendered the teachers' views with and training replays.

Bytes come from the shards' Parquet footers only (`column_bytes`); the samples and the sheet read the first rows of
the first shard.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from clipdr import augment, augparams, records, storage
from clipdr.data import sources

SHEET_PAD = 2  # pixels between views on the contact sheet


def column_bytes(shard_uris: Sequence[str], part_uris: Sequence[str] = ()) -> dict[str, int]:
    """Stored (compressed) bytes of each top-level column over ``shard_uris`` and the part files ``part_uris`` (their
    key column left out: the base's is counted), from their Parquet footers: what a read of that column fetches. The
    row columns of a view-major dataset count under their record column (`records.record_column`)."""
    total: dict[str, int] = {}
    for uri in [*shard_uris, *part_uris]:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            for index in range(row_group.num_columns):
                chunk = row_group.column(index)
                name = records.record_column(chunk.path_in_schema.split(".")[0])
                if name == records.KEY and uri in part_uris:
                    continue
                total[name] = total.get(name, 0) + chunk.total_compressed_size
    return total


def describe(dataset: records.ReinforcedDataset, sizes: dict[str, int] | None = None) -> str:
    """The manifest as lines of text, with the bytes of each column (``sizes``, `column_bytes`) a sample."""
    m = dataset.manifest
    rows = max(m.num_rows, 1)
    lines = [
        f"dataset       {dataset.uri}",
        f"made          {m.created_at} by clipdr {m.code_version} (record schema {m.schema_version}"
        + (", view-major)" if m.view_major else ")"),
        f"source        {m.source_uri} (fingerprint {m.source_fingerprint[:16]})",
        f"samples       {m.num_rows:,} in {len(m.shards)} shards; {m.num_skipped:,} skipped"
        + (f" ({', '.join(f'{reason} {count:,}' for reason, count in m.skipped)})" if m.skipped else ""),
        f"views         K={m.num_augmentations} a sample (augment {m.augment}, seed {m.augment_seed})",
        *(
            f"teacher       {t.name}: {t.model} ({t.pretrained or 'random init'}), D={t.embed_dim}, {t.image_size}px "
            f"{t.interpolation}, default a_k {t.logit_scale:g}"
            for t in m.teachers
        ),
        f"captions      S={m.num_syn_captions} synthetic a sample by {m.captioner.kind} {m.captioner.model} "
        f"({m.captioner.pretrained or 'random init'}; {m.captioner.generation_type}, top_p {m.captioner.top_p:g}, "
        f"temperature {m.captioner.temperature:g}, seed {m.captioner.seed})"
        if m.captioner is not None
        else "captions      S=0: an embeddings-only pass, real captions only (no captioner ran)",
        *(_describe_part(p) for p in m.parts),
        f"embeddings    {m.embedding_bytes_per_sample:,} bytes of fp16 a sample ((K + 1 + S) x sum(D) x 2) in the "
        "base shards",
    ]
    if sizes:
        total = sum(sizes.values())
        lines.append(f"stored        {total:,} bytes in Parquet, {total / rows:,.0f} a sample:")
        lines += [f"  {name:<28} {size / rows:>12,.0f} bytes a sample" for name, size in sizes.items()]
    return "\n".join(lines)


def _describe_part(part: records.PartSpec) -> str:
    if part.kind == "captions":
        c = part.captioner
        return (
            f"part          {part.name}: caption set {part.caption_set!r}, S={part.num_syn_captions} a sample by "
            f"{c.kind} {c.model} ({c.generation_type}, top_p {c.top_p:g}, temperature {c.temperature:g}, seed "
            f"{c.seed}); text embeddings of teachers {', '.join(part.teachers)}"
        )
    t = part.teacher
    return (
        f"part          {part.name}: teacher {t.name}: {t.model} ({t.pretrained or 'random init'}), D={t.embed_dim}, "
        f"{t.image_size}px {t.interpolation}, default a_k {t.logit_scale:g}; text embeddings of caption sets "
        f"{', '.join(part.caption_sets) or 'none added'}"
    )


def first_samples(dataset: records.ReinforcedDataset, count: int) -> dict:
    """The first ``count`` samples of the dataset (from the first shards): key, image bytes, captions of every
    caption set (`records.syn_captions_column`, added sets read from their parts), views."""
    m = dataset.manifest
    columns = [records.KEY, records.IMAGE, records.CAPTION, records.AUG_PARAMS]
    columns += [records.syn_captions_column(s) for s in m.caption_sets]
    out: dict[str, list] = {name: [] for name in columns}
    for shard in m.shards:
        left = count - len(out[records.KEY])
        if left <= 0:
            break
        table = records.read_shard_with_parts(dataset.uri, m, shard.path, columns).slice(0, left)
        for name in columns:
            if name == records.AUG_PARAMS:
                out[name] += list(records.aug_params(table))
            else:
                out[name] += table.column(name).to_pylist()
    return out


def contact_sheet(samples: dict, size: int) -> Image.Image:
    """One row per sample, its K stored views replayed at ``size`` px (bicubic), left to right in view order."""
    views = samples[records.AUG_PARAMS]
    num_rows, num_views = len(views), (len(views[0]) if views else 0)
    step = size + SHEET_PAD
    sheet = Image.new("RGB", (max(num_views * step - SHEET_PAD, 1), max(num_rows * step - SHEET_PAD, 1)), "white")
    for row, (image_bytes, views_KL) in enumerate(zip(samples[records.IMAGE], views, strict=True)):
        image = sources.decode_rgb(image_bytes)
        for k, params in enumerate(augparams.views_from_array(views_KL)):
            view_CHW = augment.replay_uint8(image, params, size, "bicubic").numpy()
            sheet.paste(Image.fromarray(np.ascontiguousarray(view_CHW.transpose(1, 2, 0))), (k * step, row * step))
    return sheet


def inspect(uri: str, sheet_path: str, num_samples: int = 3, size: int = 96, log: Callable[[str], None] = print) -> str:
    """Prints what ``uri`` holds and writes the contact sheet of its first ``num_samples`` samples to
    ``sheet_path`` (path or ``s3://``); returns ``sheet_path``.

    Raises:
        records.RecordsError: ``uri`` is not a complete reinforced dataset.
        ValueError: ``num_samples`` or ``size`` below 1.
    """
    if num_samples < 1 or size < 1:
        raise ValueError(f"--samples and --size must be >= 1, got {num_samples} and {size}")
    dataset = records.open_dataset(uri)
    m = dataset.manifest
    part_uris = [storage.join(uri, *s.path.split("/")) for p in m.parts for s in p.shards]
    log(describe(dataset, column_bytes(dataset.shard_uris, part_uris)))
    samples = first_samples(dataset, num_samples)
    for i, key in enumerate(samples[records.KEY]):
        log(f"sample        {key}")
        log(f"  real        {samples[records.CAPTION][i]}")
        for caption_set in m.caption_sets:
            label = "synthetic" if caption_set == records.DEFAULT_CAPTION_SET else caption_set
            for j, caption in enumerate(samples[records.syn_captions_column(caption_set)][i]):
                log(f"  {label} {j} {caption}")
    out = io.BytesIO()
    contact_sheet(samples, size).save(out, format="PNG")
    storage.write_bytes(sheet_path, out.getvalue())
    k = dataset.manifest.num_augmentations
    log(f"views         {sheet_path}: {len(samples[records.KEY])} samples (rows) x K={k} stored views, replayed")
    return sheet_path
