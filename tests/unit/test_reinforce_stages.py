"""The stream between reinforcement stages, without Ray: the chunk codec and the writer's order independence."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import weakref

import numpy as np
import pytest
from PIL import Image

from clipdr import augment, augparams, records, storage
from clipdr.data import sources
from clipdr.reinforce import chunks, stages
from tests.conftest import FlakyFileSystem
from tests.unit.test_records import K, make_columns, make_manifest
from tests.unit.test_sources import _samples


def test_a_packed_chunk_round_trips_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    columns = {
        "key": np.array(["a", "é", ""], dtype=object),
        "image": np.array([b"\x00\xff", b"", b"jpeg"], dtype=object),
        "views": rng.standard_normal((3, 4, 9)).astype(np.float32),
        "emb": rng.standard_normal((3, 2, 5)).astype(np.float16),
        "count": np.array([1, 2, 3], dtype=np.int64),
    }
    unpacked = chunks.unpack_chunk(chunks.pack_chunk(columns))
    assert list(unpacked) == list(columns)
    for name, want in columns.items():
        got = unpacked[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name


def _stream_chunks(manifest: records.Manifest, num_rows: int, chunk_rows: int) -> list[dict[str, np.ndarray]]:
    """The chunk rows the embed stage would hand the writer for one shard of ``num_rows`` samples."""
    columns = make_columns(manifest, num_rows)
    samples = {
        records.KEY: np.array(columns[records.KEY], dtype=object),
        records.IMAGE: np.array(columns[records.IMAGE], dtype=object),
        records.IMAGE_EXT: np.array(columns[records.IMAGE_EXT], dtype=object),
        records.CAPTION: np.array(columns[records.CAPTION], dtype=object),
        records.AUG_PARAMS: np.stack([augparams.views_to_array(v) for v in columns[records.AUG_PARAMS]]),
    }
    for j in range(manifest.num_syn_captions):
        samples[f"{chunks.SYN_PREFIX}{j}"] = np.array([c[j] for c in columns[records.SYN_CAPTIONS]], dtype=object)
    for spec in manifest.teachers:
        for column in (records.image_emb_column(spec.name), records.text_emb_column(spec.name)):
            samples[column] = columns[column].astype(np.float16)
    starts = list(range(0, num_rows, chunk_rows))
    return [
        {
            chunks.SHARD: np.array(["part.parquet"], dtype=object),
            chunks.CHUNK_INDEX: np.array([index]),
            chunks.CHUNK: np.array(
                [chunks.pack_chunk({c: v[start : start + chunk_rows] for c, v in samples.items()})], dtype=object
            ),
            chunks.LAST_CHUNK: np.array([index == len(starts) - 1]),
            chunks.SHARD_ROWS: np.array([num_rows if index == len(starts) - 1 else -1]),
            chunks.SHARD_SKIPPED: np.array([json.dumps({"corrupt_image": 2}) if index == len(starts) - 1 else ""]),
        }
        for index, start in enumerate(starts)
    ]


def test_the_writer_writes_the_same_bytes_whatever_order_chunks_arrive_in(tmp_path):
    manifest = make_manifest()
    stream = _stream_chunks(manifest, num_rows=10, chunk_rows=3)
    written = {}
    for name, order in (("in_order", [0, 1, 2, 3]), ("last_first", [3, 1, 0, 2])):
        out = tmp_path / name
        writer = chunks.WriteShards(str(out), manifest, "fingerprint", {"part.parquet": "source.tar"})
        done = [writer(stream[i]) for i in order]
        assert [list(d["shard"]) for d in done] == [[], [], [], ["part.parquet"]]  # complete only with all chunks
        assert int(done[-1]["num_rows"][0]) == 10
        written[name] = (out / "part.parquet").read_bytes()
    assert written["in_order"] == written["last_first"]
    table = records.read_shard(str(tmp_path / "in_order" / "part.parquet"))
    assert table.column(records.KEY).to_pylist() == [f"k{i}" for i in range(10)]
    assert chunks.read_shard_metadata(table.schema)["skipped"] == {"corrupt_image": 2}


def test_the_writer_streams_row_groups_spills_chunks_ahead_of_their_turn_and_routes_by_shard(tmp_path):
    """Each in-order chunk is a row group on disk at once; a chunk ahead of its turn waits on disk when the memory
    buffer is full; and two shards routed over three writers give the bytes one writer gives."""
    import pyarrow.parquet as pq

    manifest = make_manifest()
    stream = _stream_chunks(manifest, num_rows=10, chunk_rows=3)
    reference = tmp_path / "reference"
    chunks.WriteShards(str(reference), manifest, "fingerprint", {"part.parquet": "source.tar"})(
        {c: np.concatenate([chunk[c] for chunk in stream]) for c in stream[0]}
    )
    assert pq.ParquetFile(reference / "part.parquet").metadata.num_row_groups == len(stream)  # one per chunk

    out = tmp_path / "spilled"
    writer = chunks.WriteShards(str(out), manifest, "fingerprint", {"part.parquet": "source.tar"}, buffer_bytes=0)
    for i in (2, 0, 3):
        writer(stream[i])
    assert len(writer.open["part.parquet"].waiting) == 2 and writer.buffered == 0  # chunks 2 and 3 on disk
    spilled = os.listdir(writer._spill_dir)
    assert len(spilled) == 2 and writer.open["part.parquet"].file.num_rows == 3  # chunk 0 written already
    assert list(writer(stream[1])["shard"]) == ["part.parquet"]
    assert os.listdir(writer._spill_dir) == [] and writer.open == {}
    writer.close()
    assert (out / "part.parquet").read_bytes() == (reference / "part.parquet").read_bytes()

    names = {"a.parquet": "a.tar", "e.parquet": "e.tar"}
    assert chunks.writer_of("a.parquet", 3) != chunks.writer_of("e.parquet", 3)  # so the routing is exercised
    routed = tmp_path / "routed"
    route = chunks.RouteChunks([chunks.WriteShards(str(routed), manifest, "fingerprint", names) for _ in range(3)])
    landed = []
    for i in (1, 3, 0, 2):
        for name in names:
            batch = dict(stream[i], **{chunks.SHARD: np.array([name], dtype=object)})
            landed += list(route(batch)["shard"])
    assert sorted(landed) == sorted(names)
    for name in names:  # only the source in the footer differs from the reference
        got, want = records.read_shard(str(routed / name)), records.read_shard(str(reference / "part.parquet"))
        assert got.replace_schema_metadata() == want.replace_schema_metadata()
        assert chunks.read_shard_metadata(records.read_shard_footer(str(routed / name))[1])["source"] == names[name]


def test_a_writer_error_discards_the_shard_and_drops_its_later_chunks(tmp_path, monkeypatch):
    manifest = make_manifest()
    stream = _stream_chunks(manifest, num_rows=10, chunk_rows=3)
    out = tmp_path / "out"
    writer = chunks.WriteShards(str(out), manifest, "fingerprint", {"part.parquet": "source.tar"})
    writer(stream[0])
    writer(stream[3])
    original = records.build_table
    monkeypatch.setattr(records, "build_table", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer(stream[1])
    monkeypatch.setattr(records, "build_table", original)
    assert writer(stream[2])["shard"].size == 0 and writer.open == {} and writer.buffered == 0
    assert os.listdir(out) == []  # not even the hidden temporary file
    writer.close()


def test_a_streamed_shard_aborted_leaves_nothing_and_committed_carries_its_footer_metadata(tmp_path):
    manifest = make_manifest()
    table = records.build_table(make_columns(manifest, 3), manifest)
    aborted = records.ShardStreamWriter(str(tmp_path / "a.parquet"), manifest.schema())
    aborted.write(table)
    aborted.abort()
    assert os.listdir(tmp_path) == []
    done = records.ShardStreamWriter(str(tmp_path / "b.parquet"), manifest.schema())
    done.write(table)
    done.write(table)
    assert os.listdir(tmp_path) != ["b.parquet"]  # nothing under the final name before the commit
    done.commit({b"clipdr.test": b"yes"})
    num_rows, schema = records.read_shard_footer(str(tmp_path / "b.parquet"))
    assert num_rows == 6 and schema.metadata[b"clipdr.test"] == b"yes"
    assert records.read_shard(str(tmp_path / "b.parquet")).num_rows == 6


def test_the_read_stage_holds_encoded_samples_not_decoded_images(tmp_path, monkeypatch):
    """Chunks keep encoded bytes only: within max_pixels a 260 KB PNG decodes to 192 MiB, and two chunks of decoded
    images (64 samples each by default) killed workers for memory."""
    image = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(image, "PNG")
    samples = [sources.SourceSample(f"{i:03d}", image.getvalue(), "a red box", image_ext="png") for i in range(40)]
    sources.write_webdataset_shard(str(tmp_path / "s.tar"), samples)
    read = stages.ReadShards(8, str(tmp_path / "out"), make_manifest(), "fingerprint")
    decoded, original = [], sources.iter_shard

    def iter_shard(*args, **kwargs):
        for sample in original(*args, **kwargs):
            decoded.append(weakref.ref(sample.image))
            yield sample

    monkeypatch.setattr(stages.sources, "iter_shard", iter_shard)
    alive, keys = [], []
    for row in read.read(chunks.ShardTask(str(tmp_path / "s.tar"), "s.parquet")):
        alive.append(sum(image() is not None for image in decoded))
        chunk = chunks.unpack_chunk(row[chunks.CHUNK])
        keys += list(chunk[records.KEY])
        assert chunk[records.AUG_PARAMS].shape[0] == len(chunk[records.KEY])

    assert keys == [s.key for s in samples]
    assert max(alive) <= 2, alive  # was 16: two chunks of 8 decoded images


def test_a_chunk_closes_early_at_its_pixel_budget(tmp_path):
    """The model stages decode a chunk at once: ``chunk_rows`` PNGs of ``max_pixels`` each could hold 12 GiB."""
    image = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(image, "PNG")  # 3,072 pixels
    samples = [sources.SourceSample(f"{i:03d}", image.getvalue(), "a red box", image_ext="png") for i in range(6)]
    sources.write_webdataset_shard(str(tmp_path / "s.tar"), samples)
    task = chunks.ShardTask(str(tmp_path / "s.tar"), "s.parquet")

    def chunk_sizes(**kwargs) -> list[int]:
        read = stages.ReadShards(4, str(tmp_path / "out"), make_manifest(), "fingerprint", **kwargs)
        return [len(chunks.unpack_chunk(row[chunks.CHUNK])[records.KEY]) for row in read.read(task)]

    assert chunk_sizes() == [4, 2]
    assert chunk_sizes(chunk_max_pixels=3 * 3072) == [3, 3]
    assert chunk_sizes(chunk_max_pixels=100) == [1] * 6  # one image over the budget still makes a chunk


def test_a_shard_the_storage_fails_to_read_raises_and_writes_nothing(tmp_path, monkeypatch):
    """A transient storage error that persists is no skip: ReadShards raises, so no output shard (empty or partial)
    carries it and a rerun redoes the shard. Before, the shard was written empty with ``broken_tar: 1``."""
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0")
    manifest = make_manifest()
    read = stages.ReadShards(2, str(tmp_path / "out"), manifest, "fingerprint")
    os.symlink("/proc/self/mem", tmp_path / "eio.tar")  # reading it fails with the kernel's EIO
    with pytest.raises(sources.ShardReadError, match=r"eio\.tar.*Errno 5"):
        list(read.read(chunks.ShardTask(str(tmp_path / "eio.tar"), "eio.parquet")))

    # A break part-way: the chunks before it went down the stream, but none is the last, so the writer never
    # completes the shard.
    shard = str(tmp_path / "s.tar")
    sources.write_webdataset_shard(shard, _samples(12, size=32))
    reset = FlakyFileSystem(lambda: ConnectionResetError(104, "reset"), read_failures=math.inf, fail_at=40_000)
    monkeypatch.setattr(storage, "resolve", lambda uri: (reset, uri))
    monkeypatch.setattr(sources, "_READ_BUFFER_BYTES", 4096)
    rows = []
    with pytest.raises(sources.ShardReadError, match="reset"):
        rows.extend(read.read(chunks.ShardTask(shard, "s.parquet")))
    assert rows and not any(row[chunks.LAST_CHUNK] for row in rows)
    assert not (tmp_path / "out").exists()


def _embed_input(tmp_path, teachers, num_samples: int = 5) -> tuple[list, records.Manifest, dict[str, np.ndarray]]:
    """A loaded ensemble, its manifest (K views, no captioner) and the one chunk row ReadShards makes of a shard."""
    from clipdr.models.teachers import TeacherEnsemble

    ensemble = TeacherEnsemble(teachers)
    manifest = make_manifest(teachers=ensemble.specs, num_syn_captions=0)
    sources.write_webdataset_shard(str(tmp_path / "s.tar"), _samples(num_samples, size=40))
    read = stages.ReadShards(num_samples, str(tmp_path / "out"), manifest, "fingerprint")
    (row,) = read.read(chunks.ShardTask(str(tmp_path / "s.tar"), "s.parquet"))
    return ensemble, manifest, stages._stream_row(row)


def test_views_render_once_per_teacher_render_and_embed_like_trainings_replay(tmp_path):
    """The CPU stage renders one uint8 view set per (size, interpolation), not per teacher; the model stage's
    embeddings equal a forward of `augment.replay`'s float views (what training replays), bit for bit."""
    import torch

    from clipdr.config import TeacherConfig

    teachers = (
        TeacherConfig(name="vit", model="clipdr-tiny-vit"),  # 32 px bicubic, OpenAI mean/std
        TeacherConfig(name="mci", model="clipdr-tiny-mci"),  # 64 px bilinear, no normalisation
        TeacherConfig(name="sim", model="clipdr-sim-accel-32@100000"),  # shares the ViT's render
    )
    ensemble, manifest, batch = _embed_input(tmp_path, teachers)
    rendered = chunks.unpack_chunk(stages.RenderViews(manifest.teachers)(batch)[chunks.CHUNK][0])
    view_columns = sorted(c for c in rendered if c.startswith(stages.VIEWS_PREFIX))
    assert view_columns == ["_views_32_bicubic", "_views_64_bilinear"]
    assert rendered["_views_64_bilinear"].dtype == np.uint8 and rendered["_views_64_bilinear"].shape[1:] == (
        K,
        3,
        64,
        64,
    )

    embedded = chunks.unpack_chunk(stages.Embed(teachers, "cpu", 1)(batch)[chunks.CHUNK][0])
    assert not any(c.startswith(stages.VIEWS_PREFIX) for c in embedded)  # views never reach the writer
    images = [sources.decode_rgb(bytes(b)) for b in rendered[records.IMAGE]]
    views = [augparams.views_from_array(v) for v in rendered[records.AUG_PARAMS]]
    for teacher in ensemble.teachers:
        s = teacher.spec
        replayed_BCHW = torch.stack(
            [
                augment.replay(im, p, s.image_size, s.mean, s.std, s.interpolation)
                for im, vs in zip(images, views, strict=True)
                for p in vs
            ]
        )
        with torch.inference_mode():
            direct_BD = torch.nn.functional.normalize(teacher.model.encode_image(replayed_BCHW).float(), dim=-1)
        direct_NKD = direct_BD.reshape(len(images), K, -1).numpy().astype(np.float16)
        assert np.array_equal(embedded[records.image_emb_column(s.name)], direct_NKD), s.name


def test_a_bf16_teacher_runs_in_bf16_and_stays_within_bf16_rounding_of_auto(tmp_path):
    """``precision = "bf16"``: the teacher's weights are bf16 (no autocast casts on a GPU), the embeddings it
    stores differ from ``auto``'s (fp32 here) by bf16 rounding only, and its spec records it."""
    import torch

    from clipdr.config import TeacherConfig

    auto = (TeacherConfig(name="vit", model="clipdr-tiny-vit"),)
    bf16 = (TeacherConfig(name="vit", model="clipdr-tiny-vit", precision="bf16"),)
    _, manifest, batch = _embed_input(tmp_path, auto)
    rendered = stages.RenderViews(manifest.teachers)(batch)
    stage = stages.Embed(bf16, "cpu", 1)
    (teacher,) = stage.ensemble.teachers
    assert teacher.spec.precision == "bf16" and {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    got = chunks.unpack_chunk(stage(_copy(rendered))[chunks.CHUNK][0])
    want = chunks.unpack_chunk(stages.Embed(auto, "cpu", 1)(_copy(rendered))[chunks.CHUNK][0])
    for column in (records.image_emb_column("vit"), records.text_emb_column("vit")):
        a, b = got[column].astype(np.float32), want[column].astype(np.float32)
        assert a.dtype == b.dtype and not np.array_equal(a, b), column  # another rounding, so recorded
        # bf16 keeps 8 significant bits (u = 2^-8): each of the tiny tower's few matmul/norm layers rounds its output
        # once, so the unit-length embedding stays within a few u of fp32's (fp16 storage adds 2^-11).
        np.testing.assert_allclose(a, b, rtol=0, atol=8 * 2.0**-8, err_msg=column)


def test_the_simulated_accelerator_runs_through_the_stages_and_accounts_its_busy_time(tmp_path, monkeypatch):
    from clipdr.config import TeacherConfig
    from clipdr.models import sim_accel

    monkeypatch.setenv(sim_accel.TRACE_DIR_ENV, str(tmp_path))
    teachers = (TeacherConfig(name="sim", model="clipdr-sim-accel-16@2000"),)
    _, manifest, batch = _embed_input(tmp_path, teachers, num_samples=6)
    rendered = stages.RenderViews(manifest.teachers)(batch)
    stage = stages.Embed(teachers, "cpu", 1)
    out = chunks.unpack_chunk(stage(rendered)[chunks.CHUNK][0])
    in_actor = chunks.unpack_chunk(stages.Embed(teachers, "cpu", 1, render_in_actor=True)(batch)[chunks.CHUNK][0])

    emb_NKD = out[records.image_emb_column("sim")]
    assert emb_NKD.shape == (6, K, sim_accel.EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(emb_NKD.astype(np.float32), axis=-1), 1.0, atol=2e-3)  # fp16 rounding
    assert np.array_equal(emb_NKD, in_actor[records.image_emb_column("sim")])  # either design, the same output
    (device,) = sim_accel.read_traces(tmp_path).values()  # one process: both Embed stages' models, in start order
    assert [f.views for f in device] == [6 * K, 0, 6 * K, 0]  # an image and a text forward a chunk
    assert all(f.end - f.start >= f.views / 2000 for f in device)  # took its views' time
    assert all(f.end - f.start >= f.work_s for f in device)  # or its work's, if longer
    intervals = stage.ensemble.teachers[0].model.busy
    assert intervals == [(pytest.approx(f.start, abs=1e-5), pytest.approx(f.end, abs=1e-5)) for f in device[:2]]
    assert sim_accel.busy_fraction(intervals[:1]) == 1.0  # one forward: busy all its wall time
    assert sim_accel.busy_fraction([(0.0, 1.0), (3.0, 4.0)]) == pytest.approx(0.5)
    assert sim_accel.busy_fraction([]) == 0.0
    with pytest.raises(ValueError, match="clipdr-sim-accel-<size px>"):
        sim_accel.parse("clipdr-sim-accel-x")


def _rendered_chunks(tmp_path, teachers, num_samples: int, chunk_rows: int) -> list[dict[str, np.ndarray]]:
    """The rendered chunk rows of one shard, as the teacher stage receives them."""
    manifest = make_manifest(teachers=tuple(_spec(t) for t in teachers), num_syn_captions=0)
    sources.write_webdataset_shard(str(tmp_path / "s.tar"), _samples(num_samples, size=40))
    read = stages.ReadShards(chunk_rows, str(tmp_path / "out"), manifest, "fingerprint")
    render = stages.RenderViews(manifest.teachers)
    return [render(stages._stream_row(row)) for row in read.read(chunks.ShardTask(str(tmp_path / "s.tar"), "s"))]


def _spec(teacher):
    from clipdr.models.teachers import teacher_spec

    return teacher_spec(teacher)


def _copy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: values.copy() for name, values in batch.items()}


def test_two_calls_at_once_return_their_own_chunks_with_serial_forwards_and_a_failure_stays_its_own(
    tmp_path, monkeypatch
):
    """The teacher actor's two-deep pipeline (two chunks in flight, a thread each, `pipeline.TEACHER_CALLS`): every
    call returns its own chunk, byte for byte what one call at a time returns; the device's forwards never overlap;
    a forward that fails raises in its own call only, leaves no forward traced, and frees the device."""
    from concurrent.futures import ThreadPoolExecutor

    from clipdr.config import TeacherConfig
    from clipdr.models import sim_accel

    monkeypatch.setenv(sim_accel.TRACE_DIR_ENV, str(tmp_path))
    teachers = tuple(TeacherConfig(name=f"sim{i}", model="clipdr-sim-accel-16@400") for i in range(2))  # 20 ms a view
    stream = _rendered_chunks(tmp_path, teachers, num_samples=7, chunk_rows=2)  # 2, 2, 2, 1 samples
    stage = stages.Embed(teachers, "cpu", 1)
    model = stage.ensemble.teachers[1].model
    encode_image = model.encode_image

    def fail_on_the_short_chunk(images_BCHW):
        if len(images_BCHW) == K:  # the 1-sample chunk: a device fault inside the forward
            raise RuntimeError("device fault")
        return encode_image(images_BCHW)

    monkeypatch.setattr(model, "encode_image", fail_on_the_short_chunk)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stage, _copy(chunk)) for chunk in stream]
    with pytest.raises(RuntimeError, match="device fault"):
        futures[-1].result()
    assert not stage.ensemble.device_lock.locked()
    (device,) = sim_accel.read_traces(tmp_path).values()
    # 3 chunks x 2 teachers, and the first teacher's forward of the chunk that failed in the second's
    assert sorted(f.views for f in device if f.views) == [K] + [2 * K] * 6
    assert all(a.end <= b.start for a, b in itertools.pairwise(device))  # one forward at a time

    monkeypatch.delenv(sim_accel.TRACE_DIR_ENV)
    fast = tuple(dataclasses.replace(t, model="clipdr-sim-accel-16@1000000") for t in teachers)  # same projection
    serial = stages.Embed(fast, "cpu", 1)
    for chunk, future in zip(stream[:-1], futures[:-1], strict=True):
        got, want = future.result(), serial(_copy(chunk))
        assert list(got) == list(want) and got[chunks.CHUNK_INDEX][0] == chunk[chunks.CHUNK_INDEX][0]
        assert got[chunks.CHUNK][0] == want[chunks.CHUNK][0]  # its own samples, the same bytes


def test_the_next_chunk_is_staged_while_the_device_runs_the_current_one(tmp_path, monkeypatch):
    """While one call holds the device, the other call's host work (unpacking, staging its views) runs: it does not
    wait for the forward to end."""
    import threading
    import time

    from clipdr.config import TeacherConfig
    from clipdr.models import sim_accel, teachers

    monkeypatch.setenv(sim_accel.TRACE_DIR_ENV, str(tmp_path))
    config = (TeacherConfig(name="sim", model=f"clipdr-sim-accel-16@{2 * K}"),)  # 1 s a forward of 2 samples
    first, second = _rendered_chunks(tmp_path, config, num_samples=4, chunk_rows=2)
    stage = stages.Embed(config, "cpu", 1)
    staged_at: list[tuple[float, int]] = []  # when a call's views were on the device, and forwards done by then
    stage_views = teachers.stage_views

    def recording(views_NKCHW, device):
        staged = stage_views(views_NKCHW, device)
        staged_at.append((time.time(), len(stage.ensemble.teachers[0].model.busy)))
        return staged

    monkeypatch.setattr(teachers, "stage_views", recording)
    running = threading.Thread(target=stage, args=(first,))
    running.start()
    deadline = time.time() + 30
    while not stage.ensemble.device_lock.locked() and time.time() < deadline:
        time.sleep(0.005)
    assert stage.ensemble.device_lock.locked(), "the first call never reached the device"
    stage(second)
    running.join()
    (forward_1, _, forward_2, _) = sim_accel.read_traces(tmp_path).popitem()[1]  # image and text forwards
    second_staged, forwards_done = staged_at[1]
    assert forwards_done == 0 and forward_1.start < second_staged < forward_1.end  # during the first forward
    assert forward_2.start >= forward_1.end


def test_an_embeddings_only_pass_writes_shards_without_synthetic_captions(tmp_path):
    """S = 0, no Caption stage: the teacher stage embeds the real caption only (1 + S = 1 text row) and the writer
    writes a shard without the syn_captions column that opens as a dataset."""
    from clipdr.config import TeacherConfig

    teachers = (TeacherConfig(name="vit", model="clipdr-tiny-vit"),)
    _, manifest, batch = _embed_input(tmp_path, teachers, num_samples=3)
    batch = stages.RenderViews(manifest.teachers)(batch)
    embedded = stages.Embed(teachers, "cpu", 1)(batch)
    writer = chunks.WriteShards(str(tmp_path / "out"), manifest, "fingerprint", {"s.parquet": "s.tar"})
    assert list(writer(embedded)["shard"]) == ["s.parquet"]
    final = records.write_manifest(
        str(tmp_path / "out"), dataclasses.replace(manifest, shards=(records.ShardInfo("s.parquet", 3),))
    )
    dataset = records.open_dataset(str(tmp_path / "out"), require_teachers=["vit"])
    table = records.read_shard(dataset.shard_uris[0])
    assert records.SYN_CAPTIONS not in table.column_names and final.endswith(records.MANIFEST_NAME)
    assert records.text_embeddings(table, "vit").shape == (3, 1, manifest.teacher("vit").embed_dim)
