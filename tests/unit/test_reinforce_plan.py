"""The reinforcement job refuses bad configs before loading a model or starting Ray."""

import dataclasses
import sys
import types

import pytest

from clipdr.config import (
    CaptionerConfig,
    Config,
    ReinforceConfig,
    ReinforceResources,
    SynthConfig,
    TeacherConfig,
    load_config,
)
from clipdr.data import synthetic
from clipdr.reinforce.run import ReinforceError, plan

TINY = TeacherConfig(name="vit", model="clipdr-tiny-vit")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthetic.generate(
        SynthConfig(output=str(out), num_teacher=0, num_student=10, num_zeroshot=0, num_retrieval=0, shard_size=5)
    )
    return str(out / "student")


def config(source_dir, tmp_path, **changes) -> Config:
    base = ReinforceConfig(
        source=source_dir,
        output=str(tmp_path / "out"),
        num_augmentations=2,
        num_syn_captions=1,
        teachers=(TINY,),
        captioner=CaptionerConfig(model="clipdr-tiny-coca", pretrained=""),
    )
    return Config(reinforce=dataclasses.replace(base, **changes))


def test_valid_plan_lists_every_shard(source, tmp_path):
    p = plan(config(source, tmp_path))
    assert [t.output for t in p.pending] == ["student-00000.parquet", "student-00001.parquet"]
    assert p.manifest.embedding_bytes_per_sample == (2 + 1 + 1) * 64 * 2
    assert not (tmp_path / "out" / "_write_probe").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_augmentations": 0}, r"reinforce.num_augmentations \(K=0\) must be >= 1"),
        ({"num_syn_captions": -1}, r"reinforce.num_syn_captions \(S=-1\) must be >= 0"),
        ({"teachers": ()}, r"reinforce.teachers is empty"),
        ({"teachers": (TINY, TINY)}, r"duplicate names \['vit', 'vit'\]"),
        ({"teachers": (TeacherConfig(name="x", model="ViT-Nope"),)}, r"unknown model 'ViT-Nope'"),
        ({"teachers": (TeacherConfig(name="Bad-Name", model="clipdr-tiny-vit"),)}, r"teacher name"),
        (
            {"teachers": (TeacherConfig(name="l", model="ViT-L-14", pretrained="nope"),)},
            r"neither a file nor an open_clip tag",
        ),
        (
            {"captioner": CaptionerConfig(kind="gpt", model="clipdr-tiny-coca", pretrained="")},
            r"unknown captioner kind 'gpt'",
        ),
        ({"source": "/does/not/exist"}, r"reinforce.source: source '/does/not/exist' does not exist"),
        ({"output": "/proc/clipdr-out"}, r"reinforce.output '/proc/clipdr-out' is not writable"),
        (
            {"resources": ReinforceResources(teacher_actors=3, teacher_actors_max=2)},
            r"teacher_actors_max \(2\) is below teacher_actors \(3\)",
        ),
        ({"resources": ReinforceResources(writers=0)}, r"batch_size, actor counts and writers must be >= 1"),
    ],
)
def test_bad_configs_fail_fast_naming_the_problem(source, tmp_path, changes, message):
    with pytest.raises(ReinforceError, match=message):
        plan(config(source, tmp_path, **changes))


def test_an_embeddings_only_pass_has_no_captioner_and_resumes_like_any_other(source, tmp_path):
    """S = 0: no captioner is validated (a kind that does not exist passes), recorded or loaded; shards written with
    the same settings count as done, whichever a_k the teachers had (a training choice, not stored data), and so do
    shards carrying the fingerprint spelling of before that decision."""
    from clipdr import records
    from clipdr.reinforce import run as run_module
    from clipdr.reinforce.chunks import shard_metadata, write_output_shard
    from tests.unit.test_records import make_columns

    bogus = CaptionerConfig(kind="gpt", model="nope", pretrained="")
    cfg = config(source, tmp_path, num_syn_captions=0, captioner=bogus)
    p = plan(cfg)
    assert p.manifest.num_syn_captions == 0 and p.manifest.captioner is None
    assert "captioner     none" in p.describe()
    assert p.manifest.schema().names.count(records.SYN_CAPTIONS) == 0

    other_scale = dataclasses.replace(TINY, logit_scale=55.0)
    p_other = plan(config(source, tmp_path, num_syn_captions=0, captioner=bogus, teachers=(other_scale,)))
    assert p_other.fingerprint == p.fingerprint  # a_k is not part of what the shards are
    assert run_module.run_fingerprint(p_other.manifest, legacy=True) != run_module.run_fingerprint(
        p.manifest, legacy=True
    )
    first, second = (t.output for t in p.tasks)
    for name, fingerprint in ((first, p.fingerprint), (second, run_module.run_fingerprint(p.manifest, legacy=True))):
        columns = make_columns(p.manifest, 3, prefix=name)
        write_output_shard(cfg.reinforce.output, name, columns, p.manifest, shard_metadata(fingerprint, "src", {}))
    assert plan(cfg).done == (first, second) and not plan(cfg).pending
    shards = tuple(records.ShardInfo(name, 3) for name in (first, second))
    records.write_manifest(cfg.reinforce.output, dataclasses.replace(p.manifest, shards=shards))
    other = config(source, tmp_path, num_syn_captions=0, captioner=bogus, teachers=(other_scale,))
    assert plan(other).complete  # a complete dataset made with another a_k: nothing to redo
    with_captions = config(source, tmp_path, num_syn_captions=1)
    with pytest.raises(ReinforceError, match="made with other settings"):
        plan(with_captions)


def test_a_teachers_precision_is_recorded_and_a_dataset_of_another_is_not_continued(source, tmp_path):
    from clipdr import records

    bf16 = dataclasses.replace(TINY, precision="bf16")
    p = plan(config(source, tmp_path, teachers=(bf16,)))
    assert p.manifest.teacher("vit").precision == "bf16" and p.fingerprint != plan(config(source, tmp_path)).fingerprint
    out = tmp_path / "out"
    shards = tuple(records.ShardInfo(t.output, 0) for t in p.tasks)
    auto = plan(config(source, tmp_path))
    records.write_manifest(str(out), dataclasses.replace(auto.manifest, shards=shards), verify=False)
    with pytest.raises(ReinforceError, match=r"made with other settings \(teachers\)"):
        plan(config(source, tmp_path, teachers=(bf16,)))


def test_bad_augment_config_is_refused(source, tmp_path):
    cfg = dataclasses.replace(config(source, tmp_path), augment=load_config(None, ["augment.scale=[0.9, 0.1]"]).augment)
    with pytest.raises(ReinforceError, match=r"augment\.scale"):
        plan(cfg)


@pytest.mark.parametrize("recipe", ["datacompdr12m", "mobileclip2_reinforce"])
def test_real_recipes_validate_offline_in_a_dry_run(recipe):
    p = plan(load_config(f"jobs/configs/{recipe}.toml", ["reinforce.dry_run=true"]))
    assert p.manifest.num_augmentations == 30 and p.manifest.num_syn_captions == 5
    assert all(t.embed_dim == 768 and t.image_size == 224 for t in p.manifest.teachers)
    if recipe == "datacompdr12m":
        assert p.manifest.embedding_bytes_per_sample == 110_592  # (30 + 1 + 5) x 2 x 768 x 2
    else:
        assert [t.logit_scale for t in p.manifest.teachers] == [70.0]
        assert any("hf-hub:apple/DFN2B-CLIP-ViT-L-14-39B" in note for note in p.notes)


def test_a_failed_shard_ends_the_run_naming_it_with_no_manifest(source, tmp_path, monkeypatch):
    """`run_pipeline` returns the shards it could not write (tests/integration/test_reinforce_faults.py); the job then
    raises naming them, before the manifest, so that a rerun redoes them instead of counting them as skipped."""
    from clipdr import cluster, records, storage
    from clipdr.reinforce import run as run_module

    class NoTracker:
        run_id = "run"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    def run_pipeline(cfg, tasks, manifest, fingerprint, on_shard):
        storage.write_bytes(storage.join(cfg.output, tasks[0].output), b"")  # the first shard was written
        return {tasks[1].source: "a stage failed on it: ActorDiedError: killed"}

    monkeypatch.setattr(run_module, "_tracker", lambda config, p: NoTracker())
    monkeypatch.setattr(cluster, "ensure_ray", lambda: None)
    monkeypatch.setitem(sys.modules, "clipdr.reinforce.pipeline", types.SimpleNamespace(run_pipeline=run_pipeline))
    cfg = config(source, tmp_path)
    second = plan(cfg).tasks[1].source

    with pytest.raises(run_module.ShardsFailedError, match=r"1 of 2 source shards failed") as failure:
        run_module.run(cfg, log=lambda _: None)

    assert list(failure.value.failed) == [second]
    assert "student-00001.tar: a stage failed on it: ActorDiedError: killed" in str(failure.value)
    assert not storage.exists(records.manifest_uri(cfg.reinforce.output))


def test_duplicate_keys_across_shards_are_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipdr.reinforce.run import count_duplicate_keys

    shards = {"a": ["k1", "k2", "k3", "k4"], "b": ["k3", "k5", "k1"], "c": ["k6"], "d": ["k1"]}
    for name, keys in shards.items():  # several row groups a shard: the count streams them
        pq.write_table(pa.table({"key": keys, "other": list(range(len(keys)))}), tmp_path / name, row_group_size=2)
    uris = [str(tmp_path / name) for name in shards]
    assert count_duplicate_keys(uris, num_buckets=4) == 3  # k3 once more, k1 twice more
    assert count_duplicate_keys(uris[:1] + uris[2:3]) == 0


def test_model_pools_are_fixed_or_elastic_between_least_and_most():
    """``*_actors_max`` above ``*_actors``: Ray Data grows the pool from the least to the most as resources join."""
    pytest.importorskip("ray")
    from clipdr.reinforce.pipeline import model_pool

    fixed, elastic = model_pool(2), model_pool(1, 8)
    assert (fixed.min_size, fixed.max_size) == (2, 2) and (elastic.min_size, elastic.max_size) == (1, 8)
    assert model_pool(2, 1).max_size == 2 and elastic.max_tasks_in_flight_per_actor == 1
    assert not elastic.enable_true_multi_threading  # one chunk at a time, as the captioner has it
    two_deep = model_pool(1, 4, calls=2)  # the teacher stage's: two chunks in flight, each run in its own thread
    assert two_deep.max_tasks_in_flight_per_actor == two_deep.max_concurrent_calls_per_actor == 2
    assert two_deep.enable_true_multi_threading and (two_deep.min_size, two_deep.max_size) == (1, 4)


def test_a_job_starts_no_more_writers_than_shards_to_write():
    """A writer owning no shard would cost a process start and write nothing: a one-shard pass starts one."""
    pytest.importorskip("ray")
    from clipdr.reinforce.pipeline import num_writers

    assert [num_writers(2, n) for n in (1, 2, 5)] == [1, 2, 2]
    assert num_writers(4, 0) == 1  # a job with nothing to write never gets here; still a valid pool


def test_a_recorded_run_continues_with_the_fingerprint_of_either_spelling(source, tmp_path):
    """A reinforcement state recorded before a_k left the fingerprint (the legacy spelling) is the same run; another
    input is not."""
    from clipdr import runstate
    from clipdr.reinforce import run as run_module

    p = plan(config(source, tmp_path))
    legacy = run_module.run_fingerprint(p.manifest, legacy=True)
    assert legacy != p.fingerprint
    for recorded in (p.fingerprint, legacy):
        assert run_module.continues(runstate.RunState("r1", recorded), p), recorded
    assert not run_module.continues(runstate.RunState("r1", runstate.fingerprint("other")), p)
    assert not run_module.continues(None, p)


def test_a_partial_run_of_record_layout_1_is_refused_not_completed_in_layout_2(source, tmp_path):
    """A shard an earlier clipdr wrote in layout 1 (view per list column) is never joined by layout 2 shards: the plan
    refuses, naming the layout, where a shard of the current layout would count as done."""
    from clipdr import records
    from clipdr.reinforce import run as run_module
    from clipdr.reinforce.chunks import shard_metadata, write_output_shard
    from tests.unit.test_records import make_columns

    cfg = config(source, tmp_path)
    p = plan(cfg)
    assert p.manifest.schema_version == records.SCHEMA_VERSION == 2
    v1 = dataclasses.replace(p.manifest, schema_version=1)
    assert run_module.run_fingerprint(v1) != p.fingerprint
    first = p.tasks[0].output
    metadata = shard_metadata(run_module.run_fingerprint(v1), "src", {})
    write_output_shard(cfg.reinforce.output, first, make_columns(v1, 3, prefix="a"), v1, metadata)
    with pytest.raises(ReinforceError, match=r"record layout version 1 \(this one writes version 2"):
        plan(cfg)
    write_output_shard(
        cfg.reinforce.output, first, make_columns(p.manifest, 3), p.manifest, shard_metadata(p.fingerprint, "src", {})
    )
    assert plan(cfg).done == (first,)
