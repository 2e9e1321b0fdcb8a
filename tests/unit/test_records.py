"""The reinforced record: schema, shard round trips, byte arithmetic, manifest strictness, dataset checks."""

import dataclasses
import json
import os
import pathlib
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipdr import augment, augparams, config, records, runstate, storage
from clipdr.config import AugmentConfig

K, S = 4, 2  # distinct, so a mix-up of image (K) and text (1+S) rows cannot pass


def teacher(name: str, dim: int) -> records.TeacherSpec:
    return records.TeacherSpec(
        name=name,
        model="ViT-L-14",
        pretrained="openai",
        embed_dim=dim,
        logit_scale=100.0,
        image_size=224,
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    )


TEACHERS = (teacher("openai", 16), teacher("datacomp_xl", 24))
CAPTIONER = records.CaptionerSpec(name="coca_l14", kind="open_clip", model="coca_ViT-L-14", pretrained="mscoco")


def make_manifest(teachers=TEACHERS, num_augmentations=K, num_syn_captions=S, **kwargs) -> records.Manifest:
    return records.Manifest(
        teachers=teachers,
        augment=records.AugmentSpec(),
        num_augmentations=num_augmentations,
        num_syn_captions=num_syn_captions,
        source_uri="s3://source/datacomp",
        source_fingerprint="sha256:0123",
        captioner=CAPTIONER if num_syn_captions else None,
        **kwargs,
    )


def unit_vectors(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_columns(manifest: records.Manifest, num_rows: int, seed: int = 0, prefix: str = "k") -> dict:
    rng = np.random.default_rng(seed)
    cfg = manifest.augment
    views = [
        augment.sample_views((40 + i, 30), f"{prefix}{i}", manifest.num_augmentations, cfg, seed)
        for i in range(num_rows)
    ]
    columns = {
        records.KEY: [f"{prefix}{i}" for i in range(num_rows)],
        records.IMAGE: [bytes(rng.integers(0, 256, 10 + i, dtype=np.uint8)) for i in range(num_rows)],
        records.IMAGE_EXT: ["jpg" if i % 2 else "png" for i in range(num_rows)],
        records.CAPTION: [f"a photo number {i}" for i in range(num_rows)],
        records.AUG_PARAMS: views,
    }
    if manifest.num_syn_captions:
        columns[records.SYN_CAPTIONS] = [
            [f"synthetic {i}.{j}" for j in range(manifest.num_syn_captions)] for i in range(num_rows)
        ]
    for spec in manifest.teachers:
        columns[records.image_emb_column(spec.name)] = unit_vectors(
            rng, num_rows, manifest.num_augmentations, spec.embed_dim
        )
        columns[records.text_emb_column(spec.name)] = unit_vectors(
            rng, num_rows, 1 + manifest.num_syn_captions, spec.embed_dim
        )
    return columns


def write_dataset(root, manifest: records.Manifest, rows_per_shard=(5, 3)) -> records.Manifest:
    """Writes shards and the manifest (last); returns the final manifest."""
    shards = []
    for index, num_rows in enumerate(rows_per_shard):
        path = f"shards/part-{index:05d}.parquet"
        table = records.build_table(make_columns(manifest, num_rows, seed=index, prefix=f"s{index}-"), manifest)
        records.write_shard(storage.join(str(root), *path.split("/")), table)
        shards.append(records.ShardInfo(path, num_rows))
    final = dataclasses.replace(manifest, shards=tuple(shards), skipped={"decode_error": 2, "too_small": 1})
    records.write_manifest(str(root), final)
    return final


# --------------------------------------------------------------------------- names and schema


def test_teacher_names_are_validated():
    for good in ("openai", "datacomp_xl", "dfn2b", "vit_l14_openai"):
        assert records.validate_teacher_name(good) == good
    assert records.image_emb_column("openai") == "image_emb__openai"
    assert records.text_emb_column("datacomp_xl") == "text_emb__datacomp_xl"
    for bad in ("", "OpenAI", "a__b", "_a", "a_", "1st", "vit-l-14", "a.b", "a b", "x" * 49, None):
        with pytest.raises(records.RecordsError, match="invalid teacher name"):
            records.image_emb_column(bad)
    with pytest.raises(records.RecordsError, match="invalid teacher name 'Bad'"):
        teacher("Bad", 8)


def test_schema_for_two_teachers_with_different_dims():
    schema = records.reinforced_schema(TEACHERS, K, S, num_aug_ops=2, schema_version=1)
    assert schema.names == [
        records.KEY,
        records.IMAGE,
        records.IMAGE_EXT,
        records.CAPTION,
        records.SYN_CAPTIONS,
        records.AUG_PARAMS,
        "image_emb__openai",
        "text_emb__openai",
        "image_emb__datacomp_xl",
        "text_emb__datacomp_xl",
    ]
    assert all(not f.nullable for f in schema)

    def shape_and_leaf(name):
        value_type, shape = schema.field(name).type, []
        while pa.types.is_fixed_size_list(value_type):
            shape.append(value_type.list_size)
            value_type = value_type.value_type
        return tuple(shape), value_type

    assert shape_and_leaf("image_emb__openai") == ((K, 16), pa.float16())
    assert shape_and_leaf("text_emb__openai") == ((1 + S, 16), pa.float16())
    assert shape_and_leaf("image_emb__datacomp_xl") == ((K, 24), pa.float16())
    assert shape_and_leaf("text_emb__datacomp_xl") == ((1 + S, 24), pa.float16())
    assert shape_and_leaf(records.AUG_PARAMS) == ((K, 9), pa.float32())
    assert shape_and_leaf(records.SYN_CAPTIONS) == ((S,), pa.string())
    assert make_manifest(schema_version=1).schema().equals(schema) and make_manifest().record_schema().equals(schema)
    # Without synthetic captions the column is left out, and text embeddings hold the real caption only.
    no_syn = records.reinforced_schema(TEACHERS, K, 0, schema_version=1)
    assert records.SYN_CAPTIONS not in no_syn.names
    assert no_syn.field("text_emb__openai").type.list_size == 1


# --------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    manifest = make_manifest()
    columns = make_columns(manifest, 6)
    uri = str(tmp_path / "part-00000.parquet")
    records.write_shard(uri, records.build_table(columns, manifest))
    table = records.read_shard(uri)

    assert table.schema.equals(manifest.schema())
    assert table[records.KEY].to_pylist() == columns[records.KEY]
    assert table[records.IMAGE].to_pylist() == columns[records.IMAGE]
    assert table[records.IMAGE_EXT].to_pylist() == columns[records.IMAGE_EXT]
    assert table[records.CAPTION].to_pylist() == columns[records.CAPTION]
    assert table[records.SYN_CAPTIONS].to_pylist() == columns[records.SYN_CAPTIONS]
    views_NKL = records.aug_params(table)
    assert views_NKL.shape == (6, K, 9) and views_NKL.dtype == np.float32
    assert [augparams.views_from_array(v) for v in views_NKL] == columns[records.AUG_PARAMS]
    for spec in TEACHERS:
        image_NKD = records.image_embeddings(table, spec.name)
        text_NRD = records.text_embeddings(table, spec.name)
        assert image_NKD.shape == (6, K, spec.embed_dim) and image_NKD.dtype == np.float16
        assert text_NRD.shape == (6, 1 + S, spec.embed_dim) and text_NRD.dtype == np.float16
        np.testing.assert_array_equal(image_NKD, columns[records.image_emb_column(spec.name)].astype(np.float16))
        np.testing.assert_array_equal(text_NRD, columns[records.text_emb_column(spec.name)].astype(np.float16))


def test_shard_footers_are_read_in_parallel_in_order_and_fail_loudly(tmp_path, monkeypatch):
    manifest = make_manifest()
    uris = []
    for i, rows in enumerate((1, 4, 2, 6, 3)):
        uris.append(str(tmp_path / f"part-{i:05d}.parquet"))
        records.write_shard(uris[-1], records.build_table(make_columns(manifest, rows), manifest))
    one_by_one = [records.read_shard_footer(uri) for uri in uris]

    real, in_flight, most = records.read_shard_footer, [0], [0]
    lock = threading.Lock()

    def slow_footer(uri):  # a round trip to object storage
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return real(uri)

    monkeypatch.setattr(records, "read_shard_footer", slow_footer)
    footers = records.read_shard_footers(uris, threads=3)
    assert [n for n, _ in footers] == [1, 4, 2, 6, 3] == [n for n, _ in one_by_one]
    assert all(a.equals(b, check_metadata=True) for (_, a), (_, b) in zip(footers, one_by_one, strict=True))
    assert 2 <= most[0] <= 3  # several at a time (up to the three threads), not one after another
    with pytest.raises(FileNotFoundError):
        records.read_shard_footers([*uris, str(tmp_path / "missing.parquet")])


def test_embedding_accessors_are_zero_copy_and_handle_slices_and_chunks(tmp_path):
    manifest = make_manifest(schema_version=1)  # one list column a teacher: its rows are a view of Arrow memory
    columns = make_columns(manifest, 10)
    expected_NKD = columns["image_emb__openai"].astype(np.float16)
    uri = str(tmp_path / "part.parquet")
    records.write_shard(uri, records.build_table(columns, manifest))
    table = records.read_shard(uri)

    image_NKD = records.image_embeddings(table, "openai")
    leaf = table["image_emb__openai"].chunk(0).flatten().flatten()
    assert image_NKD.__array_interface__["data"][0] == leaf.buffers()[1].address  # a view of Arrow memory
    assert not image_NKD.flags.writeable
    # A sliced batch (as Ray Data hands out) keeps its offsets.
    batch = table.slice(3, 4).to_batches()[0]
    np.testing.assert_array_equal(records.image_embeddings(batch, "openai"), expected_NKD[3:7])
    # Several chunks (as a dataset read of several row groups gives): concatenated (one copy), same values.
    records.write_shard(uri, records.build_table(columns, manifest), row_group_size=3)
    assert records.read_shard(uri)["image_emb__openai"].num_chunks == 1  # `read_shard` joins the row groups
    chunked = pq.read_table(uri)
    assert chunked["image_emb__openai"].num_chunks > 1
    np.testing.assert_array_equal(records.image_embeddings(chunked, "openai"), expected_NKD)
    with pytest.raises(records.RecordsError, match="no column 'image_emb__nobody'"):
        records.image_embeddings(table, "nobody")


def test_build_table_accepts_encoded_views_and_empty_shards():
    manifest = make_manifest(num_syn_captions=0)
    columns = make_columns(manifest, 3)
    columns[records.AUG_PARAMS] = np.stack([augparams.views_to_array(v) for v in columns[records.AUG_PARAMS]])
    table = records.build_table(columns, manifest)
    np.testing.assert_array_equal(records.aug_params(table), columns[records.AUG_PARAMS])
    assert records.text_embeddings(table, "openai").shape == (3, 1, 16)
    empty = records.build_table(make_columns(manifest, 0), manifest)
    assert empty.num_rows == 0 and records.image_embeddings(empty, "datacomp_xl").shape == (0, K, 24)


def test_adding_a_teacher_rebuilds_from_a_stored_shard(tmp_path):
    old = make_manifest(TEACHERS[:1], schema_version=1)  # a view-major shard is read by record names to rebuild
    uri = str(tmp_path / "part.parquet")
    records.write_shard(uri, records.build_table(make_columns(old, 4), old))
    stored = records.read_shard(uri)
    new = make_manifest((*TEACHERS[:1], teacher("dfn", 8)), schema_version=1)
    rng = np.random.default_rng(5)
    columns = {name: stored[name] for name in stored.column_names}
    columns["image_emb__dfn"] = unit_vectors(rng, 4, K, 8)
    columns["text_emb__dfn"] = unit_vectors(rng, 4, 1 + S, 8)
    records.write_shard(uri, records.build_table(columns, new))
    rebuilt = records.read_shard(uri)
    assert rebuilt.schema.equals(new.schema())
    for name in stored.column_names:
        assert rebuilt[name].equals(stored[name]), name
    np.testing.assert_array_equal(
        records.image_embeddings(rebuilt, "dfn"), columns["image_emb__dfn"].astype(np.float16)
    )


def test_build_table_refuses_bad_columns():
    manifest = make_manifest()
    good = make_columns(manifest, 3)

    def refuses(match, **changes):
        columns = {**good, **changes}
        for name in [n for n, v in changes.items() if v is None]:
            del columns[name]
        with pytest.raises(records.RecordsError, match=match):
            records.build_table(columns, manifest)

    refuses(r"missing columns \['text_emb__openai'\]", text_emb__openai=None)
    refuses(r"unknown columns \['extra'\]", extra=[1, 2, 3])
    rng = np.random.default_rng(1)
    refuses(
        r"'image_emb__openai' has shape \(3, 3, 16\), expected \(3, 4, 16\)",
        image_emb__openai=unit_vectors(rng, 3, 3, 16),
    )
    refuses(
        r"'text_emb__datacomp_xl' has shape \(3, 3, 16\), expected \(3, 3, 24\)",
        text_emb__datacomp_xl=unit_vectors(rng, 3, 3, 16),
    )
    refuses(
        "'image_emb__openai': 1 embeddings are not L2-normalised",
        image_emb__openai=_scaled_one(good["image_emb__openai"], 2.0),
    )
    refuses(
        "'image_emb__openai': 1 embeddings are not L2-normalised",
        image_emb__openai=_scaled_one(good["image_emb__openai"], np.nan),
    )
    refuses(r"'caption' has 2 rows, 'key' has 3", caption=["a", "b"])
    refuses("'caption' has 1 missing values", caption=["a", None, "c"])
    refuses("duplicate keys", key=["a", "a", "b"])
    refuses(r"must hold S=2 captions a row, got lengths \[1, 2\]", syn_captions=[["x"], ["x", "y"], ["x", "y"]])
    refuses(r"lowercase extensions without a dot, got \['.JPG'\]", image_ext=["jpg", ".JPG", "png"])
    refuses(r"'aug_params' has shape \(3, 4, 7\)", aug_params=np.zeros((3, K, 7)))


def _scaled_one(values: np.ndarray, factor: float) -> np.ndarray:
    values = values.copy()
    values[1, 2] *= factor
    return values


@pytest.mark.parametrize("schema_version", records.SCHEMA_VERSIONS)
def test_fp16_bytes_match_formula_in_memory_and_on_disk(tmp_path, schema_version):
    # DataCompDR as MOBILECLIP.md states it: (K + 1 + S) x T x D x 2 bytes a sample.
    big = [teacher("openai", 768), teacher("datacomp_xl", 768)]
    assert make_manifest(big, 30, 5).embedding_bytes_per_sample == 36 * 2 * 768 * 2 == 110_592
    assert make_manifest(big, 10, 5).embedding_bytes_per_sample == 16 * 2 * 768 * 2 == 49_152

    manifest = make_manifest((teacher("openai", 256), teacher("datacomp_xl", 384)), schema_version=schema_version)
    per_sample = manifest.embedding_bytes_per_sample
    assert per_sample == (K + 1 + S) * (256 + 384) * 2
    num_rows = 12
    table = records.build_table(make_columns(manifest, num_rows), manifest)
    embedding_columns = [n for n in table.column_names if n.startswith(("image_emb__", "text_emb__"))]
    depth = 2 if schema_version == 1 else 1  # (R, D) lists, or one column a row of D
    leaves = [table[n].chunk(0) for n in embedding_columns]
    for _ in range(depth):
        leaves = [leaf.flatten() for leaf in leaves]
    in_memory = sum(leaf.buffers()[1].size for leaf in leaves)
    assert in_memory == num_rows * per_sample
    assert sum(table[n].nbytes for n in embedding_columns) == num_rows * per_sample  # no validity bitmaps

    uri = str(tmp_path / "part.parquet")
    records.write_shard(uri, table)
    row_group = pq.read_metadata(uri).row_group(0)
    on_disk = {}
    for i in range(row_group.num_columns):
        column = row_group.column(i)
        on_disk[column.path_in_schema.split(".")[0]] = column
    assert all(on_disk[n].compression == "UNCOMPRESSED" for n in embedding_columns)
    stored = sum(on_disk[n].total_compressed_size for n in embedding_columns)
    # Raw fp16 values plus repetition levels and page headers: a few percent over at this tiny D, < 1 % at 768.
    assert num_rows * per_sample <= stored <= num_rows * per_sample * 1.05 + 1024


def test_failed_shard_write_leaves_no_file(tmp_path, monkeypatch):
    manifest = make_manifest()
    table = records.build_table(make_columns(manifest, 3), manifest)

    def crash_mid_write(table, where, **kwargs):
        where.write(b"PAR1 half a shard")
        raise RuntimeError("worker died")

    monkeypatch.setattr(records.pq, "write_table", crash_mid_write)
    uri = str(tmp_path / "part-00000.parquet")
    with pytest.raises(RuntimeError, match="worker died"):
        records.write_shard(uri, table)
    assert not os.path.exists(uri)
    assert storage.list_files(str(tmp_path), recursive=True) == []
    assert os.listdir(tmp_path) == []  # not even the hidden temporary file
    with pytest.raises(records.RecordsError, match=r"must end in \.parquet"):
        records.write_shard(str(tmp_path / "part.pq"), table)


# --------------------------------------------------------------------------- manifest


def test_manifest_json_round_trip_and_properties():
    manifest = make_manifest(
        shards=(records.ShardInfo("a/part-0.parquet", 5), records.ShardInfo("a/part-1.parquet", 3)),
        skipped={"too_small": 1, "decode_error": 2},
        augment_seed=7,
    )
    assert manifest.skipped == (("decode_error", 2), ("too_small", 1))
    text = manifest.to_json()
    data = json.loads(text)
    assert next(iter(data)) == "schema_version" and data["schema_version"] == records.SCHEMA_VERSION
    assert data["skipped"] == {"decode_error": 2, "too_small": 1}
    back = records.Manifest.from_json(text)
    assert back == manifest and hash(back) == hash(manifest)
    assert back.num_rows == 8 and back.num_skipped == 3
    assert back.teacher_names == ("openai", "datacomp_xl")
    assert back.embed_dims == {"openai": 16, "datacomp_xl": 24}
    assert back.teacher("datacomp_xl").embed_dim == 24
    with pytest.raises(records.RecordsError, match=r"no teacher 'x'.*\['openai', 'datacomp_xl'\]"):
        back.teacher("x")
    assert back.shard_uris("s3://b/ds") == ["s3://b/ds/a/part-0.parquet", "s3://b/ds/a/part-1.parquet"]
    no_captioner = make_manifest(num_syn_captions=0)
    assert records.Manifest.from_json(no_captioner.to_json()) == no_captioner


# A manifest.json as clipdr wrote it before `AugmentSpec` existed (augment settings off their defaults), and
# the two data fingerprints computed from it on that code. Existing datasets must keep both: the bytes because
# a rewrite must not churn them, the fingerprints because reinforcement resumes and training runs compare them.
MANIFEST_V1 = pathlib.Path(__file__).parent / "data" / "manifest-v1.json"
REINFORCE_FINGERPRINT_V1 = "f81f56a907860fc98b9e8483eca3a9ebe47b753666fc433f6b67d83a6378370c"
TRAIN_DATA_FINGERPRINT_V1 = "sha256:4458a489ed3b303a"


def test_existing_manifest_reads_back_and_reserialises_byte_identically():
    data = MANIFEST_V1.read_bytes()
    manifest = records.Manifest.from_json(data)
    assert manifest.to_json().encode() == data
    assert manifest.augment.scale == (0.25, 1.0) and manifest.augment.num_ops == 3 and manifest.augment.hflip == 0.5
    assert manifest.aug_param_length == augparams.encoded_length(3)


def test_existing_manifest_keeps_its_data_fingerprints():
    # The fingerprints of reinforce/run.py (resume of a reinforcement) and train/run.py (the training data), of the
    # manifest read back, match what an existing dataset recorded (in the spellings of that time): pinned so that
    # no refactor of the specs changes them.
    from clipdr.reinforce.run import run_fingerprint
    from clipdr.train.run import data_fingerprint_of

    manifest = records.Manifest.from_json(MANIFEST_V1.read_bytes())
    # Shards of that time carry the fingerprint with the teachers' a_k in it (`legacy`); the plan accepts it beside
    # today's, which leaves a_k out (a training choice, not stored data): changing a_k does not change it.
    assert runstate.matches(REINFORCE_FINGERPRINT_V1, run_fingerprint(manifest, legacy=True))
    other_a_k = dataclasses.replace(
        manifest, teachers=tuple(dataclasses.replace(t, logit_scale=60.0) for t in manifest.teachers)
    )
    assert run_fingerprint(other_a_k) == run_fingerprint(manifest) != run_fingerprint(manifest, legacy=True)
    assert runstate.matches(TRAIN_DATA_FINGERPRINT_V1, data_fingerprint_of("", manifest))


def test_a_teachers_precision_is_written_only_when_set_and_enters_the_fingerprints():
    # `precision` came after datasets existed: at "auto" it is not written (the pinned manifest above keeps its
    # bytes and fingerprints); "bf16" is other data (another rounding), so it is written and fingerprinted.
    from clipdr.reinforce.run import run_fingerprint

    manifest = records.Manifest.from_json(MANIFEST_V1.read_bytes())
    assert {t.precision for t in manifest.teachers} == {"auto"}
    first, *rest = manifest.teachers
    bf16 = dataclasses.replace(manifest, teachers=(dataclasses.replace(first, precision="bf16"), *rest))
    data = json.loads(bf16.to_json())
    assert data["teachers"][0]["precision"] == "bf16" and not any("precision" in t for t in data["teachers"][1:])
    assert records.Manifest.from_json(bf16.to_json()) == bf16
    assert run_fingerprint(bf16) != run_fingerprint(manifest)
    with pytest.raises(records.RecordsError, match=r"precision must be one of \('auto', 'bf16'\), got 'fp8'"):
        dataclasses.replace(first, precision="fp8")


def test_augment_spec_is_built_from_the_run_config_field_by_field():
    cfg = AugmentConfig(scale=(0.3, 0.9), ratio=(0.5, 2.0), num_ops=3, magnitude=5, num_magnitude_bins=11, hflip=0.5)
    spec = records.AugmentSpec.from_config(cfg)
    assert config.to_dict(spec) == config.to_dict(cfg)  # same values, and today the same names in the same order
    assert records.AugmentSpec.from_config(AugmentConfig()) == records.AugmentSpec()


def test_uid_column_is_optional_and_nullable(tmp_path):
    plain = make_manifest()
    # Datasets without the column keep their manifest bytes (and so their fingerprints) and their schema.
    assert "has_uid" not in plain.to_dict() and records.UID not in plain.schema().names
    assert records.Manifest.from_json(plain.to_json()) == plain
    manifest = make_manifest(has_uid=True)
    field = manifest.schema().field(records.UID)
    assert field.type == pa.string() and field.nullable
    with pytest.raises(records.RecordsError, match=r"missing columns \['uid'\]"):
        records.build_table(make_columns(manifest, 1), manifest)
    table = records.build_table({**make_columns(manifest, 3), records.UID: ["uid-0", None, "uid-2"]}, manifest)
    records.write_shard(str(tmp_path / "part.parquet"), table)
    final = dataclasses.replace(manifest, shards=(records.ShardInfo("part.parquet", 3),))
    records.write_manifest(str(tmp_path), final)
    assert json.loads(final.to_json())["has_uid"] is True
    dataset = records.open_dataset(str(tmp_path))
    assert dataset.manifest == final
    assert records.read_shard(dataset.shard_uris[0], [records.UID]).column(0).to_pylist() == ["uid-0", None, "uid-2"]
    assert records.schema_differences(manifest.schema(), plain.schema()) == ["missing columns ['uid']"]


def _edited(edit) -> str:
    data = make_manifest(shards=(records.ShardInfo("p.parquet", 1),)).to_dict()
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(extra=1), r"unknown key 'extra' in manifest"),
        (
            lambda d: d["teachers"][1].update(embed_dimm=3),
            r"unknown key 'teachers\[1\].embed_dimm'.*did you mean 'embed_dim'",
        ),
        (lambda d: d.pop("source_fingerprint"), r"missing key 'source_fingerprint'"),
        (lambda d: d["captioner"].pop("seed"), r"missing key 'captioner.seed'"),
        (lambda d: d["shards"][0].pop("num_rows"), r"missing key 'shards\[0\].num_rows'"),
        (lambda d: d.update(num_augmentations="4"), r"num_augmentations: expected an integer, got str '4'"),
        (lambda d: d["teachers"][0].update(embed_dim=True), r"teachers\[0\].embed_dim: expected an integer"),
        (lambda d: d["augment"].update(num_ops=2.5), r"augment.num_ops: expected an integer"),
        (lambda d: d.update(skipped=[["x", 1]]), r"skipped: expected an object of reason -> count"),
        (
            lambda d: d.update(schema_version=3),
            r"schema_version 3: written by a newer clipdr\? .* reads versions 1 and 2",
        ),
        (lambda d: d.update(schema_version="1"), r"unknown schema_version '1'; this code reads versions 1 and 2"),
        (lambda d: d.pop("schema_version"), r"missing key 'schema_version'"),
        (lambda d: d["teachers"][0].update(name="Open AI"), r"invalid teacher name 'Open AI'"),
        (lambda d: d.update(captioner=None), r"num_syn_captions is 2 but no captioner is recorded"),
        (lambda d: d["shards"][0].update(path="../p.parquet"), r"shard path '../p.parquet' must be relative"),
        (lambda d: d.update(created_at="yesterday"), r"created_at must be an ISO 8601 time"),
        (lambda d: d.update(has_uid="yes"), r"has_uid: expected true or false"),
    ],
)
def test_manifest_from_json_is_strict(edit, match):
    with pytest.raises(records.RecordsError, match=match):
        records.Manifest.from_json(_edited(edit), where="manifest")


def test_manifest_refuses_inconsistent_construction():
    with pytest.raises(records.RecordsError, match="teacher names must be unique"):
        make_manifest((teacher("openai", 8), teacher("openai", 16)))
    with pytest.raises(records.RecordsError, match="at least one teacher"):
        make_manifest(())
    with pytest.raises(records.RecordsError, match=r"num_augmentations \(K\) must be >= 1"):
        make_manifest(num_augmentations=0)
    with pytest.raises(records.RecordsError, match="shard paths must be unique"):
        make_manifest(shards=(records.ShardInfo("p.parquet", 1), records.ShardInfo("p.parquet", 2)))
    with pytest.raises(records.RecordsError, match="is not valid JSON"):
        records.Manifest.from_json("{not json")


# --------------------------------------------------------------------------- datasets


def test_open_dataset_round_trip(tmp_path):
    manifest = write_dataset(tmp_path, make_manifest())
    dataset = records.open_dataset(str(tmp_path), require_teachers=["openai", "datacomp_xl"], min_syn_captions=S)
    assert dataset.manifest == manifest
    assert dataset.num_rows == 8
    assert dataset.shard_uris == tuple(str(tmp_path / "shards" / f"part-0000{i}.parquet") for i in range(2))
    keys = [k for uri in dataset.shard_uris for k in records.read_shard(uri, [records.KEY])[records.KEY].to_pylist()]
    assert keys == [f"s0-{i}" for i in range(5)] + [f"s1-{i}" for i in range(3)]


def test_open_dataset_without_manifest(tmp_path):
    with pytest.raises(records.RecordsError, match=r"no manifest\.json under .*: not a reinforced dataset$"):
        records.open_dataset(str(tmp_path))
    manifest = make_manifest()
    records.write_shard(str(tmp_path / "part.parquet"), records.build_table(make_columns(manifest, 2), manifest))
    with pytest.raises(records.RecordsError, match=r"1 parquet files lie there without one.*manifest is written last"):
        records.open_dataset(str(tmp_path))


def test_open_dataset_refuses_newer_schema_version(tmp_path):
    write_dataset(tmp_path, make_manifest())
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        records.RecordsError, match=r"schema_version 7: written by a newer clipdr\? .*reads versions 1 and 2"
    ):
        records.open_dataset(str(tmp_path))


def test_open_dataset_refuses_missing_teachers_and_captions(tmp_path):
    write_dataset(tmp_path, make_manifest())
    with pytest.raises(
        records.RecordsError,
        match=r"lacks teachers \['dfn'\]: it has \['openai', 'datacomp_xl'\], the caller requires \['openai', 'dfn'\]",
    ):
        records.open_dataset(str(tmp_path), require_teachers=["openai", "dfn"])
    with pytest.raises(records.RecordsError, match="has 2 synthetic captions a sample, the caller needs at least 5"):
        records.open_dataset(str(tmp_path), min_syn_captions=5)


def test_open_dataset_refuses_missing_shard(tmp_path):
    write_dataset(tmp_path, make_manifest())
    os.remove(tmp_path / "shards" / "part-00001.parquet")
    with pytest.raises(
        records.RecordsError, match=r"1 shards listed in its manifest are missing: shards/part-00001.parquet"
    ):
        records.open_dataset(str(tmp_path))


def test_open_dataset_refuses_row_count_mismatch(tmp_path):
    manifest = write_dataset(tmp_path, make_manifest())
    wrong = dataclasses.replace(manifest, shards=(manifest.shards[0], records.ShardInfo(manifest.shards[1].path, 4)))
    records.write_manifest(str(tmp_path), wrong, verify=False)
    with pytest.raises(
        records.RecordsError, match=r"shards/part-00001.parquet: the manifest says 4 rows, the Parquet footer 3"
    ):
        records.open_dataset(str(tmp_path))
    records.open_dataset(str(tmp_path), check_shards=False)  # the footer check is what catches it


def test_open_dataset_refuses_shard_schema_mismatch(tmp_path):
    manifest = write_dataset(tmp_path, make_manifest(schema_version=1))
    # A shard made with K=3 views and another datacomp_xl width, under the manifest's name.
    other = make_manifest((teacher("openai", 16), teacher("datacomp_xl", 32)), num_augmentations=3, schema_version=1)
    uri = str(tmp_path / manifest.shards[1].path)
    records.write_shard(uri, records.build_table(make_columns(other, 3), other))
    with pytest.raises(records.RecordsError) as excinfo:
        records.open_dataset(str(tmp_path))
    message = str(excinfo.value)
    assert "1 shards do not match its manifest" in message
    assert "column 'image_emb__openai' is (3, 16) float16, the manifest says (4, 16) float16" in message
    assert "column 'image_emb__datacomp_xl' is (3, 32) float16, the manifest says (4, 24) float16" in message
    assert "column 'text_emb__datacomp_xl' is (3, 32) float16, the manifest says (3, 24) float16" in message
    assert "column 'aug_params' is (3, 9) float32, the manifest says (4, 9) float32" in message
    # A teacher the manifest does not know, or one it lists but the shard lacks, is named too.
    extra_teacher = make_manifest((*TEACHERS, teacher("dfn", 8)), schema_version=1)
    records.write_shard(uri, records.build_table(make_columns(extra_teacher, 3), extra_teacher))
    with pytest.raises(records.RecordsError, match=r"unexpected columns \['image_emb__dfn', 'text_emb__dfn'\]"):
        records.open_dataset(str(tmp_path))
    one_teacher = make_manifest(TEACHERS[:1], schema_version=1)
    records.write_shard(uri, records.build_table(make_columns(one_teacher, 3), one_teacher))
    with pytest.raises(
        records.RecordsError, match=r"missing columns \['image_emb__datacomp_xl', 'text_emb__datacomp_xl'\]"
    ):
        records.open_dataset(str(tmp_path))


def test_extra_parquet_files_warn_or_refuse(tmp_path):
    manifest = write_dataset(tmp_path, make_manifest())
    leftover = tmp_path / "shards" / "part-00002.parquet"
    records.write_shard(str(leftover), records.build_table(make_columns(manifest, 2), manifest))
    with pytest.warns(
        records.RecordsWarning, match=r"holds 1 parquet files its manifest does not list \(shards/part-00002"
    ):
        dataset = records.open_dataset(str(tmp_path))
    assert str(leftover) not in dataset.shard_uris
    with pytest.raises(records.RecordsError, match="does not list"):
        records.open_dataset(str(tmp_path), extra_files="error")
    # Hidden temporaries (an interrupted atomic write) are not shards and raise nothing.
    os.remove(leftover)
    (tmp_path / "shards" / ".part-00002.parquet.tmp-abc").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records.open_dataset(str(tmp_path), extra_files="error")


def test_write_manifest_verifies_shards_first(tmp_path):
    manifest = write_dataset(tmp_path, make_manifest())
    os.remove(tmp_path / "manifest.json")
    wrong = dataclasses.replace(manifest, shards=(*manifest.shards, records.ShardInfo("shards/nope.parquet", 1)))
    with pytest.raises(records.RecordsError, match=r"missing: shards/nope\.parquet"):
        records.write_manifest(str(tmp_path), wrong)
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.integration
def test_s3_round_trip(s3_bucket):
    root = storage.join(s3_bucket, "reinforced", "demo")
    manifest = write_dataset(root, make_manifest())
    dataset = records.open_dataset(root, require_teachers=["openai"])
    assert dataset.manifest == manifest
    assert dataset.shard_uris[0] == f"{root}/shards/part-00000.parquet"
    table = records.read_shard(dataset.shard_uris[1])
    assert table.num_rows == 3
    assert records.text_embeddings(table, "datacomp_xl").shape == (3, 1 + S, 24)


# --------------------------------------------------------------------------- layout version 2 (view-major)


def test_view_major_round_trip_gives_the_arrays_of_layout_1(tmp_path):
    v2 = make_manifest()
    v1 = dataclasses.replace(v2, schema_version=1)
    assert v2.schema_version == records.SCHEMA_VERSION == records.VIEW_MAJOR and v2.view_major and not v1.view_major
    columns = make_columns(v2, 5)
    names = v2.schema().names
    assert records.AUG_PARAMS not in names and records.image_emb_column("openai") not in names
    assert [n for n in names if n.startswith("image_emb__openai")] == [f"image_emb__openai__{k}" for k in range(K)]
    assert [n for n in names if n.startswith("text_emb__openai")] == [f"text_emb__openai__{r}" for r in range(1 + S)]
    assert v2.schema().field("aug_params__0").type == pa.list_(
        pa.field("item", pa.float32(), False), v2.aug_param_length
    )
    assert v2.record_schema() == v1.schema() == v1.record_schema()
    tables = {}
    for manifest in (v1, v2):
        uri = str(tmp_path / f"v{manifest.schema_version}.parquet")
        records.write_shard(uri, records.build_table(columns, manifest))
        tables[manifest.schema_version] = records.read_shard(uri)
        assert records.schema_differences(manifest.schema(), tables[manifest.schema_version].schema) == []
    for accessor, column in (
        (records.image_embeddings, records.image_emb_column),
        (records.text_embeddings, records.text_emb_column),
    ):
        for spec in TEACHERS:
            got_v1, got_v2 = accessor(tables[1], spec.name), accessor(tables[2], spec.name)
            assert got_v2.dtype == np.float16 and np.array_equal(got_v1, got_v2)
            assert np.array_equal(got_v2, np.asarray(columns[column(spec.name)]).astype(np.float16))
    assert np.array_equal(records.aug_params(tables[1]), records.aug_params(tables[2]))
    assert records.aug_params(tables[2]).shape == (5, K, v2.aug_param_length)
    with pytest.raises(records.RecordsError, match=r"holds its rows \[0, 2\], not all of 0..R-1"):
        records.image_embeddings(tables[2].select(["image_emb__openai__0", "image_emb__openai__2"]), "openai")


def test_drawn_columns_read_one_view_and_caption_row_or_whole_columns_in_layout_1(tmp_path):
    v2 = make_manifest()
    v1 = dataclasses.replace(v2, schema_version=1)
    columns = make_columns(v2, 4)
    uri = str(tmp_path / "v2.parquet")
    records.write_shard(uri, records.build_table(columns, v2))
    drawn = records.drawn_columns(v2, ["openai"], [records.DEFAULT_CAPTION_SET], view=2, syn_caption=1)
    assert drawn == [
        records.KEY,
        records.IMAGE,
        records.CAPTION,
        "aug_params__2",
        records.SYN_CAPTIONS,
        "image_emb__openai__2",
        "text_emb__openai__0",
        "text_emb__openai__2",  # synthetic caption 1 is text row 1 + 1
    ]
    table = records.read_shard(uri, drawn)
    assert table.column_names == drawn
    image_NKD = columns["image_emb__openai"].astype(np.float16)
    text_NED = columns["text_emb__openai"].astype(np.float16)
    assert np.array_equal(records.fixed_shape_numpy(table.column("image_emb__openai__2")), image_NKD[:, 2])
    assert np.array_equal(records.fixed_shape_numpy(table.column("text_emb__openai__2")), text_NED[:, 2])
    # a draw per sample (view or caption None) takes every row; no teacher, no embeddings
    assert records.drawn_columns(v2, ["openai"], [records.DEFAULT_CAPTION_SET], view=0)[-S:] == [
        f"text_emb__openai__{r}" for r in range(1, 1 + S)
    ]
    assert records.drawn_columns(v2, (), (), view=3) == [records.KEY, records.IMAGE, records.CAPTION, "aug_params__3"]
    # layout 1 holds every row in one column: the whole columns, whatever the draw
    assert records.drawn_columns(v1, ["openai"], [records.DEFAULT_CAPTION_SET], view=2, syn_caption=1) == [
        records.KEY,
        records.IMAGE,
        records.CAPTION,
        records.AUG_PARAMS,
        records.SYN_CAPTIONS,
        "image_emb__openai",
        "text_emb__openai",
    ]
    with pytest.raises(records.RecordsError, match=r"view must be in \[0, 4\)"):
        records.drawn_columns(v2, view=K)


def test_row_columns_cannot_clash_with_caption_sets_or_teachers():
    # A caption set's column is text_emb__<t>__<set>; a row's is <column>__<digits>. Set and teacher names start with
    # a letter, so no set or teacher name makes a row's name, and a row of a set's column is still unambiguous.
    assert records.row_column(records.text_emb_column("openai"), 2) == "text_emb__openai__2"
    assert records.row_column(records.set_text_emb_column("openai", "r0"), 0) == "text_emb__openai__r0__0"
    for name in ("0", "2", "12"):
        with pytest.raises(records.RecordsError):
            records.validate_caption_set_name(name)
        with pytest.raises(records.RecordsError):
            records.validate_teacher_name(name)
    for clashing in ("r0", "v1", "row_2", "a2"):  # names a `__r<j>` or `__v<k>` suffix would have clashed with
        column = records.set_text_emb_column("openai", clashing)
        assert records.is_row_major(column) and not records.is_row_major(records.row_column(column, 0))
    assert not records.is_row_major("text_emb__openai__3") and records.is_row_major(records.AUG_PARAMS)
    with pytest.raises(records.RecordsError, match="no rows of its own"):
        records.row_column(records.CAPTION, 0)
    manifest = make_manifest(teachers=(teacher("t", 8), teacher("t_0", 8)))
    names = manifest.schema().names
    assert len(names) == len(set(names)) == 4 + 1 + K + 2 * (K + 1 + S)


def test_layout_version_enters_the_fingerprints_and_old_manifests_keep_theirs():
    from clipdr.reinforce.run import run_fingerprint
    from clipdr.train.run import data_fingerprint_of

    v1 = records.Manifest.from_json(MANIFEST_V1.read_bytes())
    assert v1.schema_version == 1 and not v1.view_major
    v2 = dataclasses.replace(v1, schema_version=2)
    assert records.Manifest.from_json(v2.to_json()) == v2
    assert run_fingerprint(v2) != run_fingerprint(v1) and run_fingerprint(v2, legacy=True) != REINFORCE_FINGERPRINT_V1
    assert not runstate.matches(TRAIN_DATA_FINGERPRINT_V1, data_fingerprint_of("", v2))
    with pytest.raises(records.RecordsError, match="unknown schema_version 0; this code reads versions 1 and 2"):
        dataclasses.replace(v1, schema_version=0)
