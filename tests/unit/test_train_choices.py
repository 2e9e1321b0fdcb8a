"""Choices made at train time on a reinforced dataset: the teachers, their a_k, the synthetic captions, and a dataset
made without any (S = 0, an embeddings-only pass). No re-reinforcement: the same stored bytes serve every choice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clipdr import records
from clipdr.config import Config, TrainConfig, TrainLoss
from clipdr.train import data, pipeline
from clipdr.train.loop import make_loss
from clipdr.train.plan import NO_SYN_CAPTIONS_NOTE, Mode, TrainError, make_plan, syn_captions_used
from tests.unit.test_losses import TOL, make_batch, ref_loss, run_loss
from tests.unit.test_train_data import DIMS, STUDENT, make_manifest, write_dataset


def train_config(**changes) -> Config:
    return Config(train=TrainConfig(data="d", model=STUDENT, loss=TrainLoss(kd_weight=0.5), **changes))


def test_an_overridden_a_k_is_the_one_the_loss_uses():
    """train.teacher_scales replaces the manifest's a_k (100 each here) in the plan the workers get, and the loss
    equals the float64 reference formula with the new a_k, not with the stored one."""
    manifest = make_manifest()
    plan = make_plan(train_config(teacher_scales=(70.0, 60.0)), list(manifest.teachers), dataset_syn_captions=2)
    assert [t.logit_scale for t in plan.teacher_specs] == [70.0, 60.0]
    assert [t.logit_scale for t in make_plan(train_config(), list(manifest.teachers)).teacher_specs] == [100.0] * 2

    batch = make_batch(2, seed=3)
    got = run_loss(make_loss(plan).double(), batch, syn=True)
    want, stored = (ref_loss(batch, 0.5, scales, syn=True) for scales in ([70.0, 60.0], [100.0, 100.0]))
    for name in want:
        torch.testing.assert_close(got[name], want[name].detach(), **TOL, msg=name)
    assert not torch.allclose(got["kd_loss"], stored["kd_loss"].detach(), **TOL)  # a_k matters here


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"teacher_scales": (70.0,)}, r"1 values for 2 teachers \['alpha', 'beta_xl'\]"),
        ({"teacher_scales": (70.0, 0.0)}, r"must be > 0"),
    ],
)
def test_bad_teacher_scales_are_refused(changes, message):
    with pytest.raises(TrainError, match=message):
        make_plan(train_config(**changes), list(make_manifest().teachers))


def test_one_of_two_teachers_reads_and_outputs_only_its_columns(tmp_path):
    uri, manifest = write_dataset(tmp_path)
    chosen = manifest.teacher("beta_xl")
    cfg = train_config(teachers=("beta_xl",), teacher_scales=(50.0,))
    plan = make_plan(cfg, [chosen], dataset_syn_captions=manifest.num_syn_captions)
    assert [(t.name, t.logit_scale) for t in plan.teacher_specs] == [("beta_xl", 50.0)]
    columns = pipeline._columns(plan, manifest, 0)
    assert any(c.startswith(records.image_emb_column("beta_xl")) for c in columns)
    assert not any("__alpha" in c for c in columns)

    # The replay gets only the projected columns: the other teacher's are not there to be used.
    shard = records.open_dataset(uri).shard_uris[0]
    table, whole = records.read_shard(shard, columns), records.read_shard(shard)
    replay = data.ReplayBatch(
        manifest, data.student_preprocess(STUDENT), STUDENT, seed=plan.train.seed, epoch=0, teachers=plan.teacher_names
    )
    out = replay(table)
    k, j = out[data.AUG_INDEX], out[data.SYN_INDEX]
    stored_image = records.image_embeddings(whole, "beta_xl")
    stored_text = records.text_embeddings(whole, "beta_xl")
    assert (out[data.teacher_image_column("beta_xl")] == stored_image[range(len(k)), k]).all()
    assert (out[data.teacher_syn_text_column("beta_xl")] == stored_text[range(len(j)), 1 + j]).all()
    assert not any(name.endswith("__alpha") for name in out)


def test_the_first_n_synthetic_captions_are_chosen_at_train_time(tmp_path):
    uri, manifest = write_dataset(tmp_path, num_syn_captions=2)
    table = records.read_shard(records.open_dataset(uri).shard_uris[0])
    preprocess = data.student_preprocess(STUDENT)
    first = data.ReplayBatch(manifest, preprocess, STUDENT, seed=1, epoch=0, num_syn_captions=1)(table)
    assert (first[data.SYN_INDEX] == 0).all()
    stored_text = records.text_embeddings(table, "alpha")
    assert (first[data.teacher_syn_text_column("alpha")] == stored_text[:, 1]).all()
    assert syn_captions_used(train_config(num_syn_captions=1).train, 2) == (1, "")
    assert syn_captions_used(train_config().train, 2) == (2, "")
    with pytest.raises(TrainError, match=r"train.num_syn_captions = 3, but the dataset has 2"):
        syn_captions_used(train_config(num_syn_captions=3).train, 2)


def test_an_embeddings_only_dataset_trains_reinforced_on_real_captions_only(tmp_path):
    """S = 0: the run opens it (train.loss.use_syn_captions is on by default), says why no synthetic captions are
    used, reads no syn_captions column, and its loss is the reference with real captions only."""
    from clipdr.train.run import open_data

    uri, manifest = write_dataset(tmp_path, num_syn_captions=0)
    cfg = dataclasses.replace(train_config(), train=dataclasses.replace(train_config().train, data=uri))
    _, dataset, _ = open_data(cfg.train)
    assert dataset.manifest.num_syn_captions == 0
    assert syn_captions_used(cfg.train, 0) == (0, NO_SYN_CAPTIONS_NOTE)
    plan = make_plan(cfg, list(manifest.teachers), dataset_syn_captions=0)
    assert plan.mode is Mode.REINFORCED and not plan.use_syn_captions
    columns = pipeline._columns(plan, manifest, 0)
    assert records.SYN_CAPTIONS not in columns and "text_emb__alpha__0" in columns  # the real caption's row only
    assert len([c for c in columns if c.startswith(records.TEXT_EMB_PREFIX)]) == len(DIMS)

    table = records.read_shard(dataset.shard_uris[0], columns)
    replay = data.ReplayBatch(
        manifest,
        data.student_preprocess(STUDENT),
        STUDENT,
        seed=plan.train.seed,
        epoch=0,
        use_syn_captions=plan.use_syn_captions,
    )
    out = replay(table)
    assert data.SYN_TEXT not in out and not any(n.startswith(data.TEACHER_SYN_TEXT_PREFIX) for n in out)

    batch = make_batch(len(DIMS), seed=5)  # the loss on such a batch: no synthetic-caption parts
    got = run_loss(make_loss(plan).double(), batch, syn=False)
    want = ref_loss(batch, 0.5, [100.0, 100.0], syn=False)
    assert set(got) == set(want) and "kd_loss_syn" not in got
    torch.testing.assert_close(got["loss"], want["loss"].detach(), **TOL)


@pytest.mark.parametrize("schema_version", records.SCHEMA_VERSIONS)
def test_caption_sets_added_as_a_part_are_chosen_at_train_time(tmp_path, schema_version):
    """train.syn_caption_sets picks the sets the synthetic caption is drawn from (their captions concatenated, in
    order); the replay reads each set's captions and each teacher's text embeddings of them from the part (in a
    view-major dataset only the drawn caption's row, one j an epoch, so several epochs cover the sets)."""
    import pathlib

    from tests.unit.test_parts import add_part, captions_part

    uri, base = write_dataset(tmp_path, num_syn_captions=2, schema_version=schema_version)
    manifest = add_part(pathlib.Path(uri), base, captions_part(base))  # set "beam": 3 captions a sample
    assert manifest.caption_sets == {"default": 2, "beam": 3}
    shard = manifest.shards[0].path
    preprocess = data.student_preprocess(STUDENT)

    for chosen, total in ((("beam",), 3), ((), 5), (("beam", "default"), 5)):
        plan = make_plan(
            train_config(syn_caption_sets=chosen), list(manifest.teachers), dataset_caption_sets=manifest.caption_sets
        )
        assert plan.syn_caption_sets == (chosen or ("default", "beam")) and plan.num_syn_captions == total
        epochs = range(1 if schema_version == 1 else 3)
        drawn = [pipeline._columns(plan, manifest, epoch) for epoch in epochs]
        assert all((records.SYN_CAPTIONS in columns) == ("default" in plan.syn_caption_sets) for columns in drawn)
        assert all("syn_captions__beam" in columns for columns in drawn)
        if schema_version == 1:  # whole columns; a view-major epoch reads the drawn caption's row alone
            assert "text_emb__beta_xl__beam" in drawn[0]
        whole = [*manifest.record_schema().names, "syn_captions__beam", *(f"text_emb__{n}__beam" for n in DIMS)]
        table = records.read_shard_with_parts(uri, manifest, shard, whole)  # rows stacked back in layout 2
        outs = []
        for epoch, columns in zip(epochs, drawn, strict=True):
            replay = data.ReplayBatch(
                manifest, preprocess, STUDENT, seed=plan.train.seed, epoch=epoch, caption_sets=plan.syn_caption_sets
            )
            out = replay(records.read_shard_with_parts(uri, manifest, shard, columns))
            if epoch == 0:  # the drawn columns alone give what the whole records give
                for name, values in replay(table).items():
                    assert np.array_equal(out[name], values), name
            outs.append(out)
        j = np.concatenate([out[data.SYN_INDEX] for out in outs])
        assert j.max() < total and len(set(j.tolist())) > 1
        out = outs[0]
        j = out[data.SYN_INDEX]
        # The drawn caption and its targets, from the concatenation of the chosen sets, set by set.
        captions = {
            "default": table.column(records.SYN_CAPTIONS).to_pylist() if records.SYN_CAPTIONS in columns else None,
            "beam": table.column("syn_captions__beam").to_pylist(),
        }
        for name in DIMS:
            embeddings = {
                "default": records.text_embeddings(table, name)[:, 1:],
                "beam": records.stacked(table, f"text_emb__{name}__beam"),
            }
            stacked = np.concatenate([embeddings[s] for s in plan.syn_caption_sets], axis=1)
            assert (out[data.teacher_syn_text_column(name)] == stacked[range(len(j)), j]).all()
        texts = [[c for s in plan.syn_caption_sets for c in captions[s][i]] for i in range(len(j))]
        tokens = data._tokenize(
            data._tokenizer(STUDENT, preprocess.context_length),
            [t[k] for t, k in zip(texts, j, strict=True)],
            preprocess.context_length,
        )
        assert (out[data.SYN_TEXT] == tokens).all()

    # A run's data is the base and the parts it reads: a part it does not read leaves the fingerprint as it was.
    from clipdr.train.run import data_fingerprint_of

    assert data_fingerprint_of(uri, manifest, ["alpha"], ["default"]) == data_fingerprint_of(uri, base, ["alpha"])
    assert data_fingerprint_of(uri, manifest, ["alpha"], ["beam"]) != data_fingerprint_of(uri, base, ["alpha"])

    with pytest.raises(TrainError, match=r"train.syn_caption_sets names \['long'\], which the dataset lacks"):
        make_plan(train_config(syn_caption_sets=("long",)), [], dataset_caption_sets=manifest.caption_sets)
    lacking = dataclasses.replace(manifest.part("captions__beam"), teachers=("alpha",))
    only_alpha = dataclasses.replace(manifest, parts=(lacking,))
    with pytest.raises(records.RecordsError, match="teacher 'beta_xl' has no text embeddings of caption set 'beam'"):
        data.ReplayBatch(only_alpha, preprocess, STUDENT, seed=1, epoch=0, caption_sets=("beam",))
