"""Parts: row-aligned sidecar files that add a caption set or a teacher to a complete dataset (records.py's contract).

Datasets are written directly with the records helpers (no Ray): the contract is what is under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipdr import records, storage
from tests.unit.test_records import CAPTIONER, S, make_manifest, teacher, unit_vectors, write_dataset

SET, S_SET = "beam", 3
ADDED = teacher("dfn", 8)


def captions_part(manifest: records.Manifest, fingerprint: str = "sha256:captions") -> records.PartSpec:
    return records.PartSpec(
        name=records.part_name("captions", SET),
        kind="captions",
        fingerprint=fingerprint,
        caption_set=SET,
        num_syn_captions=S_SET,
        captioner=CAPTIONER,
        teachers=manifest.teacher_names,
    )


def teacher_part(caption_sets=(SET,)) -> records.PartSpec:
    return records.PartSpec(
        name=records.part_name("teacher", ADDED.name),
        kind="teacher",
        fingerprint="sha256:teacher",
        teacher=ADDED,
        caption_sets=caption_sets,
    )


def part_columns(layout: records.PartLayout, keys: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    columns = {records.KEY: keys}
    for field in layout.record_schema():  # what build_table takes, whatever the layout version
        if field.name == records.KEY:
            continue
        if records.is_syn_captions_column(field.name):
            columns[field.name] = [[f"{k} set {j}" for j in range(field.type.list_size)] for k in keys]
        else:
            shape = (field.type.list_size, field.type.value_type.list_size)
            columns[field.name] = unit_vectors(rng, len(keys), *shape)
    return columns


def add_part(root: pathlib.Path, manifest: records.Manifest, part: records.PartSpec) -> records.Manifest:
    """Writes ``part``'s files (keys read from the base shards) with its fingerprint, then the manifest listing it."""
    layout = records.PartLayout(manifest, part)
    shards = []
    for index, shard in enumerate(manifest.shards):
        keys = records.read_shard(str(root / shard.path), [records.KEY]).column(0).to_pylist()
        table = records.build_table(part_columns(layout, keys, index), layout)
        provenance = {records.SHARD_METADATA_KEY: json.dumps({"run_fingerprint": part.fingerprint}).encode()}
        path = records.part_file(part.name, shard.path)
        records.write_shard(str(root / path), table.replace_schema_metadata(provenance))
        shards.append(records.ShardInfo(path, shard.num_rows))
    final = dataclasses.replace(manifest, parts=(*manifest.parts, dataclasses.replace(part, shards=tuple(shards))))
    records.write_manifest(str(root), final)
    return final


@pytest.fixture
def grown(tmp_path) -> tuple[pathlib.Path, records.Manifest]:
    base = write_dataset(tmp_path, make_manifest())
    with_captions = add_part(tmp_path, base, captions_part(base))
    return tmp_path, add_part(tmp_path, with_captions, teacher_part())


def test_a_manifest_without_parts_keeps_its_bytes_and_one_with_parts_round_trips(grown):
    root, manifest = grown
    assert "parts" not in make_manifest().to_dict()
    again = records.Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert manifest.caption_sets == {records.DEFAULT_CAPTION_SET: S, SET: S_SET}
    assert manifest.teacher_names == ("openai", "datacomp_xl", "dfn")
    part = manifest.part("teacher__dfn")
    assert records.part_schema(manifest, part, record=True).names == [
        "key",
        "image_emb__dfn",
        "text_emb__dfn",
        "text_emb__dfn__beam",
    ]
    # A part takes its dataset's layout: view-major here, one column a view and a text row.
    assert manifest.view_major and records.part_schema(manifest, part).names == [
        "key",
        *(f"image_emb__dfn__{k}" for k in range(manifest.num_augmentations)),
        *(f"text_emb__dfn__{r}" for r in range(1 + S)),
        *(f"text_emb__dfn__beam__{r}" for r in range(S_SET)),
    ]
    assert records.open_dataset(str(root), require_teachers=["dfn"]).manifest == manifest


def test_a_join_by_position_reads_each_column_from_its_file(grown):
    root, manifest = grown
    shard = manifest.shards[1].path
    columns = [records.KEY, "syn_captions__beam", "image_emb__dfn", "text_emb__openai__beam", records.CAPTION]
    table = records.read_shard_with_parts(str(root), manifest, shard, columns)
    assert table.column_names == columns and table.num_rows == manifest.shards[1].num_rows
    part_file = root / records.part_file("captions__beam", shard)
    assert table.column("syn_captions__beam").equals(pq.read_table(part_file).column("syn_captions__beam"))
    assert table.column(records.KEY).to_pylist()[0].startswith("s1-")


def _rewrite(path: pathlib.Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def test_misaligned_missing_unlisted_and_foreign_part_files_are_refused_naming_part_and_shard(grown):
    root, manifest = grown
    shard = manifest.shards[0].path
    part_file = root / records.part_file("captions__beam", shard)
    original = part_file.read_bytes()

    # Keys in another order: the footer fits, the join by position does not.
    _rewrite(
        part_file,
        lambda t: t.take(pa.array(list(reversed(range(t.num_rows))))).replace_schema_metadata(t.schema.metadata),
    )
    records.open_dataset(str(root))
    with pytest.raises(records.RecordsError, match=r"part 'captions__beam', shard 'shards/part-00000.parquet': row 0"):
        records.read_shard_with_parts(str(root), manifest, shard, [records.KEY, "syn_captions__beam"])

    # A row fewer.
    _rewrite(part_file, lambda t: t.slice(1))
    with pytest.raises(records.RecordsError, match=r"part 'captions__beam', shard 'shards/part-00000.parquet': .*rows"):
        records.open_dataset(str(root))

    # Written by another pass (its footer carries another fingerprint), then with another schema.
    part_file.write_bytes(original)
    _rewrite(part_file, lambda t: t.replace_schema_metadata({records.SHARD_METADATA_KEY: b'{"run_fingerprint": "x"}'}))
    with pytest.raises(
        records.RecordsError,
        match=r"part 'captions__beam', shard 'shards/part-00000.parquet': .*"
        r"fingerprint",
    ):
        records.open_dataset(str(root))
    part_file.write_bytes(original)
    _rewrite(part_file, lambda t: t.drop_columns(["text_emb__openai__beam__0"]))
    with pytest.raises(records.RecordsError, match=r"part 'captions__beam', shard .*missing columns"):
        records.open_dataset(str(root))

    # Missing.
    part_file.unlink()
    with pytest.raises(
        records.RecordsError,
        match=r"part 'captions__beam' lacks its files of 1 shards, e\.g\. shard "
        r"'shards/part-00000.parquet'",
    ):
        records.open_dataset(str(root))
    part_file.write_bytes(original)
    records.open_dataset(str(root))

    # A file of no base shard inside a listed part; a part the manifest does not list.
    stray = root / records.part_file("captions__beam", "shards/part-00009.parquet")
    stray.write_bytes(original)
    with pytest.raises(records.RecordsError, match=r"part 'captions__beam' holds files of no base shard.*part-00009"):
        records.open_dataset(str(root))
    stray.unlink()
    unlisted = root / records.part_file("captions__long", shard)
    unlisted.parent.mkdir(parents=True)
    unlisted.write_bytes(original)
    with pytest.warns(records.RecordsWarning, match=r"parts its manifest does not list \(captions__long\)"):
        records.open_dataset(str(root))
    with pytest.raises(records.RecordsError, match=r"parts its manifest does not list \(captions__long\)"):
        records.open_dataset(str(root), extra_files="error")
    with pytest.raises(records.RecordsError, match=r"no file of dataset .* holds column 'syn_captions__long'"):
        records.read_shard_with_parts(str(root), manifest, shard, ["syn_captions__long"])


def test_a_manifest_refuses_parts_that_do_not_extend_the_dataset_or_align_with_its_shards(grown):
    _, manifest = grown
    captions = manifest.part("captions__beam")
    with pytest.raises(records.RecordsError, match=r"not aligned with the base shards.*1 files for 2 base shards"):
        dataclasses.replace(manifest, parts=(dataclasses.replace(captions, shards=captions.shards[:1]),))
    wrong_rows = (captions.shards[0], dataclasses.replace(captions.shards[1], num_rows=2))
    with pytest.raises(records.RecordsError, match=r"not aligned .*shard 'shards/part-00001.parquet'"):
        dataclasses.replace(manifest, parts=(dataclasses.replace(captions, shards=wrong_rows),))
    with pytest.raises(records.RecordsError, match="caption sets \\['beam'\\], the dataset has \\['default'\\]"):
        dataclasses.replace(manifest, parts=(manifest.part("teacher__dfn"),))
    with pytest.raises(records.RecordsError, match="teacher 'openai' exists"):
        dataclasses.replace(
            manifest,
            parts=(dataclasses.replace(teacher_part(()), teacher=teacher("openai", 8), name="teacher__openai"),),
        )
    with pytest.raises(records.RecordsError, match="must be named 'captions__beam'"):
        dataclasses.replace(captions, name="captions__other")
    with pytest.raises(records.RecordsError, match="invalid caption set name"):
        records.syn_captions_column("Beam")


def test_adding_a_part_leaves_every_existing_file_byte_identical(tmp_path):
    base = write_dataset(tmp_path, make_manifest())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.parquet")}
    add_part(tmp_path, base, captions_part(base))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digests} == digests
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records.open_dataset(str(tmp_path))
    assert storage.exists(str(tmp_path / records.part_file("captions__beam", base.shards[0].path)))


def test_inspect_shows_the_parts_and_each_caption_sets_captions(tmp_path):
    from clipdr import inspection
    from tests.unit import test_train_data

    uri, base = test_train_data.write_dataset(tmp_path, num_syn_captions=1)
    add_part(pathlib.Path(uri), base, captions_part(base))
    lines: list[str] = []
    inspection.inspect(uri, str(tmp_path / "sheet.png"), num_samples=1, log=lines.append)
    text = "\n".join(lines)
    assert "part          captions__beam: caption set 'beam', S=3 a sample by" in text
    assert "text embeddings of teachers alpha, beta_xl" in text
    assert "  synthetic 0 " in text and "  beam 2 sample-0 set 2" in text
    assert "syn_captions__beam" in text and "text_emb__alpha__beam" in text  # their bytes, from the part files
