"""Task suites: a TOML file listing clip_benchmark datasets with their roots, and the one number they add up to.

A suite is what papers report as one aggregate, e.g. DataComp's average over its 38 tasks::

    name = "datacomp38"                    # metric suite/<name>/mean; default: the file name without .toml
    root = "s3://evals/clip_benchmark"     # base of relative task roots; default: the suite file's folder

    [[task]]
    root = "wds_imagenet1k"                # a clip_benchmark task folder (zero-shot) or retrieval folder
    kind = "zeroshot"                      # or "retrieval"
    metric = "acc1"                        # clip_benchmark's name (`metrics.CLIP_BENCHMARK_NAMES`)

    [[task]]
    root = "wds_mscoco_captions"
    kind = "retrieval"
    metric = ["image_retrieval_recall@1", "text_retrieval_recall@1"]   # a list: their mean

The aggregate is the unweighted mean over the tasks of each task's metric. Metrics are named as clip_benchmark
names them, so the suite file reads like the tables it reproduces.
"""

from __future__ import annotations

import os
import posixpath
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from clipdr import storage
from clipdr.evaluate import datasets, metrics

KINDS = ("zeroshot", "retrieval")  # the engine's dataset kinds
_DEFAULT_METRIC = {"zeroshot": ("acc1",)}
SUITE_FILE_SUFFIX = ".toml"


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: its dataset folder, kind, name (the folder's) and the metrics its score averages."""

    uri: str
    kind: str
    metrics: tuple[str, ...]

    @property
    def name(self) -> str:
        return datasets.dataset_name(self.uri)


@dataclass(frozen=True)
class Suite:
    """A named list of tasks; `aggregate` turns their metrics into one number."""

    name: str
    uri: str
    tasks: tuple[SuiteTask, ...]

    def uris(self, kind: str) -> tuple[str, ...]:
        """The dataset folders of the suite's tasks of one kind, in file order."""
        return tuple(task.uri for task in self.tasks if task.kind == kind)

    def aggregate(self, by_dataset: Mapping[tuple[str, str], Mapping[str, float]]) -> float:
        """The mean over tasks of each task's score (the mean of its metrics).

        Args:
            by_dataset: Per (kind, dataset name), its metrics under clip_benchmark's names.

        Raises:
            ValueError: A task was not evaluated, or lacks its metric (``acc5`` below 5 classes, say).
        """
        scores = []
        for task in self.tasks:
            values = by_dataset.get((task.kind, task.name))
            if values is None:
                raise ValueError(f"suite {self.name!r}: {task.kind} task {task.name!r} was not evaluated")
            missing = [m for m in task.metrics if m not in values]
            if missing:
                raise ValueError(f"suite {self.name!r}: task {task.name!r} has no {missing}; it has {sorted(values)}")
            scores.append(sum(values[m] for m in task.metrics) / len(task.metrics))
        return sum(scores) / len(scores)


def _folder(uri: str) -> str:
    return posixpath.dirname(uri) if storage.is_s3(uri) or uri.startswith(storage.FILE_SCHEME) else os.path.dirname(uri)


def _resolve(base: str, root: str) -> str:
    if storage.is_s3(root) or root.startswith(storage.FILE_SCHEME) or os.path.isabs(root):
        return root
    joined = storage.join(base, root)
    # One spelling per local folder, so a dataset named in evaluate.zeroshot too is recognised as the same.
    return joined if storage.is_s3(joined) or joined.startswith(storage.FILE_SCHEME) else os.path.normpath(joined)


def load_suite(uri: str) -> Suite:
    """Reads a suite file (path or ``s3://``); see the module doc for its form.

    Raises:
        FileNotFoundError: No file at ``uri``.
        ValueError: The file is not a valid suite (unknown keys or kind, no tasks, a metric clip_benchmark does
            not name, two tasks with one name).
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"task suite {uri!r} does not exist")
    try:
        raw = tomllib.loads(storage.read_bytes(uri).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"task suite {uri}: not TOML: {e}") from None
    unknown = set(raw) - {"name", "root", "task"}
    if unknown:
        raise ValueError(f"task suite {uri}: unknown keys {sorted(unknown)}; expected name, root and [[task]]")
    name = str(raw.get("name") or storage.basename(uri).removesuffix(SUITE_FILE_SUFFIX))
    base = _resolve(_folder(uri), str(raw.get("root", "")))
    entries = raw.get("task", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"task suite {uri}: no [[task]] entries")
    known = set(metrics.CLIP_BENCHMARK_NAMES.values())
    tasks = []
    for i, entry in enumerate(entries):
        extra = set(entry) - {"root", "kind", "metric"}
        if extra or "root" not in entry:
            raise ValueError(f"task suite {uri}: task {i} needs root (and kind, metric), got keys {sorted(entry)}")
        kind = entry.get("kind", "zeroshot")
        if kind not in KINDS:
            raise ValueError(f"task suite {uri}: task {i} has kind {kind!r}; expected one of {', '.join(KINDS)}")
        chosen = entry.get("metric", _DEFAULT_METRIC.get(kind))
        if chosen is None:
            raise ValueError(f"task suite {uri}: retrieval task {entry['root']!r} needs a metric")
        chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
        wrong = [m for m in chosen if m not in known]
        if not chosen or wrong:
            raise ValueError(
                f"task suite {uri}: task {entry['root']!r}: unknown metrics {wrong}; known: {sorted(known)}"
            )
        tasks.append(SuiteTask(_resolve(base, entry["root"]), kind, chosen))
    names = [(t.kind, t.name) for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task suite {uri}: two tasks have one name (folder name): {names}")
    return Suite(name, uri, tuple(tasks))
