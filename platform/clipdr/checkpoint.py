"""The training checkpoint: its files, its metadata, the RNG state, how it is committed, found and loaded.

A checkpoint is a folder (local or ``s3://``) written by rank 0 and uploaded by Ray Train, holding:

- ``model.pt``: the student's plain open_clip state dict (``open_clip.create_model(name, pretrained=path)`` loads it);
- ``train_state.pt``: the optimiser state and the RNG states of torch, numpy and Python, as tensors and numbers;
- ``ema.pt`` (only with weight EMA, ``train.finetune.ema_decay``): the moving average of the model's state dict, what
  is evaluated and published, kept so that a resumed run continues the same average;
- ``meta.json`` (`CheckpointMeta`): what the checkpoint holds, where in the run it was taken, and the size of every
  other file.

Commit. Ray Train uploads the folder file by file, in no fixed order, so an interrupted upload leaves a folder with
some of the files (often ``meta.json`` alone). ``meta.json`` is the commit record: it lists the other files with
their sizes, and a folder counts only when every listed file is there at that size. `latest` skips any other folder
with a warning, so a resubmitted run resumes from the newest whole checkpoint. Checkpoints written before
``meta.json`` listed its files count when ``model.pt`` and ``train_state.pt`` are both there.

Loading is ``torch.load(weights_only=True)``: both ``.pt`` files hold only tensors, numbers, strings and containers,
so loading one cannot run code. Checkpoints written before the RNG state was stored as tensors hold numpy's state as
a numpy array; those load with numpy's array reconstruction, and nothing else, allowed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import Tensor

from clipdr import storage

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
EMA_FILE = "ema.pt"
META_FILE = "meta.json"
# What a run's model is published as (MLflow artifacts under ARTIFACT_PATH, export): the weights, their EMA when the
# run kept one (`published_weights` of the downloaded folder is then the run's fine-tuned model) and what they are.
PUBLISHED_FILES = (MODEL_FILE, EMA_FILE, META_FILE)
ARTIFACT_PATH = "checkpoint"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the folder."""


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json`` of a checkpoint: what it holds and where in the run it was taken.

    Attributes:
        model: The student's open_clip / clipdr name.
        mode: The training mode.
        run_name: The training run's name.
        mlflow_run_id: The MLflow run that trained it.
        step: Optimiser steps done.
        samples_seen: Training samples seen.
        batches: Micro-batches each worker had consumed.
        total_steps: Optimiser steps of the whole run.
        files: Size in bytes of every other file of the checkpoint (the commit record); empty in checkpoints
            written before it existed.
    """

    model: str
    mode: str
    run_name: str
    mlflow_run_id: str
    step: int
    samples_seen: int
    batches: int
    total_steps: int
    files: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, uri: str | Path) -> CheckpointMeta:
        """The ``meta.json`` of the checkpoint folder ``uri``."""
        return cls.from_json(storage.read_bytes(storage.join(str(uri), META_FILE)))

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointMeta:
        raw = json.loads(text)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and f.name != "files"]
        if missing:
            raise CheckpointError(f"{META_FILE} lacks {', '.join(missing)}")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# --------------------------------------------------------------------------- RNG state as tensors


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, numpy and Python, as tensors and numbers (loadable with ``weights_only=True``)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned (or the tuples of a checkpoint written before it)."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        numpy_state = ("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)


# --------------------------------------------------------------------------- save, find, load


def save(
    directory: Path,
    model_state: dict[str, Tensor],
    meta: CheckpointMeta,
    optimizer_state: dict[str, Any] | None = None,
    ema_state: dict[str, Tensor] | None = None,
) -> None:
    """Writes a checkpoint into the local folder ``directory``: the weights, the training state (with the RNG
    states of this process) when ``optimizer_state`` is given, the weights' EMA when ``ema_state`` is given, then
    ``meta.json`` listing them (the commit)."""
    torch.save({k: v.detach().cpu() for k, v in model_state.items()}, directory / MODEL_FILE)
    names = [MODEL_FILE]
    if ema_state is not None:
        torch.save({k: v.detach().cpu() for k, v in ema_state.items()}, directory / EMA_FILE)
        names.append(EMA_FILE)
    if optimizer_state is not None:
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, directory / STATE_FILE)
        names.append(STATE_FILE)
    files = {name: (directory / name).stat().st_size for name in names}
    (directory / META_FILE).write_text(dataclasses.replace(meta, files=files).to_json())


def _sizes(uri: str) -> dict[str, int]:
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {Path(i.path).name: i.size for i in infos if i.type == pafs.FileType.File}


def _complete(uri: str) -> CheckpointMeta | None:
    """The meta of the checkpoint folder ``uri`` when it is whole; None (with a warning) when it is not."""
    sizes = _sizes(uri)
    if META_FILE not in sizes:
        return None
    try:
        meta = CheckpointMeta.from_json(storage.read_bytes(storage.join(uri, META_FILE)))
    except (ValueError, TypeError) as e:  # json's and ours; a half-copied meta.json lands here
        log.warning("checkpoint %s skipped: unreadable %s (%s)", uri, META_FILE, e)
        return None
    expected = meta.files or {MODEL_FILE: None, STATE_FILE: None}  # before the commit record: presence only
    wrong = [n for n, size in expected.items() if n not in sizes or (size is not None and sizes[n] != size)]
    if wrong:
        log.warning("checkpoint %s skipped: incomplete (%s missing or partly written)", uri, ", ".join(wrong))
        return None
    return meta


def latest(uri: str) -> tuple[str, CheckpointMeta] | None:
    """``(folder, meta)`` of the newest complete checkpoint: ``uri`` itself when it is one, else its sub-folder
    checkpoint with the most steps (a training run's storage folder); None when there is none. Incomplete
    checkpoints (module docstring) are skipped with a warning."""
    if storage.exists(storage.join(uri, META_FILE)):
        meta = _complete(uri)
        return (uri, meta) if meta is not None else None
    fs, path = storage.resolve(uri)
    best: tuple[str, CheckpointMeta] | None = None
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        folder = storage.join(uri, Path(info.path).name)
        meta = _complete(folder)
        if meta is not None and (best is None or meta.step > best[1].step):
            best = (folder, meta)
    return best


def model_file(uri: str) -> str:
    """The weights file of the checkpoint folder ``uri`` (what ``pretrained=`` of open_clip takes)."""
    return storage.join(uri, MODEL_FILE)


def _load(uri: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def load_weights(uri: str | Path) -> dict[str, Tensor]:
    """The model state dict of the checkpoint folder ``uri``."""
    return _load(model_file(str(uri)))


def load_ema(uri: str | Path) -> dict[str, Tensor] | None:
    """The weights' EMA of the checkpoint folder ``uri``; None when the run kept none."""
    ema_uri = storage.join(str(uri), EMA_FILE)
    return _load(ema_uri) if storage.exists(ema_uri) else None


def published_weights(uri: str | Path) -> dict[str, Tensor]:
    """The weights a checkpoint publishes (evaluation, export, the logged model): its EMA when it has one, else
    its model."""
    ema = load_ema(uri)
    return ema if ema is not None else load_weights(uri)


def _legacy_numpy_globals() -> list[Any]:
    """What numpy's RNG state pickled as an array needs (checkpoints written before `rng_state`): the array's
    reconstruction and its dtype (the key array is uint32, whose dtype pickles as its own class)."""
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_train_state(uri: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restores the optimiser state and this process's RNG states from the checkpoint folder ``uri``."""
    state_uri = storage.join(str(uri), STATE_FILE)
    try:
        state = _load(state_uri)
    except pickle.UnpicklingError:  # weights_only refused a global: a checkpoint with numpy's state as an array
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = _load(state_uri)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
