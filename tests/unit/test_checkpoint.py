"""The checkpoint contract: round trip (weights, optimiser, RNG), safe loading, commit, and which one is latest."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clipdr import checkpoint
from clipdr.checkpoint import META_FILE, MODEL_FILE, STATE_FILE, CheckpointMeta

META = CheckpointMeta("clipdr-tiny-vit", "reinforced", "run", "mlflow-id", 4, 128, 4, 16)


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimiser step on data drawn from every RNG a training step may use."""
    noise = float(np.random.rand()) + random.random()
    loss = model(torch.randn(5, 6)).pow(2).mean() * (1 + noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _save(folder: Path, step: int, **files: bytes) -> Path:
    """A checkpoint at ``step`` written by `checkpoint.save`, then with ``files`` overwritten or removed (None)."""
    folder.mkdir(parents=True)
    model, optimizer = _model_and_optimizer(0)
    checkpoint.save(folder, model.state_dict(), dataclasses.replace(META, step=step), optimizer.state_dict())
    for name, data in files.items():
        if data is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(data)
    return folder


def test_round_trip_continues_training_and_random_draws_identically(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for _ in range(3):
        _step(model, optimizer)
    checkpoint.save(tmp_path, model.state_dict(), META, optimizer.state_dict())
    _step(model, optimizer)
    draws = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    restored, restored_optimizer = _model_and_optimizer(1)
    restored.load_state_dict(checkpoint.load_weights(tmp_path))
    checkpoint.load_train_state(tmp_path, restored_optimizer)
    _step(restored, restored_optimizer)
    assert torch.equal(torch.rand(4), draws[0])
    assert np.array_equal(np.random.rand(4), draws[1])
    assert [random.random() for _ in range(4)] == draws[2]
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert CheckpointMeta.read(tmp_path) == dataclasses.replace(
        META, files={n: (tmp_path / n).stat().st_size for n in (MODEL_FILE, STATE_FILE)}
    )


class _Payload:
    """What a hostile checkpoint could hold: unpickling it calls `_run`."""

    ran = False

    def __reduce__(self):
        return (_run, ())


def _run() -> None:
    _Payload.ran = True


@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE])
def test_loading_never_unpickles_arbitrary_objects(tmp_path, name):
    _save(tmp_path / "c", 1)
    torch.save({"optimizer": _Payload(), "rng": {}}, tmp_path / "c" / name)
    _, optimizer = _model_and_optimizer(0)
    with pytest.raises(pickle.UnpicklingError):
        if name == MODEL_FILE:
            checkpoint.load_weights(tmp_path / "c")
        else:
            checkpoint.load_train_state(tmp_path / "c", optimizer)
    assert not _Payload.ran


def test_training_state_of_a_checkpoint_written_before_the_rng_tensors_still_loads(tmp_path):
    """Checkpoints up to this change pickled numpy's and Python's RNG states as they are (tuples, a numpy array)."""
    model, optimizer = _model_and_optimizer(0)
    _step(model, optimizer)
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"optimizer": optimizer.state_dict(), "rng": legacy}, tmp_path / STATE_FILE)
    draws = (torch.rand(3), np.random.rand(3), random.random())

    np.random.seed(5), random.seed(5)
    _, restored = _model_and_optimizer(1)
    checkpoint.load_train_state(tmp_path, restored)
    assert (torch.equal(torch.rand(3), draws[0]), np.array_equal(np.random.rand(3), draws[1])) == (True, True)
    assert random.random() == draws[2]
    assert restored.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_latest_skips_an_incomplete_newer_checkpoint_with_a_warning(tmp_path, caplog):
    """An interrupted upload leaves meta.json alone (or a file cut short): the run resumes from the one before."""
    run = tmp_path / "run"
    _save(run / "checkpoint_000000", 4)
    meta_only = json.loads((run / "checkpoint_000000" / META_FILE).read_text()) | {"step": 8}
    (run / "checkpoint_000001").mkdir()
    (run / "checkpoint_000001" / META_FILE).write_text(json.dumps(meta_only))
    _save(run / "checkpoint_000002", 12, **{MODEL_FILE: b"cut short"})
    _save(run / "checkpoint_000003", 16, **{META_FILE: b'{"model": "clipdr-tin'})
    with caplog.at_level(logging.WARNING, logger="clipdr.checkpoint"):
        found = checkpoint.latest(str(run))
    assert found is not None and found[0] == str(run / "checkpoint_000000") and found[1].step == 4
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("checkpoint_000001", "checkpoint_000002", "checkpoint_000003"):
        assert name in warned, warned
    assert checkpoint.latest(str(run / "checkpoint_000001")) is None  # also when named directly
    assert checkpoint.latest(str(tmp_path / "nothing")) is None


def test_latest_accepts_checkpoints_written_before_the_commit_record(tmp_path):
    """Their meta.json lists no files: they count when the weights and the training state are both there."""
    run = tmp_path / "run"
    for step, folder in ((4, "checkpoint_a"), (8, "checkpoint_b")):
        _save(run / folder, step)
        meta = json.loads((run / folder / META_FILE).read_text())
        del meta["files"]
        (run / folder / META_FILE).write_text(json.dumps(meta))
    (run / "checkpoint_b" / STATE_FILE).unlink()
    found = checkpoint.latest(str(run))
    assert found is not None and found[0].endswith("checkpoint_a") and found[1].files == {}
    assert checkpoint.latest(str(run / "checkpoint_a"))[0] == str(run / "checkpoint_a")


def test_weights_only_checkpoint_counts_and_names_its_model_file(tmp_path):
    """Evaluation and export fixtures save the weights alone: the commit record lists just those."""
    model, _ = _model_and_optimizer(0)
    checkpoint.save(tmp_path, model.state_dict(), META)
    assert not (tmp_path / STATE_FILE).exists()
    assert checkpoint.latest(str(tmp_path))[1].files == {MODEL_FILE: (tmp_path / MODEL_FILE).stat().st_size}
    assert checkpoint.model_file(str(tmp_path)) == str(tmp_path / MODEL_FILE)
