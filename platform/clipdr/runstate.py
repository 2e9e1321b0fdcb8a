"""Resumable job state: what a job keeps beside its output so that a resubmission continues it.

A job (reinforcement, training) writes a small JSON file next to its output at its first submission: the MLflow run
id (a resubmission continues the same run), the fingerprint of what the output is made from, the recipe (settings a
resubmission must keep; a change is refused with a diff) and facts measured once (training: rows per epoch). A
finished training run also writes its result, the completion marker that makes a resubmission a no-op; a finished
reinforcement's marker is its manifest (`clipdr.records`).

| job | state file | completion |
|---|---|---|
| reinforce | ``<output>/_reinforce_run.json`` (hidden from listings) | ``<output>/manifest.json`` |
| train | ``<output>/<run_name>/clipdr_run.json`` | ``<output>/<run_name>/clipdr_result.json`` |
| study, sweep | ``<report folder>/clipdr_parent_run.json`` (the parent MLflow run of its runs) | its runs' |

A study also keeps each run's final per-sample evaluation beside the run (``<output>/<run_name>/
clipdr_final_scores.json``, under the fingerprint of the model, the [evaluate] settings and the evaluation files), so
that a later study of the same runs reads it instead of evaluating again.

Fingerprints are ``sha256:<64 hex>`` of a value's canonical JSON (or of a text as is), by `fingerprint`. Earlier
versions spelled them two other ways, which `matches` still accepts so that existing datasets and runs resume: the
bare hex digest (reinforcement shards and state) and ``sha256:`` with the first 16 hex digits (training state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from clipdr import storage
from clipdr.config import flatten

REINFORCE_STATE = "_reinforce_run.json"
TRAIN_STATE = "clipdr_run.json"
TRAIN_RESULT = "clipdr_result.json"
PARENT_STATE = "clipdr_parent_run.json"  # a study's or sweep's parent MLflow run, beside its report
FINAL_SCORES = "clipdr_final_scores.json"  # a study's per-sample final evaluation of a finished training run

_PREFIX = "sha256:"
_LEGACY_SHORT = len(_PREFIX) + 16  # training's data fingerprint before `fingerprint`


def fingerprint(value: object) -> str:
    """``sha256:<hex>`` of ``value``: a text as it is, anything else as JSON with sorted keys (``str`` for what
    JSON lacks), so equal settings give equal fingerprints on every machine."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return _PREFIX + hashlib.sha256(text.encode()).hexdigest()


def matches(recorded: str, current: str) -> bool:
    """Whether a fingerprint recorded earlier, possibly in a legacy spelling (module docstring), is ``current``."""
    if recorded == current:
        return True
    digest = current.removeprefix(_PREFIX)
    return recorded == digest or (len(recorded) == _LEGACY_SHORT and current.startswith(recorded))


def diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two nested settings dicts."""
    flat_old, flat_new = flatten(old), flatten(new)
    return [
        f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
        for k in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(k) != flat_new.get(k)
    ]


@dataclass(frozen=True)
class RunState:
    """A job's state file.

    Attributes:
        mlflow_run_id: The run every submission logs to.
        fingerprint: Of what the output is made from (`fingerprint`).
        recipe: Settings a resubmission must keep (nested dicts); empty when the fingerprint covers them.
        facts: Values measured at the first submission that later ones reuse.
    """

    mlflow_run_id: str
    fingerprint: str
    recipe: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def changes(self, fingerprint: str, recipe: dict[str, Any], what: str = "the input") -> list[str]:
        """What differs between this state and a resubmission's (empty: it may resume)."""
        changed = diff(self.recipe, recipe)
        return changed if matches(self.fingerprint, fingerprint) else [*changed, f"{what} changed"]

    @classmethod
    def from_json(cls, text: str | bytes) -> RunState:
        raw = json.loads(text)
        if "data_fingerprint" in raw:  # a training run started before this module: its facts were top-level keys
            facts = {k: v for k, v in raw.items() if k not in ("mlflow_run_id", "recipe", "data_fingerprint")}
            return cls(raw["mlflow_run_id"], raw["data_fingerprint"], raw.get("recipe", {}), facts)
        return cls(raw["mlflow_run_id"], raw["fingerprint"], raw.get("recipe", {}), raw.get("facts", {}))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def read(directory: str, name: str) -> RunState | None:
    """The state file ``name`` under ``directory``, or None before the first submission."""
    uri = storage.join(directory, name)
    return RunState.from_json(storage.read_bytes(uri)) if storage.exists(uri) else None


def write(directory: str, name: str, state: RunState) -> None:
    storage.write_bytes(storage.join(directory, name), state.to_json().encode())


def read_result(directory: str, name: str) -> dict[str, Any] | None:
    """A finished job's result (its completion marker), or None while it is not finished."""
    uri = storage.join(directory, name)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write_result(directory: str, name: str, result: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(directory, name), json.dumps(result).encode())
