"""The training data path: dataset checks, student preprocessing, deterministic replay and target selection."""

import dataclasses
import io
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from clipdr import augment, augparams, models, records
from clipdr.config import AugmentConfig, to_dict
from clipdr.data import sources
from clipdr.train import data, remote
from clipdr.train.plan import Mode

K, S, NUM_ROWS, SIDE = 3, 2, 8, 32
STUDENT = "clipdr-tiny-mci"
DIMS = {"alpha": 16, "beta_xl": 24}  # different D, so a mix-up of teachers cannot pass


def teacher(name: str, dim: int) -> records.TeacherSpec:
    return records.TeacherSpec(
        name=name,
        model="clipdr-tiny-vit",
        pretrained="",
        embed_dim=dim,
        logit_scale=100.0,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def make_manifest(
    num_syn_captions: int = S, schema_version: int = records.SCHEMA_VERSION, generation_type: str = "top_p"
) -> records.Manifest:
    return records.Manifest(
        schema_version=schema_version,
        teachers=tuple(teacher(name, dim) for name, dim in DIMS.items()),
        augment=records.AugmentSpec(hflip=0.5),
        num_augmentations=K,
        num_syn_captions=num_syn_captions,
        source_uri="synthetic://world",
        source_fingerprint="sha256:0",
        captioner=records.CaptionerSpec(
            name="tiny", kind="synthetic", model="none", pretrained="", generation_type=generation_type
        )
        if num_syn_captions
        else None,
    )


def encode(rng: np.random.Generator, fmt: str) -> bytes:
    pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def unit_fp16(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def write_dataset(root, num_syn_captions: int = S, num_shards: int = 1, **layout) -> tuple[str, records.Manifest]:
    """A reinforced dataset of ``NUM_ROWS`` rows a shard (keys unique over shards) under ``root``; ``layout``: the
    manifest's ``schema_version`` and captioner ``generation_type``."""
    manifest = make_manifest(num_syn_captions, **layout)
    rng = np.random.default_rng(0)
    shards = []
    for shard in range(num_shards):
        rows = range(shard * NUM_ROWS, (shard + 1) * NUM_ROWS)
        keys = [f"sample-{i}" for i in rows]
        columns = {
            records.KEY: keys,
            records.IMAGE: [encode(rng, "JPEG" if i % 2 else "PNG") for i in rows],
            records.IMAGE_EXT: ["jpg" if i % 2 else "png" for i in rows],
            records.CAPTION: [f"a photo of thing {i}" for i in rows],
            records.AUG_PARAMS: [augment.sample_views((SIDE, SIDE), key, K, manifest.augment) for key in keys],
        }
        if num_syn_captions:
            columns[records.SYN_CAPTIONS] = [[f"synthetic {i} {j}" for j in range(num_syn_captions)] for i in rows]
        for name, dim in DIMS.items():
            columns[records.image_emb_column(name)] = unit_fp16(rng, NUM_ROWS, K, dim)
            columns[records.text_emb_column(name)] = unit_fp16(rng, NUM_ROWS, 1 + num_syn_captions, dim)
        name = f"part-{shard:05d}.parquet"
        records.write_shard(str(root / name), records.build_table(columns, manifest))
        shards.append(records.ShardInfo(name, NUM_ROWS))
    manifest = dataclasses.replace(manifest, shards=tuple(shards))
    records.write_manifest(str(root), manifest)
    return str(root), manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The whole first shard of a dataset in the layout new datasets have (view-major: one view and caption an
    epoch); `test_a_layout_1_dataset_trains_on_whole_columns_drawn_per_key` covers layout 1."""
    uri, _ = write_dataset(tmp_path_factory.mktemp("reinforced"))
    opened = data.check_dataset(uri, Mode.REINFORCED, list(DIMS), min_syn_captions=1)
    return opened.manifest, records.read_shard(opened.shard_uris[0])


@pytest.fixture(scope="module")
def preprocess():
    return data.student_preprocess(STUDENT)


def replay_batch(manifest, preprocess, epoch=0, mode=Mode.REINFORCED, use_syn_captions=True):
    return data.ReplayBatch(
        manifest, preprocess, STUDENT, seed=7, epoch=epoch, mode=mode, use_syn_captions=use_syn_captions
    )


# --------------------------------------------------------------------------- preprocessing and checks


@pytest.mark.parametrize("name", [STUDENT, "clipdr-tiny-vit"])
def test_student_preprocess_matches_the_built_model(name):
    built = models.create_model(name)
    pp_cfg = built.visual.preprocess_cfg
    expected = data.StudentPreprocess(
        pp_cfg["size"], pp_cfg["mean"], pp_cfg["std"], pp_cfg["interpolation"], built.context_length
    )
    assert data.student_preprocess(name) == expected


def test_tiny_mci_preprocess(preprocess):
    assert preprocess == data.StudentPreprocess((64, 64), (0.0,) * 3, (1.0,) * 3, "bilinear", 77)
    with pytest.raises(ValueError, match="interpolation 'random'"):
        dataclasses.replace(preprocess, interpolation="random")


def test_check_dataset_refuses_what_a_mode_lacks(tmp_path):
    uri, _ = write_dataset(tmp_path / "with", num_syn_captions=S)
    with pytest.raises(records.RecordsError, match=r"mode 'reinforced'.*lacks teachers \['gamma'\]"):
        data.check_dataset(uri, Mode.REINFORCED, ["alpha", "gamma"])
    with pytest.raises(ValueError, match="at least one teacher"):
        data.check_dataset(uri, Mode.REINFORCED, [])
    with pytest.raises(ValueError, match="unknown training mode 'distill'"):
        data.check_dataset(uri, "distill", ["alpha"])
    # clip and online_distill read no stored embeddings: teachers the data lacks do not matter.
    assert data.check_dataset(uri, Mode.CLIP, ["gamma"]).num_rows == NUM_ROWS
    assert data.check_dataset(uri, Mode.ONLINE_DISTILL, ["gamma"], min_syn_captions=S).num_rows == NUM_ROWS

    bare, manifest = write_dataset(tmp_path / "without", num_syn_captions=0)
    with pytest.raises(records.RecordsError, match=r"mode 'reinforced'.*0 synthetic captions.*at least 1"):
        data.check_dataset(bare, Mode.REINFORCED, ["alpha"], min_syn_captions=1)
    assert data.check_dataset(bare, Mode.REINFORCED, ["alpha"]).manifest.num_syn_captions == 0
    with pytest.raises(ValueError, match="num_syn_captions = 0"):
        data.ReplayBatch(manifest, data.student_preprocess(STUDENT), STUDENT, 0, 0, use_syn_captions=True)


# --------------------------------------------------------------------------- replay


def test_outputs_select_stored_rows_and_replay_view_k(dataset, preprocess):
    manifest, table = dataset
    # An epoch whose shared draw is neither row 0 nor caption 0, so a selection that ignored them could not pass.
    epoch = next(e for e in range(32) if 0 not in data.shared_draw(manifest, 7, e, [records.DEFAULT_CAPTION_SET], S))
    out = replay_batch(manifest, preprocess, epoch=epoch)(table)
    N, (H, W), T = NUM_ROWS, preprocess.image_size, preprocess.context_length
    assert out[data.IMAGE].shape == (N, 3, H, W) and out[data.IMAGE].dtype == np.uint8
    for name in (data.TEXT, data.SYN_TEXT):
        assert out[name].shape == (N, T) and out[name].dtype == np.int64
    k_N, j_N = out[data.AUG_INDEX], out[data.SYN_INDEX]
    assert k_N.dtype == j_N.dtype == np.int64 and k_N.shape == j_N.shape == (N,)
    assert set(k_N) <= set(range(K)) and set(j_N) <= set(range(S))

    teacher_columns = sorted(c for c in out if c.startswith("teacher_"))
    assert teacher_columns == sorted(f(n) for n in DIMS for f in (
        data.teacher_image_column, data.teacher_text_column, data.teacher_syn_text_column
    ))  # fmt: skip
    for name, dim in DIMS.items():
        image_emb_NKD, text_emb_NED = records.image_embeddings(table, name), records.text_embeddings(table, name)
        for column in (data.teacher_image_column(name), data.teacher_text_column(name)):
            assert out[column].shape == (N, dim) and out[column].dtype == np.float32
        for i in range(N):
            assert np.array_equal(out[data.teacher_image_column(name)][i], image_emb_NKD[i, k_N[i]].astype(np.float32))
            assert np.array_equal(out[data.teacher_text_column(name)][i], text_emb_NED[i, 0].astype(np.float32))
            assert np.array_equal(
                out[data.teacher_syn_text_column(name)][i], text_emb_NED[i, 1 + j_N[i]].astype(np.float32)
            )

    tokenizer = models.get_tokenizer(STUDENT)
    views_NKL = records.aug_params(table)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        params = augparams.views_from_array(views_NKL[i])[k_N[i]]
        image = sources.decode_rgb(row[records.IMAGE])
        assert torch.equal(
            torch.from_numpy(out[data.IMAGE][i]), augment.replay_uint8(image, params, (H, W), "bilinear")
        )
        expected_CHW = augment.replay(image, params, (H, W), preprocess.mean, preprocess.std, "bilinear")
        # What the step normalises on its device, a whole batch at once, is what replay gives one view on the CPU.
        normalised = augment.normalize(torch.from_numpy(out[data.IMAGE]), preprocess.mean, preprocess.std)
        assert torch.equal(normalised[i], expected_CHW)
        assert np.array_equal(out[data.TEXT][i], tokenizer([row[records.CAPTION]])[0].numpy())
        assert np.array_equal(out[data.SYN_TEXT][i], tokenizer([row[records.SYN_CAPTIONS][j_N[i]]])[0].numpy())


def test_same_seed_and_epoch_give_the_same_rows_whatever_the_batching(dataset, preprocess):
    manifest, table = dataset
    transform = replay_batch(manifest, preprocess)
    whole = transform(table)
    halves = [transform(table.slice(0, 3)), transform(table.slice(3))]
    permutation = np.random.default_rng(1).permutation(NUM_ROWS)
    shuffled = transform(table.take(permutation))
    as_numpy = transform({name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names})
    fresh = replay_batch(manifest, preprocess)(table.to_batches()[0])
    for name, values in whole.items():
        assert np.array_equal(np.concatenate([h[name] for h in halves]), values), name
        assert np.array_equal(shuffled[name], values[permutation]), name
        assert np.array_equal(as_numpy[name], values), name
        assert np.array_equal(fresh[name], values), name


def test_epoch_changes_the_draws_and_draws_cover_every_index(dataset, preprocess):
    manifest, table = dataset
    epochs = [replay_batch(manifest, preprocess, epoch=e)(table) for e in range(4)]
    assert any(not np.array_equal(epochs[0][data.AUG_INDEX], e[data.AUG_INDEX]) for e in epochs[1:])
    assert any(not np.array_equal(epochs[0][data.IMAGE], e[data.IMAGE]) for e in epochs[1:])
    if manifest.view_major:  # one view and one caption a whole epoch (`data.shared_draw`)
        assert all(len(set(e[data.AUG_INDEX])) == len(set(e[data.SYN_INDEX])) == 1 for e in epochs)

    keys = [f"key-{i}" for i in range(600)]
    k_N, j_N = data.draw_indices(7, 0, keys, K, S)
    assert np.bincount(k_N, minlength=K).min() > 600 / K / 2
    assert np.bincount(j_N, minlength=S).min() > 600 / S / 2
    k_next_N, _ = data.draw_indices(7, 1, keys, K, S)
    assert 0.5 < np.mean(k_N != k_next_N) < 0.85  # fresh draws: about (K-1)/K differ
    assert np.array_equal(data.draw_indices(7, 0, keys, K, S)[0], k_N)
    assert not np.array_equal(data.draw_indices(8, 0, keys, K, S)[0], k_N)


def test_clip_mode_needs_no_embedding_columns(dataset, preprocess):
    manifest, table = dataset
    embeddings = [c for c in table.column_names if c.startswith((records.IMAGE_EMB_PREFIX, records.TEXT_EMB_PREFIX))]
    bare = table.drop_columns(embeddings)
    out = replay_batch(manifest, preprocess, mode=Mode.CLIP, use_syn_captions=False)(bare)
    assert sorted(out) == sorted([data.IMAGE, data.TEXT, data.AUG_INDEX])
    reinforced = replay_batch(manifest, preprocess)(table)
    clip = replay_batch(manifest, preprocess, mode=Mode.CLIP)(bare)
    assert np.array_equal(clip[data.IMAGE], reinforced[data.IMAGE])
    assert np.array_equal(clip[data.SYN_TEXT], reinforced[data.SYN_TEXT])
    with pytest.raises(records.RecordsError, match="no column 'image_emb__alpha'"):
        replay_batch(manifest, preprocess)(bare)


def test_online_distill_feeds_each_teacher_the_students_view_and_captions(dataset, preprocess):
    manifest, table = dataset
    embeddings = [c for c in table.column_names if c.startswith((records.IMAGE_EMB_PREFIX, records.TEXT_EMB_PREFIX))]
    out = replay_batch(manifest, preprocess, mode=Mode.ONLINE_DISTILL)(table.drop_columns(embeddings))
    assert not [c for c in out if c.startswith(data.TEACHER_IMAGE_PREFIX)]  # no stored targets are read
    tokenizer = models.get_tokenizer("clipdr-tiny-vit")
    images = table.column(records.IMAGE).to_pylist()
    captions = table.column(records.CAPTION).to_pylist()
    syn = table.column(records.SYN_CAPTIONS).to_pylist()
    for name in DIMS:
        spec = manifest.teacher(name)
        view_NCHW = out[data.teacher_view_column(name)]
        assert view_NCHW.shape == (NUM_ROWS, 3, spec.image_size, spec.image_size)
        for i in (0, NUM_ROWS - 1):
            params = augparams.views_from_array(records.aug_params(table)[i])[out[data.AUG_INDEX][i]]
            expected = augment.replay_uint8(sources.decode_rgb(images[i]), params, spec.image_size, spec.interpolation)
            assert torch.equal(torch.from_numpy(view_NCHW[i]), expected)
        assert np.array_equal(out[data.teacher_tokens_column(name)], tokenizer(captions).numpy())
        drawn = [syn[i][j] for i, j in enumerate(out[data.SYN_INDEX])]
        assert np.array_equal(out[data.teacher_syn_tokens_column(name)], tokenizer(drawn).numpy())


def test_augment_batch_samples_a_fresh_deterministic_view_per_epoch(dataset, preprocess):
    _, table = dataset
    cfg = records.AugmentSpec(scale=(0.3, 1.0), hflip=0.5)
    rows = table.select([records.KEY, records.IMAGE, records.CAPTION])
    epoch0 = data.AugmentBatch(cfg, preprocess, STUDENT, seed=3, epoch=0)(rows)
    assert sorted(epoch0) == [data.IMAGE, data.TEXT]
    assert np.array_equal(
        data.AugmentBatch(cfg, preprocess, STUDENT, seed=3, epoch=0)(rows)[data.IMAGE], epoch0[data.IMAGE]
    )
    epoch1 = data.AugmentBatch(cfg, preprocess, STUDENT, seed=3, epoch=1)(rows)
    assert not np.array_equal(epoch1[data.IMAGE], epoch0[data.IMAGE])
    key = table.column(records.KEY)[2].as_py()
    image = sources.decode_rgb(table.column(records.IMAGE)[2].as_py())
    params = augment.sample(image.size, key, 1, cfg, 3)
    pre = preprocess
    expected = augment.replay_uint8(image, params, pre.image_size, pre.interpolation)
    assert torch.equal(torch.from_numpy(epoch1[data.IMAGE][2]), expected)


@pytest.mark.parametrize("mode", [Mode.REINFORCED, Mode.ONLINE_DISTILL])
def test_shipped_replay_equals_the_replay_batch(dataset, preprocess, mode):
    manifest, table = dataset
    shipped = remote.BatchTransform(
        remote.REPLAY,
        manifest=manifest.to_dict(),
        preprocess=dataclasses.asdict(preprocess),
        tokenizer_name=STUDENT,
        seed=7,
        epoch=1,
        mode=mode,
        use_syn_captions=True,
        teachers=None,
    )
    out = pickle.loads(pickle.dumps(shipped))(table)
    expected = replay_batch(manifest, preprocess, epoch=1, mode=mode)(table)
    assert sorted(out) == sorted(expected)
    for name, value in expected.items():
        assert np.array_equal(out[name], value), name


def test_shipped_augment_equals_the_augment_batch(dataset, preprocess):
    _, table = dataset
    cfg = AugmentConfig(scale=(0.3, 1.0), hflip=0.5)
    rows = table.select([records.KEY, records.IMAGE, records.CAPTION])
    shipped = remote.BatchTransform(
        remote.AUGMENT,
        augment_cfg=to_dict(cfg),
        preprocess=dataclasses.asdict(preprocess),
        tokenizer_name=STUDENT,
        seed=3,
        epoch=2,
    )
    out = pickle.loads(pickle.dumps(shipped))(rows)
    # The run config travels as a dict and becomes the spec where the transform is built.
    expected = data.AugmentBatch(records.AugmentSpec.from_config(cfg), preprocess, STUDENT, seed=3, epoch=2)(rows)
    assert all(np.array_equal(out[name], expected[name]) for name in (data.IMAGE, data.TEXT))


def test_shipped_transforms_refuse_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown batch transform 'resize'"):
        remote.BatchTransform("resize")


def test_empty_batch(dataset, preprocess):
    manifest, table = dataset
    out = replay_batch(manifest, preprocess)(table.slice(0, 0))
    assert out[data.IMAGE].shape == (0, 3, 64, 64) and out[data.TEXT].shape == (0, 77)
    assert out[data.teacher_syn_text_column("beta_xl")].shape == (0, DIMS["beta_xl"])


def test_a_row_that_does_not_replay_is_replaced_not_fatal(dataset, preprocess, caplog):
    # Rows 0 and 3: every stored view has a Color factor below 0 (a dataset converted before magnitudes were
    # checked); row 5: a corrupt image. The batch keeps its size, each bad row takes the previous good row's
    # outputs (row 0, with none before it, the next good one), and a warning names each.
    manifest, table = dataset
    bad_views = records.aug_params(table).copy()
    bad_views[[0, 3], :, 5:7] = [augparams.OP_NAMES.index("Color"), -1.5]
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    columns[records.AUG_PARAMS] = bad_views
    columns[records.IMAGE] = columns[records.IMAGE].copy()
    columns[records.IMAGE][5] = b"\x89PNG not an image"
    transform = replay_batch(manifest, preprocess)
    good = transform(table)
    with caplog.at_level("WARNING", logger=data.__name__):
        out = transform(columns)
    assert "replaced 3 of 8 rows" in caplog.text and "sample-3 (view" in caplog.text and "Color" in caplog.text
    source = [1, 1, 2, 2, 4, 4, 6, 7]
    for name, values in good.items():
        assert np.array_equal(out[name], values[source]), name

    columns[records.AUG_PARAMS] = np.broadcast_to(bad_views[:1], bad_views.shape)
    with pytest.raises(ValueError, match="no row of a batch of 8 replays"):
        transform(columns)


@pytest.mark.parametrize(("files", "actors"), [(1, 1), (64, 1), (65, 2), (1200, 19), (2048, 32), (100_000, 32)])
def test_parquet_footer_pool_grows_with_the_files_up_to_ray_datas_default(files, actors):
    from clipdr.train.pipeline import footer_actors

    assert footer_actors(files) == actors


@pytest.mark.parametrize("generation_type", ["top_p", "beam_search"])
def test_a_view_major_epoch_reads_only_its_drawn_columns(tmp_path, preprocess, generation_type):
    """The columns the training input reads in an epoch (`pipeline._columns`: one view's, one caption row's) alone
    give the batch that the whole records give. Beam-search captions are ordered by score, so caption j is drawn
    per sample and every caption row is read; views are independent draws, so one view serves the epoch."""
    from clipdr.config import Config, TrainConfig, replace
    from clipdr.train import pipeline
    from clipdr.train.plan import make_plan

    uri, manifest = write_dataset(tmp_path, schema_version=2, generation_type=generation_type)
    shard = records.open_dataset(uri).shard_uris[0]
    cfg = replace(TrainConfig(), {"model": STUDENT, "data": uri, "teachers": tuple(DIMS), "seed": 7})
    plan = make_plan(Config(train=cfg), [manifest.teacher(n) for n in DIMS])
    for epoch in range(2):
        transform = replay_batch(manifest, preprocess, epoch=epoch)
        columns = pipeline._columns(plan, manifest, epoch)
        assert columns == records.drawn_columns(
            manifest, list(DIMS), [records.DEFAULT_CAPTION_SET], transform.view, transform.syn_caption
        )
        syn_rows = 1 if generation_type == "top_p" else S
        assert len(columns) == 3 + 1 + 1 + len(DIMS) * (2 + syn_rows)
        whole, narrow = transform(records.read_shard(shard)), transform(records.read_shard(shard, columns))
        assert sorted(whole) == sorted(narrow)
        for name, values in whole.items():
            assert np.array_equal(narrow[name], values), name
        assert set(whole[data.AUG_INDEX]) == {transform.view}
        if generation_type == "top_p":
            assert set(whole[data.SYN_INDEX]) == {transform.syn_caption}
        else:
            assert transform.syn_caption is None and len(set(whole[data.SYN_INDEX])) > 1
    draws = [data.shared_draw(manifest, 7, epoch, [records.DEFAULT_CAPTION_SET], S) for epoch in range(8)]
    assert len({view for view, _ in draws}) > 1  # each epoch draws afresh
    assert all(view in range(K) for view, _ in draws)


def test_a_layout_1_dataset_trains_on_whole_columns_drawn_per_key(tmp_path, preprocess):
    """Datasets written before the view-major layout: read whole (every view in one column), k and j drawn per
    (seed, epoch, key), the targets the stored rows k, 0 and 1 + j, the views replayed from row k."""
    uri, manifest = write_dataset(tmp_path, schema_version=1)
    transform = replay_batch(manifest, preprocess)
    assert (transform.view, transform.syn_caption) == (None, None)
    columns = records.drawn_columns(manifest, list(DIMS), [records.DEFAULT_CAPTION_SET], 0, 0)
    assert columns[3] == records.AUG_PARAMS and columns[-1] == records.text_emb_column("beta_xl")
    table = records.read_shard(records.open_dataset(uri).shard_uris[0], columns)
    out = transform(table)
    keys = table.column(records.KEY).to_pylist()
    k_N, j_N = data.draw_indices(7, 0, keys, K, S)
    assert np.array_equal(out[data.AUG_INDEX], k_N) and np.array_equal(out[data.SYN_INDEX], j_N)
    assert len(set(k_N)) > 1 and len(set(j_N)) > 1
    rows = np.arange(NUM_ROWS)
    for name in DIMS:
        image_NKD, text_NED = records.image_embeddings(table, name), records.text_embeddings(table, name)
        assert np.array_equal(out[data.teacher_image_column(name)], image_NKD[rows, k_N].astype(np.float32))
        assert np.array_equal(out[data.teacher_text_column(name)], text_NED[:, 0].astype(np.float32))
        assert np.array_equal(out[data.teacher_syn_text_column(name)], text_NED[rows, 1 + j_N].astype(np.float32))
    views_NKL, images = records.aug_params(table), table.column(records.IMAGE).to_pylist()
    for i in (0, NUM_ROWS - 1):
        params = augparams.AugParams.from_array(views_NKL[i, k_N[i]])
        replayed = augment.replay_uint8(sources.decode_rgb(images[i]), params, preprocess.image_size, "bilinear")
        assert torch.equal(torch.from_numpy(out[data.IMAGE][i]), replayed)
