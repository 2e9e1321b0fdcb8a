"""Zero-shot classification and image-text retrieval metrics, from embeddings: pure tensor functions.

Shape suffixes: N images, C classes, T prompt templates, M texts (captions), D embedding dim.
Every metric is a fraction in [0, 1] (clip_benchmark's convention), returned as a plain float.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

RECALL_KS: tuple[int, ...] = (1, 5, 10)
# clipdr's name of each per-dataset metric -> clip_benchmark's (the keys of its zeroshot_classification.evaluate
# and zeroshot_retrieval.evaluate results, as in its result JSONs and the tables made from them). Its "image
# retrieval" finds images for a caption (text -> image), its "text retrieval" captions for an image. Equal values:
# tests/unit/test_eval_parity.py.
CLIP_BENCHMARK_NAMES: dict[str, str] = {
    "top1": "acc1",
    "top5": "acc5",
    "mean_per_class_recall": "mean_per_class_recall",
    **{f"image_to_text_R{k}": f"text_retrieval_recall@{k}" for k in RECALL_KS},
    **{f"text_to_image_R{k}": f"image_retrieval_recall@{k}" for k in RECALL_KS},
}
_UNSAFE = re.compile(r"[^\w.\-]+")  # MLflow metric names allow \w . - space : / ; "/" separates our levels


def metric_name(*parts: str) -> str:
    """A flat MLflow metric name ``a/b/c``; characters MLflow refuses (and ``/`` inside a part) become ``_``."""
    cleaned = [_UNSAFE.sub("_", part).strip("_") for part in parts]
    if not all(cleaned):
        raise ValueError(f"metric name parts must not be empty, got {parts!r}")
    return "/".join(cleaned)


def clip_benchmark_names(values: dict[str, float], num_classes: int | None = None) -> dict[str, float]:
    """One dataset's metrics under clip_benchmark's names (`CLIP_BENCHMARK_NAMES`).

    Below 5 classes clip_benchmark reports no top-5 (NaN) where clipdr's ``top5`` is top-C (1.0): it is left out.
    ``mean_recall`` (clipdr's mean of the six recalls) has no clip_benchmark name and is left out too.
    """
    few_classes = num_classes is not None and num_classes < 5
    return {
        CLIP_BENCHMARK_NAMES[name]: value
        for name, value in values.items()
        if name in CLIP_BENCHMARK_NAMES and not (few_classes and name == "top5")
    }


def classifier_weights(text_emb_CTD: Tensor) -> Tensor:
    """Zero-shot classifier: per class, the mean of its L2-normalised template embeddings, normalised again.

    Args:
        text_emb_CTD: Text embeddings of every (class, template) prompt, unnormalised.

    Returns:
        ``(C, D)`` float32 unit vectors.
    """
    if text_emb_CTD.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) text embeddings, got shape {tuple(text_emb_CTD.shape)}")
    emb_CTD = F.normalize(text_emb_CTD.float(), dim=-1)
    return F.normalize(emb_CTD.mean(dim=1), dim=-1)


def zeroshot_hits(logits_NC: Tensor, labels_N: Tensor) -> dict[str, Tensor]:
    """Per image, whether its class is the top-1 and among the top-5 scores: ``top1``, ``top5`` (float 0/1, ``(N,)``).

    `zeroshot_metrics`' accuracies are their means; a bootstrap over images resamples them (`clipdr.stats`).
    """
    num_images, num_classes = logits_NC.shape
    if labels_N.shape != (num_images,):
        raise ValueError(f"{num_images} images but labels of shape {tuple(labels_N.shape)}")
    if num_images == 0:
        raise ValueError("zero-shot metrics of no images")
    labels_N = labels_N.to(logits_NC.device).long()
    if int(labels_N.min()) < 0 or int(labels_N.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels_N.min())}, {int(labels_N.max())}]")
    top_NK = logits_NC.topk(min(5, num_classes), dim=1).indices
    hit_NK = top_NK == labels_N[:, None]
    return {"top1": hit_NK[:, 0].float(), "top5": hit_NK.any(dim=1).float()}


def zeroshot_metrics(logits_NC: Tensor, labels_N: Tensor) -> dict[str, float]:
    """Top-1, top-5 accuracy and mean per-class recall of classification scores.

    Args:
        logits_NC: Scores of every image for every class (any monotone scale: cosine similarities will do).
        labels_N: True class indices.

    Returns:
        ``top1``, ``top5`` (top-C when there are fewer than 5 classes) and ``mean_per_class_recall``: the top-1
        recall of each class that has images, averaged over those classes (balanced accuracy).
    """
    hits = zeroshot_hits(logits_NC, labels_N)
    num_classes = logits_NC.shape[1]
    labels_N = labels_N.to(logits_NC.device).long()
    correct1_N = hits["top1"]
    per_class_hits_C = torch.zeros(num_classes, device=logits_NC.device).index_add_(0, labels_N, correct1_N)
    per_class_count_C = torch.bincount(labels_N, minlength=num_classes).float()
    present_C = per_class_count_C > 0
    return {
        "top1": correct1_N.mean().item(),
        "top5": hits["top5"].mean().item(),
        "mean_per_class_recall": (per_class_hits_C[present_C] / per_class_count_C[present_C]).mean().item(),
    }


def retrieval_metrics(
    image_emb_ND: Tensor,
    text_emb_MD: Tensor,
    text_image_M: Tensor,
    ks: tuple[int, ...] = RECALL_KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k in both directions, for a caption set with any number of captions per image.

    Image-to-text: an image counts as found at k when any of its captions is among its k most similar texts.
    Text-to-image: a caption counts as found at k when its image is among its k most similar images. k larger
    than the candidate count is clamped to it (recall 1 there). Similarities are computed in row chunks so
    that memory stays bounded for COCO-sized sets (5k images x 25k captions).

    Args:
        image_emb_ND: Image embeddings (normalised or not: they are normalised here).
        text_emb_MD: Caption embeddings.
        text_image_M: For each caption, the index of its image.
        ks: The k of recall@k.
        chunk: Rows of the similarity matrix computed at once.

    Returns:
        ``image_to_text_R{k}`` and ``text_to_image_R{k}`` for every k, and ``mean_recall``: their mean.
    """
    return recalls(retrieval_hits(image_emb_ND, text_emb_MD, text_image_M, ks, chunk))


def recalls(hits: dict[str, Tensor]) -> dict[str, float]:
    """`retrieval_metrics` from `retrieval_hits`: each recall the mean of its hits, ``mean_recall`` their mean."""
    metrics = {name: hit.mean().item() for name, hit in hits.items()}
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieval_hits(
    image_emb_ND: Tensor,
    text_emb_MD: Tensor,
    text_image_M: Tensor,
    ks: tuple[int, ...] = RECALL_KS,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Per image (``image_to_text_R{k}``, ``(N,)``) and per caption (``text_to_image_R{k}``, ``(M,)``), whether it
    was found at k (float 0/1); `retrieval_metrics`' recalls are their means. Arguments as `retrieval_metrics`."""
    num_images, num_texts = image_emb_ND.shape[0], text_emb_MD.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval metrics need images and texts, got {num_images} images and {num_texts} texts")
    if text_image_M.shape != (num_texts,):
        raise ValueError(f"{num_texts} texts but text_image of shape {tuple(text_image_M.shape)}")
    device = image_emb_ND.device
    text_image_M = text_image_M.to(device).long()
    if int(text_image_M.min()) < 0 or int(text_image_M.max()) >= num_images:
        raise ValueError(f"text_image must index the {num_images} images")
    image_emb_ND = F.normalize(image_emb_ND.float(), dim=-1)
    text_emb_MD = F.normalize(text_emb_MD.to(device).float(), dim=-1)
    max_k_texts, max_k_images = min(max(ks), num_texts), min(max(ks), num_images)

    # Rank at which each image first finds one of its captions (0-based), and each caption its image.
    first_hit_N = torch.empty(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, chunk):
        sim_nM = image_emb_ND[start : start + chunk] @ text_emb_MD.T
        top_nK = sim_nM.topk(max_k_texts, dim=1).indices
        image_n = torch.arange(start, start + sim_nM.shape[0], device=device)
        hit_nK = text_image_M[top_nK] == image_n[:, None]
        first_hit_N[start : start + sim_nM.shape[0]] = _first_true(hit_nK)
    first_hit_M = torch.empty(num_texts, dtype=torch.long, device=device)
    for start in range(0, num_texts, chunk):
        sim_mN = text_emb_MD[start : start + chunk] @ image_emb_ND.T
        top_mK = sim_mN.topk(max_k_images, dim=1).indices
        hit_mK = top_mK == text_image_M[start : start + sim_mN.shape[0], None]
        first_hit_M[start : start + sim_mN.shape[0]] = _first_true(hit_mK)

    hits = {f"image_to_text_R{k}": (first_hit_N < k).float() for k in ks}
    hits |= {f"text_to_image_R{k}": (first_hit_M < k).float() for k in ks}
    return hits


def _first_true(hit_nK: Tensor) -> Tensor:
    """Index of the first True of each row; K (past the end) for rows without one."""
    num_k = hit_nK.shape[1]
    position_nK = torch.arange(num_k, device=hit_nK.device).expand_as(hit_nK)
    return torch.where(hit_nK, position_nK, num_k).min(dim=1).values
