"""Resumable job state: one fingerprint, pinned to the values existing datasets and runs recorded, and the state
files of both jobs, including those written before `clipdr.runstate`."""

from __future__ import annotations

import json

from clipdr import records, runstate
from clipdr.data import sources
from clipdr.reinforce.run import run_fingerprint
from clipdr.train.run import data_fingerprint_of

# What the code before `clipdr.runstate` computed for the inputs below (reinforce/run.py's `_fingerprint`, train/
# run.py's `_fingerprint`, `sources.fingerprint`): shard footers, state files and manifests hold these.
REINFORCE_BEFORE = "b5b202bc74e890f83a935ffb93eb0eeff21feb2eb1963a56ba1834e247ac9441"
TRAIN_BEFORE = "sha256:01d146598f76cd50"
SOURCES_BEFORE = "sha256:e475341f58c39d3db5539da37a513d821f219874db1a8844a232f7fe47eb2a18"


def _teacher(name: str, dim: int) -> records.TeacherSpec:
    return records.TeacherSpec(
        name=name,
        model="ViT-L-14",
        pretrained=name,
        embed_dim=dim,
        logit_scale=100.0,
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bicubic",
    )


MANIFEST = records.Manifest(
    teachers=(_teacher("openai", 16), _teacher("datacomp_xl", 24)),
    captioner=records.CaptionerSpec(name="coca", kind="open_clip", model="coca_ViT-L-14", pretrained="mscoco"),
    augment=records.AugmentSpec(),
    num_augmentations=2,
    num_syn_captions=3,
    augment_seed=7,
    source_uri="s3://source/datacomp",
    source_fingerprint="sha256:0123",
    created_at="2026-01-01T00:00:00+00:00",
    code_version="0.1.0",
    schema_version=1,  # the layout of the datasets and runs recorded before (view-major is version 2)
)
SHARDS = [
    sources.SourceShard("s3://b/x-1.tar", "x-1.tar", 100),
    sources.SourceShard("s3://b/a/x-0.tar", "a/x-0.tar", 42),
]


def test_fingerprints_keep_the_digests_existing_datasets_and_runs_recorded():
    reinforce = run_fingerprint(MANIFEST, legacy=True)  # a_k left the fingerprint since: the legacy spelling keeps it
    assert reinforce == "sha256:" + REINFORCE_BEFORE
    assert runstate.matches(REINFORCE_BEFORE, reinforce)
    train = data_fingerprint_of("s3://unused", MANIFEST)
    assert train.startswith(TRAIN_BEFORE) and len(train) == len("sha256:") + 64
    assert runstate.matches(TRAIN_BEFORE, train)
    assert sources.fingerprint(SHARDS) == SOURCES_BEFORE  # recorded in every manifest: unchanged spelling too


def test_matches_refuses_other_digests_in_every_spelling():
    current = runstate.fingerprint({"a": 1})
    other = runstate.fingerprint({"a": 2})
    assert runstate.fingerprint({"a": 1}) == current and current.startswith("sha256:")
    for recorded in (other, other.removeprefix("sha256:"), other[: len(TRAIN_BEFORE)], "", current[:-1]):
        assert not runstate.matches(recorded, current), recorded


def test_a_training_run_state_from_before_resumes_and_refuses_changes(tmp_path):
    recipe = {"train": {"lr": 0.001, "model": "m"}, "augment": {"scale": [0.08, 1.0]}}
    legacy = {"mlflow_run_id": "abc", "recipe": recipe, "data_fingerprint": TRAIN_BEFORE, "rows_per_epoch": 256}
    (tmp_path / runstate.TRAIN_STATE).write_text(json.dumps(legacy, indent=2))
    state = runstate.read(str(tmp_path), runstate.TRAIN_STATE)
    assert (state.mlflow_run_id, state.facts) == ("abc", {"rows_per_epoch": 256})
    assert state.changes(data_fingerprint_of("unused", MANIFEST), recipe) == []

    changed_recipe = {**recipe, "train": {"lr": 0.002, "model": "m"}}
    other_data = runstate.fingerprint("another manifest")
    assert state.changes(other_data, changed_recipe, "the training data") == [
        "train.lr: 0.001 -> 0.002",
        "the training data changed",
    ]

    runstate.write(str(tmp_path), runstate.TRAIN_STATE, state)
    assert runstate.read(str(tmp_path), runstate.TRAIN_STATE) == state


def test_a_reinforcement_state_from_before_continues_its_mlflow_run(tmp_path):
    (tmp_path / runstate.REINFORCE_STATE).write_text(
        json.dumps({"mlflow_run_id": "r1", "fingerprint": REINFORCE_BEFORE})
    )
    state = runstate.read(str(tmp_path), runstate.REINFORCE_STATE)
    assert state.changes(run_fingerprint(MANIFEST, legacy=True), {}) == []
    assert state.changes(runstate.fingerprint("other settings"), {}) == ["the input changed"]
    assert runstate.read(str(tmp_path / "nowhere"), runstate.REINFORCE_STATE) is None


def test_result_is_the_completion_marker(tmp_path):
    assert runstate.read_result(str(tmp_path), runstate.TRAIN_RESULT) is None
    runstate.write_result(str(tmp_path), runstate.TRAIN_RESULT, {"steps": 16})
    assert runstate.read_result(str(tmp_path), runstate.TRAIN_RESULT) == {"steps": 16}
