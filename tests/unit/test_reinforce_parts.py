"""Part passes (`reinforce.add`) without Ray: the stages a pass wires, run one after the other in this process.

The base datasets are made the same way, from the base job's own stages, with tiny random-init teachers and a tiny
CoCa (seeded by name, so the same in every run). The Ray wiring of the same stages runs in
tests/integration/test_train.py (the documented command, then a training on the added set).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import pathlib

import numpy as np
import pytest

from clipdr import models, records
from clipdr.config import CaptionerConfig, Config, ReinforceConfig, ReinforceResources, TeacherConfig
from clipdr.data import sources
from clipdr.models.captioners import TINY_COCA
from clipdr.reinforce import chunks, parts, stages
from clipdr.reinforce import run as reinforce_run
from clipdr.reinforce.run import ReinforceError
from tests.unit.test_sources import _samples

VIT = TeacherConfig(name="vit", model="clipdr-tiny-vit", logit_scale=100.0)
MCI = TeacherConfig(name="mci", model="clipdr-tiny-mci", logit_scale=70.0)
ROWS = (5, 0, 3)  # an empty source shard too: its part file is written by the read stage


def _config(root: pathlib.Path, output: str, teachers=(VIT,), **changes) -> Config:
    settings = {
        "source": str(root / "source"),
        "output": str(root / output),
        "num_augmentations": 2,
        "num_syn_captions": 2,
        "seed": 3,
        "teachers": teachers,
        "captioner": CaptionerConfig(model=TINY_COCA, pretrained="", max_len=6),
        "resources": ReinforceResources(batch_size=2, device="cpu"),  # chunks of 2: several a shard
    }
    return Config(reinforce=ReinforceConfig(**(settings | changes)))


def _source(root: pathlib.Path) -> None:
    for shard, num_rows in enumerate(ROWS):
        samples = [dataclasses.replace(s, key=f"s{shard}-{s.key}") for s in _samples(num_rows, size=24)]
        sources.write_webdataset_shard(str(root / "source" / f"{shard:05d}.tar"), samples)


@pytest.fixture(scope="module", autouse=True)
def _tokenizers_built_once():
    """Each tiny teacher builds open_clip's BPE tokenizer (~2 s on a loaded core); the stages of one test module build
    the same two many times over. A tokenizer is a pure function of its name."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "get_tokenizer", functools.cache(models.get_tokenizer))
        yield


@functools.cache
def _stage(cls, *args):
    """One model stage a configuration for the module (its models are random-init, seeded by name: the same)."""
    return cls(*args)


def _drain(rows, *steps) -> None:
    for row in rows:
        batch = stages._stream_row(row)
        for step in steps:
            batch = step(batch)


def reinforce_in_process(config: Config) -> records.Manifest:
    """The base job's stages in order (`pipeline.run_pipeline` without Ray), then its manifest."""
    cfg = config.reinforce
    p = reinforce_run.plan(config)
    read = stages.ReadShards(cfg.resources.batch_size, cfg.output, p.manifest, p.fingerprint)
    caption = _stage(stages.Caption, p.manifest.captioner, cfg.num_syn_captions, "cpu", 1)
    embed = _stage(stages.Embed, cfg.teachers, "cpu", 1)
    write = chunks.WriteShards(cfg.output, p.manifest, p.fingerprint, {t.output: t.source for t in p.tasks})
    for task in p.pending:
        _drain(read.read(task), caption, stages.RenderViews(p.manifest.teachers), embed, write)
    return reinforce_run._finish_manifest(cfg.output, p)


def add_in_process(config: Config, only: int | None = None) -> records.Manifest | None:
    """A part pass's stages in order (`pipeline.run_part_pipeline` without Ray); ``only``: write that many part files
    and stop before the manifest, as a pass killed midway."""
    cfg = config.reinforce
    p = parts.plan(config)
    if p.complete:
        return p.manifest
    part = p.part
    read = stages.ReadBase(cfg.resources.batch_size, cfg.output, p.layout, p.fingerprint, p.columns)
    if part.kind == "captions":
        first = _stage(stages.Caption, part.captioner, part.num_syn_captions, "cpu", 1)
        caption_sets = (part.caption_set,)
    else:
        first = stages.RenderViews((part.teacher,))
        caption_sets = part.caption_sets
    embed = _stage(stages.EmbedPart, p.teachers, "cpu", 1, part.kind, caption_sets)
    write = chunks.WriteShards(read.output_dir, p.layout, p.fingerprint, {t.output: t.source for t in p.tasks})
    for task in p.pending[:only]:
        _drain(read.read(task.output), first, embed, write)
    return None if only is not None else parts._finish(cfg.output, p)


def digests(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != records.MANIFEST_NAME and not p.name.startswith("_")
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("parts")
    _source(root)
    reinforce_in_process(_config(root, "base"))
    return root


def _copy(base: pathlib.Path, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    import shutil

    shutil.copytree(base / "base", tmp_path / name)
    (tmp_path / "source").symlink_to(base / "source")
    return tmp_path


def test_a_caption_set_is_added_exactly_once_resumably_and_rewriting_nothing(base, tmp_path):
    root = _copy(base, tmp_path, "data")
    before = digests(root / "data")
    beam = _config(root, "data", add="captions", caption_set="beam", num_syn_captions=3)
    beam = dataclasses.replace(
        beam,
        reinforce=dataclasses.replace(
            beam.reinforce, captioner=CaptionerConfig(model=TINY_COCA, pretrained="", max_len=6, top_p=0.5)
        ),
    )

    assert add_in_process(beam, only=1) is None  # killed after one part file: nothing is listed
    with pytest.warns(records.RecordsWarning, match=r"parts its manifest does not list \(captions__beam\)"):
        assert records.open_dataset(str(root / "data")).manifest.parts == ()
    first = root / "data" / records.part_file("captions__beam", "00000.parquet")
    first_bytes = first.read_bytes()
    p = parts.plan(beam)
    assert p.done == ("00000.parquet",) and [t.output for t in p.pending] == ["00001.parquet", "00002.parquet"]

    manifest = add_in_process(beam)
    assert first.read_bytes() == first_bytes  # kept, not redone
    assert digests(root / "data") == before | {
        k: v for k, v in digests(root / "data").items() if k.startswith(records.PARTS_DIR)
    }  # every base file byte-identical
    part = manifest.part("captions__beam")
    assert (part.caption_set, part.num_syn_captions, part.teachers) == ("beam", 3, ("vit",))
    assert part.captioner.top_p == 0.5 and manifest.caption_sets == {"default": 2, "beam": 3}
    dataset = records.open_dataset(str(root / "data"))
    keys = []
    for shard in manifest.shards:
        table = records.read_shard_with_parts(
            str(root / "data"), manifest, shard.path, [records.KEY, "syn_captions__beam", "text_emb__vit__beam"]
        )
        keys += table.column(records.KEY).to_pylist()
        assert all(len(c) == 3 and all(c) for c in table.column("syn_captions__beam").to_pylist())
        emb_NSD = records.fixed_shape_numpy(table.column("text_emb__vit__beam")).astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(emb_NSD, axis=-1), 1.0, atol=records.NORM_TOLERANCE)
    assert sorted(keys) == sorted(collections.Counter(keys)) and len(keys) == sum(ROWS) == dataset.num_rows

    # Done: a rerun does nothing; the same name with other settings, or a second default set, is refused.
    assert parts.plan(beam).complete
    other = dataclasses.replace(beam, reinforce=dataclasses.replace(beam.reinforce, num_syn_captions=2))
    with pytest.raises(ReinforceError, match="has part 'captions__beam' already, made with other settings"):
        parts.plan(other)
    default = dataclasses.replace(beam, reinforce=dataclasses.replace(beam.reinforce, caption_set="default"))
    with pytest.raises(ReinforceError, match="names the base shards' own captions"):
        parts.plan(default)


def test_an_added_teacher_writes_what_a_run_with_both_teachers_writes(base, tmp_path):
    root = _copy(base, tmp_path, "data")
    add_in_process(_config(root, "data", add="captions", caption_set="beam", num_syn_captions=2))
    before = digests(root / "data")

    lacking = _config(root, "data", teachers=(VIT,), add="teacher")
    with pytest.raises(
        ReinforceError, match=r"adds the one teacher of reinforce.teachers the dataset lacks; it lacks \[\]"
    ):
        parts.plan(lacking)
    manifest = add_in_process(_config(root, "data", teachers=(VIT, MCI), add="teacher"))
    assert digests(root / "data") == before | {
        k: v for k, v in digests(root / "data").items() if k.startswith(f"{records.PARTS_DIR}/teacher__mci")
    }
    part = manifest.part("teacher__mci")
    assert part.caption_sets == ("beam",) and manifest.teacher_names == ("vit", "mci")
    assert manifest.teacher("mci").logit_scale == 70.0

    both = reinforce_in_process(_config(root, "both", teachers=(VIT, MCI)))
    columns = [records.KEY, "image_emb__mci", "text_emb__mci"]
    for shard in manifest.shards:
        added = records.read_shard_with_parts(str(root / "data"), manifest, shard.path, columns)
        scratch = records.read_shard(str(root / "both" / shard.path))  # view-major: its rows stacked by `stacked`
        for column in columns[1:]:
            assert np.array_equal(records.fixed_shape_numpy(added.column(column)), records.stacked(scratch, column)), (
                shard.path,
                column,
            )
        assert added.column(records.KEY).to_pylist() == scratch.column(records.KEY).to_pylist()
    assert both.teacher_names == manifest.teacher_names

    table = records.read_shard_with_parts(str(root / "data"), manifest, "00000.parquet", ["text_emb__mci__beam"])
    assert records.fixed_shape_numpy(table.column(0)).shape == (ROWS[0], 2, manifest.teacher("mci").embed_dim)
    # A caption set added after the teacher is embedded by it too: its pass needs every teacher of the dataset.
    with pytest.raises(ReinforceError, match=r"lacks the dataset's teachers \['mci'\]"):
        parts.plan(_config(root, "data", add="captions", caption_set="long"))
