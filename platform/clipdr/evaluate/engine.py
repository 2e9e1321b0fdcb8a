"""Evaluate a CLIP model on the configured datasets: `evaluate_model` (what training calls) and `evaluate`.

Cheap to call repeatedly (training evaluates every ``eval_every`` samples): decoded, preprocessed images are
cached in the process per (dataset, preprocessing), as uint8 pixels when the model's preprocessing ends in
ToTensor + Normalize (4x smaller than floats; normalised on the device per batch), and identical images are
stored and embedded once (the synthetic world's zero-shot tasks share their images). Prompts are tokenised
once per (task, tokenizer). Text classifiers and all embeddings are recomputed on every call, since the
weights change between calls.

Shape suffixes: N images, C classes, T templates, M texts, D embedding dim, B batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from clipdr import models, stats
from clipdr.config import EvaluateConfig
from clipdr.data import sources
from clipdr.evaluate import datasets, metrics, suite
from clipdr.evaluate.datasets import RetrievalSet, ZeroShotTask

ZEROSHOT = "zeroshot"
RETRIEVAL = "retrieval"
SUITE = "suite"
PARTIAL = "partial"  # prefix of the metrics a partial evaluation could not compute in full (`_mark_partial`)


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class EvalTransform:
    """A model's evaluation transform (built from its ``preprocess_cfg``), split into a cached and a per-batch part.

    Attributes:
        key: Identifies the preprocessing (the model's ``preprocess_cfg`` as sorted items).
        to_pixels: PIL image -> cached ``(3, H, W)`` tensor: uint8 when ``mean``/``std`` are set, else the
            final float tensor (a transform that does not end in ToTensor + Normalize is cached whole).
        mean: Per-channel mean applied per batch, or None.
        std: Per-channel std applied per batch, or None.
    """

    key: tuple
    to_pixels: Callable[[Image.Image], Tensor]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def batch(self, pixels: Sequence[Tensor], device: torch.device) -> Tensor:
        """Stacks cached pixels into a model input batch on ``device``, normalised like the full transform."""
        batch_BCHW = torch.stack(list(pixels)).to(device, non_blocking=True)
        if self.mean is None or self.std is None:
            return batch_BCHW
        # The same float ops as ToTensor + Normalize, so results match the model's own transform.
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return batch_BCHW.float().div(255).sub(mean).div(std)


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


def preprocess_of(model: nn.Module) -> EvalTransform:
    """The evaluation preprocessing of ``model``, from its own ``visual.preprocess_cfg`` (what open_clip attaches).

    Raises:
        ValueError: The model carries no ``visual.preprocess_cfg`` (build it with `clipdr.models.create_model`).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{type(model).__name__} has no visual.preprocess_cfg: build it with clipdr.models.create_model or "
            "open_clip, which attach the preprocessing of the model's config"
        )
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    pp_cfg = PreprocessCfg(**{k: _hashable(v) for k, v in cfg.items() if k in known})
    transform = image_transform_v2(pp_cfg, is_train=False)
    key = tuple(sorted(dataclasses.asdict(pp_cfg).items()))
    steps = list(getattr(transform, "transforms", [transform]))
    names = [type(step).__name__ for step in steps]
    split = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
    if split is not None and names[split + 1 :] == ["Normalize"]:
        head, normalize = steps[:split], steps[split + 1]

        def to_pixels(image: Image.Image) -> Tensor:
            for step in head:
                image = step(image)
            array_HWC = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(array_HWC.copy()).permute(2, 0, 1).contiguous()

        return EvalTransform(key, to_pixels, tuple(normalize.mean), tuple(normalize.std))
    return EvalTransform(key, transform, None, None)


# --------------------------------------------------------------------------- the in-process cache


@dataclass
class _Bank:
    """Preprocessed images of one preprocessing, each stored once, found by the digest of its encoded bytes."""

    pixels: list[Tensor] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset read for one preprocessing: per sample the bank row of its image, and its label or captions."""

    kind: str
    name: str
    uri: str
    rows: tuple[int, ...]
    labels: tuple[int, ...] = ()
    captions: tuple[tuple[str, ...], ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)
    task: ZeroShotTask | None = None

    @property
    def num_samples(self) -> int:
        return len(self.rows)


_BANKS: dict[tuple, _Bank] = {}
_LOADED: dict[tuple, LoadedDataset] = {}
_TOKENS: dict[tuple, Tensor] = {}


def clear_cache() -> None:
    """Drops every cached image, dataset listing and tokenised prompt of this process."""
    _BANKS.clear()
    _LOADED.clear()
    _TOKENS.clear()
    _discover_zeroshot.cache_clear()
    _discover_retrieval.cache_clear()
    _suite.cache_clear()
    _tokenizer.cache_clear()


@functools.cache
def _discover_zeroshot(uri: str) -> tuple[ZeroShotTask, ...]:
    return tuple(datasets.find_zeroshot_tasks(uri))


@functools.cache
def _discover_retrieval(uri: str) -> RetrievalSet:
    return datasets.find_retrieval_set(uri)


@functools.cache
def _suite(uri: str) -> suite.Suite:
    return suite.load_suite(uri)


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str) -> Callable[..., Tensor]:
    return models.get_tokenizer(model_name)


def _tokens(dataset: LoadedDataset, model_name: str) -> Tensor:
    """Tokens of a dataset's texts (zero-shot: every class x template prompt, class-major; retrieval: every
    caption, image-major), tokenised once per process."""
    key = (dataset.kind, dataset.uri, dataset.name, dataset.num_samples, model_name)
    if key not in _TOKENS:
        if dataset.task is not None:
            texts = dataset.task.prompts()
        else:
            texts = [caption for captions in dataset.captions for caption in captions]
        _TOKENS[key] = _tokenizer(model_name)(texts)
    return _TOKENS[key]


def _bank_row(bank: _Bank, image_bytes: bytes, preprocess: EvalTransform, skipped: collections.Counter) -> int | None:
    digest = hashlib.blake2b(image_bytes, digest_size=16).hexdigest()
    row = bank.rows.get(digest)
    if row is None:
        try:
            image = sources.decode_rgb(image_bytes)
        except sources.InvalidSampleError as e:
            skipped[str(e.reason)] += 1
            return None
        bank.pixels.append(preprocess.to_pixels(image))
        row = bank.rows[digest] = len(bank.pixels) - 1
    return row


def _load(
    kind: str, dataset: ZeroShotTask | RetrievalSet, max_samples: int, seed: int, preprocess: EvalTransform
) -> LoadedDataset:
    key = (kind, dataset.uri, dataset.name, max_samples, seed, preprocess.key)
    if key in _LOADED:
        return _LOADED[key]
    bank = _BANKS.setdefault(preprocess.key, _Bank())
    skipped: collections.Counter = collections.Counter()
    rows, labels, captions = [], [], []
    if isinstance(dataset, ZeroShotTask):
        samples: Iterator[datasets.EvalSample] = datasets.iter_zeroshot_samples(dataset, skipped, max_samples, seed)
    else:
        samples = datasets.iter_retrieval_samples(dataset, skipped, max_samples, seed)
    for sample in samples:
        row = _bank_row(bank, sample.image_bytes, preprocess, skipped)
        if row is None:
            continue
        rows.append(row)
        labels.append(sample.label)
        captions.append(sample.captions)
    if not rows:
        raise ValueError(f"{kind} dataset {dataset.name!r} ({dataset.uri}) has no readable samples: {dict(skipped)}")
    loaded = LoadedDataset(
        kind=kind,
        name=dataset.name,
        uri=dataset.uri,
        rows=tuple(rows),
        labels=tuple(labels) if kind == ZEROSHOT else (),
        captions=tuple(captions) if kind == RETRIEVAL else (),
        skipped={str(k): v for k, v in skipped.items()},
        task=dataset if isinstance(dataset, ZeroShotTask) else None,
    )
    _LOADED[key] = loaded
    return loaded


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one evaluation, and what each dataset contributed (for the logged JSON and the console).

    ``per_sample`` (with ``evaluate(..., per_sample=True)``): for each metric that is a mean over samples (a task's
    ``top1``/``top5``, a retrieval set's six recalls), named as in ``metrics``, the samples' scores whose mean it is,
    each with the dataset image it belongs to: what a bootstrap over evaluation samples resamples (`clipdr.stats`).
    """

    metrics: dict[str, float]
    datasets: list[dict[str, Any]]
    per_sample: dict[str, stats.SampleScores] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "datasets": self.datasets}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch spells it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"evaluate.device must be auto, cpu or cuda[:index], got {device!r}")
    return torch.device(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    inner = getattr(model, "clip", None)  # clipdr.models.ClipEmbedder, the logged form
    return inner if isinstance(inner, nn.Module) else model


def _encode(encode: Callable[[Tensor], Tensor], batches: Iterator[Tensor], device: torch.device) -> Tensor:
    chunks = []
    for batch in batches:
        with _autocast(device):
            chunks.append(encode(batch.to(device)).float())
    return torch.cat(chunks)


def _datasets(cfg: EvaluateConfig) -> tuple[list[tuple[str, ZeroShotTask | RetrievalSet]], int]:
    """The datasets to evaluate (``evaluate.tasks`` of them, else all), and how many the folders hold."""
    found: list[tuple[str, ZeroShotTask | RetrievalSet]] = []
    task_suite = _suite(cfg.suite) if cfg.suite else None
    for uri in dict.fromkeys((*cfg.zeroshot, *(task_suite.uris(ZEROSHOT) if task_suite else ()))):
        found += [(ZEROSHOT, task) for task in _discover_zeroshot(uri)]
    for uri in dict.fromkeys((*cfg.retrieval, *(task_suite.uris(RETRIEVAL) if task_suite else ()))):
        found.append((RETRIEVAL, _discover_retrieval(uri)))
    if not found:
        raise ValueError("nothing to evaluate: evaluate.zeroshot, evaluate.retrieval and evaluate.suite are all empty")
    seen: dict[tuple[str, str], str] = {}
    for kind, dataset in found:
        if (kind, dataset.name) in seen:
            raise ValueError(
                f"two {kind} datasets are named {dataset.name!r} ({seen[kind, dataset.name]} and {dataset.uri}): "
                "their metrics would collide; rename a folder"
            )
        seen[kind, dataset.name] = dataset.uri
    num_found = len(found)
    if cfg.tasks:
        names = [dataset.name for _, dataset in found]
        unknown = [t for t in cfg.tasks if t not in names]
        if unknown:
            raise ValueError(f"evaluate.tasks names unknown datasets {unknown}; available: {', '.join(names)}")
        found = [(kind, dataset) for kind, dataset in found if dataset.name in cfg.tasks]
    return found, num_found


def _check_config(cfg: EvaluateConfig) -> None:
    if cfg.batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_samples < 0:
        raise ValueError(f"evaluate.max_samples must be >= 0 (0: all), got {cfg.max_samples}")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    model_name: str,
    cfg: EvaluateConfig,
    device: str | torch.device = "cpu",
    per_sample: bool = False,
) -> EvalReport:
    """Zero-shot classification and retrieval of ``model`` on the datasets of ``cfg``; see `evaluate_model`.

    Returns:
        The metrics and, per dataset, its kind, folder, sample count, skipped samples and its metrics under
        clip_benchmark's names (`metrics.clip_benchmark_names`); with ``per_sample``, the per-sample scores of
        the metrics that are means over samples (`EvalReport`).
    """
    _check_config(cfg)
    device = resolve_device(device)
    clip = _unwrap(model)
    preprocess = preprocess_of(clip)
    selected, num_found = _datasets(cfg)
    loaded = [_load(kind, dataset, cfg.max_samples, cfg.seed, preprocess) for kind, dataset in selected]
    bank = _BANKS[preprocess.key]

    was_training = clip.training
    clip.eval()
    try:
        # Every distinct image once, for all datasets together.
        rows = sorted({row for dataset in loaded for row in dataset.rows})
        position = {row: i for i, row in enumerate(rows)}
        image_batches = (
            preprocess.batch([bank.pixels[r] for r in rows[i : i + cfg.batch_size]], device)
            for i in range(0, len(rows), cfg.batch_size)
        )
        image_emb_ND = _encode(clip.encode_image, image_batches, device)

        results: dict[str, float] = {}
        scores: dict[str, stats.SampleScores] = {}
        described = []
        for dataset in loaded:
            index_N = torch.tensor([position[r] for r in dataset.rows], device=device)
            dataset_emb_ND = image_emb_ND[index_N]
            if dataset.kind == ZEROSHOT:
                assert dataset.task is not None
                part, hits, units = _zeroshot(clip, model_name, dataset, dataset_emb_ND, cfg.batch_size, device)
                num_classes = len(dataset.task.classnames)
                extra = {"num_classes": num_classes, "num_templates": len(dataset.task.templates)}
                extra["clip_benchmark"] = metrics.clip_benchmark_names(part, num_classes)
            else:
                part, hits, units = _retrieval(clip, model_name, dataset, dataset_emb_ND, cfg.batch_size, device)
                extra = {"num_captions": sum(len(c) for c in dataset.captions)}
                extra["clip_benchmark"] = metrics.clip_benchmark_names(part)
            results.update({metrics.metric_name(dataset.kind, dataset.name, k): v for k, v in part.items()})
            if per_sample:
                group = metrics.metric_name(dataset.kind, dataset.name)
                for k, hit in hits.items():
                    unit = units[k].cpu().numpy()
                    scores[metrics.metric_name(dataset.kind, dataset.name, k)] = stats.SampleScores(
                        group, hit.cpu().numpy().astype(np.float64), unit, dataset.num_samples
                    )
            described.append(
                {"kind": dataset.kind, "name": dataset.name, "uri": dataset.uri, "num_samples": dataset.num_samples}
                | extra
                | {"skipped": dataset.skipped}
            )
    finally:
        clip.train(was_training)

    top1 = [results[metrics.metric_name(ZEROSHOT, d.name, "top1")] for d in loaded if d.kind == ZEROSHOT]
    if top1:
        results[metrics.metric_name(ZEROSHOT, "mean_top1")] = sum(top1) / len(top1)
    recall = [results[metrics.metric_name(RETRIEVAL, d.name, "mean_recall")] for d in loaded if d.kind == RETRIEVAL]
    if recall:
        results[metrics.metric_name(RETRIEVAL, "mean_recall")] = sum(recall) / len(recall)
    if cfg.suite:
        task_suite = _suite(cfg.suite)
        by_dataset = {(d["kind"], d["name"]): d["clip_benchmark"] for d in described}
        if all((task.kind, task.name) in by_dataset for task in task_suite.tasks):  # not when tasks leaves some out
            results[metrics.metric_name(SUITE, task_suite.name, "mean")] = task_suite.aggregate(by_dataset)
    subset = len(selected) < num_found
    return EvalReport(
        _mark_partial(results, cfg, subset), described, {_partial_name(k, cfg, subset): v for k, v in scores.items()}
    )


def _partial_name(name: str, cfg: EvaluateConfig, subset: bool) -> str:
    """``name``, or ``partial/<name>`` when a full evaluation would not give its value (`_mark_partial`)."""
    means = {metrics.metric_name(ZEROSHOT, "mean_top1"), metrics.metric_name(RETRIEVAL, "mean_recall")}
    if cfg.max_samples > 0 or (subset and name in means):
        return metrics.metric_name(PARTIAL, *name.split("/"))
    return name


def _mark_partial(results: dict[str, float], cfg: EvaluateConfig, subset: bool) -> dict[str, float]:
    """Renames the metrics whose value a full evaluation would not give to ``partial/<name>``.

    With ``max_samples`` every metric is partial; with ``tasks`` naming fewer than all datasets, only the means over
    datasets are (each dataset's own metrics are whole). So a metric's plain name only ever holds a full
    evaluation's value, and the promotion gate, which reads the latest value of a plain name, cannot be moved by a
    quick partial evaluation logged after the full one.
    """
    return {_partial_name(k, cfg, subset): v for k, v in results.items()}


def _encode_tokens(clip: nn.Module, tokens_ML: Tensor, batch_size: int, device: torch.device) -> Tensor:
    batches = (tokens_ML[i : i + batch_size] for i in range(0, len(tokens_ML), batch_size))
    return _encode(clip.encode_text, batches, device)


def _zeroshot(
    clip: nn.Module,
    model_name: str,
    dataset: LoadedDataset,
    image_emb_ND: Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, Tensor], dict[str, Tensor]]:
    """The task's metrics, its per-image hits and, per hit, the image it belongs to."""
    task = dataset.task
    assert task is not None
    tokens_ML = _tokens(dataset, model_name)
    text_emb_MD = _encode_tokens(clip, tokens_ML, batch_size, device)
    num_classes, num_templates = len(task.classnames), len(task.templates)
    classifier_CD = metrics.classifier_weights(text_emb_MD.view(num_classes, num_templates, -1))
    logits_NC = torch.nn.functional.normalize(image_emb_ND, dim=-1) @ classifier_CD.T
    labels_N = torch.tensor(dataset.labels, device=device)
    hits = metrics.zeroshot_hits(logits_NC, labels_N)
    image_N = torch.arange(len(labels_N))
    return metrics.zeroshot_metrics(logits_NC, labels_N), hits, dict.fromkeys(hits, image_N)


def _retrieval(
    clip: nn.Module,
    model_name: str,
    dataset: LoadedDataset,
    image_emb_ND: Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, Tensor], dict[str, Tensor]]:
    """The set's recalls, per image and per caption whether it was found at k, and the image each belongs to."""
    text_image_M = torch.tensor([i for i, captions in enumerate(dataset.captions) for _ in captions], device=device)
    tokens_ML = _tokens(dataset, model_name)
    text_emb_MD = _encode_tokens(clip, tokens_ML, batch_size, device)
    hits = metrics.retrieval_hits(image_emb_ND, text_emb_MD, text_image_M)
    image_N = torch.arange(image_emb_ND.shape[0])
    units = {k: image_N if k.startswith("image_to_text") else text_image_M for k in hits}
    return metrics.recalls(hits), hits, units


def evaluate_model(model: nn.Module, model_name: str, cfg: EvaluateConfig, device: Any) -> dict[str, float]:
    """Zero-shot classification and image-text retrieval metrics of ``model`` on the datasets of ``cfg``.

    What training calls on rank 0 for periodic evaluation. The model must already be on ``device``; it is put
    in eval mode for the call and restored to its previous mode. On cuda the forward passes run under bf16
    autocast; embeddings and metrics are float32.

    Args:
        model: An open_clip model (or one wrapped in DDP, or a `clipdr.models.ClipEmbedder`), with the
            ``visual.preprocess_cfg`` open_clip attaches: images are preprocessed with it.
        model_name: Its open_clip / clipdr name (for the tokenizer).
        cfg: Datasets (``zeroshot``, ``retrieval``), ``tasks``, ``batch_size``, ``max_samples`` and ``seed``.
        device: Where the forward passes run.

    Returns:
        Flat, MLflow-safe metric names (fractions in [0, 1]): ``zeroshot/<task>/top1``, ``.../top5``,
        ``.../mean_per_class_recall``, ``zeroshot/mean_top1`` (over the tasks evaluated),
        ``retrieval/<name>/image_to_text_R{1,5,10}``, ``retrieval/<name>/text_to_image_R{1,5,10}``,
        ``retrieval/<name>/mean_recall`` (of those six), ``retrieval/mean_recall`` (over the datasets) and, with
        ``suite``, ``suite/<name>/mean`` (`clipdr.evaluate.suite`).
        A partial evaluation (``max_samples``, or ``tasks`` naming fewer than all datasets) names the metrics it
        could not compute in full ``partial/<name>`` (`_mark_partial`).
    """
    return evaluate(model, model_name, cfg, device).metrics


def sample_mean_weights(metric: str, names: Iterable[str]) -> dict[str, float]:
    """``metric`` as a weighted sum of metrics that are means over samples (``{name: weight}``), so that a bootstrap
    over evaluation samples can recompute it from `EvalReport.per_sample` (whose keys ``names`` are).

    A per-sample metric is itself (weight 1); ``zeroshot/mean_top1`` is the mean of the tasks' ``top1``; a
    retrieval set's ``mean_recall`` the mean of its six recalls, ``retrieval/mean_recall`` the mean of those
    over the sets; the same with a ``partial/`` prefix. ``mean_per_class_recall`` and suite means are not means
    over samples.

    Raises:
        ValueError: ``metric`` is none of these for the evaluated datasets.
    """
    partial = metrics.metric_name(PARTIAL) + "/"
    plain = {name.removeprefix(partial): name for name in names}  # names as a full evaluation spells them

    def leaves(prefix: str, suffixes: tuple[str, ...]) -> list[str]:
        return sorted(n for n in plain if n.startswith(prefix + "/") and n.endswith(suffixes))

    base = metric.removeprefix(partial)
    recalls = tuple(f"_R{k}" for k in metrics.RECALL_KS)
    if base in plain:
        found = {base: 1.0}
    elif base == metrics.metric_name(ZEROSHOT, "mean_top1"):
        tasks = leaves(ZEROSHOT, ("/top1",))
        found = {name: 1.0 / len(tasks) for name in tasks}
    elif base == metrics.metric_name(RETRIEVAL, "mean_recall"):
        sets = sorted({n.rsplit("/", 1)[0] for n in leaves(RETRIEVAL, recalls)})
        found = {}
        for prefix in sets:
            parts = leaves(prefix, recalls)
            found |= {name: 1.0 / (len(sets) * len(parts)) for name in parts}
    elif base.startswith(RETRIEVAL + "/") and base.endswith("/mean_recall"):
        parts = leaves(base.removesuffix("/mean_recall"), recalls)
        found = {name: 1.0 / len(parts) for name in parts}
    else:
        found = {}
    if not found:
        known = ", ".join(sorted(names)[:12])
        raise ValueError(
            f"metric {metric!r} is not a mean over evaluation samples of this evaluation (per-sample metrics: "
            f"{known}, ...; or zeroshot/mean_top1, retrieval/mean_recall, retrieval/<set>/mean_recall)"
        )
    return {plain[name]: weight for name, weight in found.items()}
