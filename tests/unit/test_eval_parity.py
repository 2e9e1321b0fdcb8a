"""clipdr's evaluation metrics equal clip_benchmark's (PyPI ``clip-benchmark``, its own functions).

clip_benchmark is installed without its dependencies (`make setup`): its metric modules need torch, tqdm and
scikit-learn only, and its declared ``transformers`` would be imported by open_clip in every process.

Float tolerances: a metric is a count over a count. clip_benchmark divides in float64, clipdr in float32 (one
rounding: a relative error of at most float32's unit roundoff u = eps / 2); a mean over C classes adds at most
C roundings of values in [0, 1].

clip_benchmark 1.6.2's ``accuracy`` converts a 1-element array with ``float()``, which NumPy 2.4 (clipdr's pin)
refuses ("only 0-dimensional arrays can be converted to Python scalars"), so its zero-shot ``evaluate`` fails on
this stack. The tests run its own code with only that conversion made NumPy-2.4-safe (`_numpy24`).
"""

from __future__ import annotations

import builtins
import io
import types

import numpy as np
import pytest
import torch
from clip_benchmark.datasets.builder import image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # not skipped: make setup installs it
from PIL import Image
from torch.utils.data import DataLoader

from clipdr import models
from clipdr.config import EvaluateConfig
from clipdr.data import sources
from clipdr.evaluate import engine, metrics

MODEL = "clipdr-tiny-vit"
UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2


def _float(value):
    return value.item() if isinstance(value, np.ndarray) else builtins.float(value)


def _numpy24(function, **names):
    """``function``'s own code with ``float`` made NumPy-2.4-safe and other module globals replaced by ``names``."""
    globals_ = {**function.__globals__, "float": _float, **names}
    return types.FunctionType(function.__code__, globals_, function.__name__, function.__defaults__)


accuracy = _numpy24(zeroshot_classification.accuracy)
evaluate_classification = _numpy24(zeroshot_classification.evaluate, accuracy=accuracy)


def close(clipdr_value: float, reference: float, roundings: int = 1) -> bool:
    return abs(clipdr_value - reference) <= roundings * UNIT_ROUNDOFF * max(abs(reference), 1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.create_model(MODEL).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return models.get_tokenizer(MODEL)


def noise_images(num: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (num, 40, 40, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


class ClassificationSet(torch.utils.data.Dataset):
    """(preprocessed image, label), with the ``classes`` clip_benchmark's evaluate reads."""

    def __init__(self, pixels, labels, classes):
        self.pixels, self.labels, self.classes = pixels, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.pixels[i], self.labels[i]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the class without images
@pytest.mark.parametrize("num_classes", [3, 12])
def test_random_logits_give_clip_benchmarks_accuracy_and_balanced_accuracy(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    labels_N = torch.randint(0, num_classes - 1, (301,), generator=generator)  # the last class has no images
    logits_NC = torch.randn(301, num_classes, generator=generator)
    logits_NC[torch.arange(0, 301, 3), labels_N[::3]] += 1.0  # better than chance, not perfect
    ours = metrics.clip_benchmark_names(metrics.zeroshot_metrics(logits_NC, labels_N), num_classes)

    topk = (1, 5) if num_classes >= 5 else (1,)
    reference = dict(zip(("acc1", "acc5"), accuracy(logits_NC, labels_N, topk), strict=False))
    reference["mean_per_class_recall"] = zeroshot_classification.balanced_accuracy_score(
        labels_N, logits_NC.argmax(axis=1)
    )
    assert ours.keys() == reference.keys()  # no acc5 below 5 classes, as clip_benchmark (NaN there)
    assert close(ours["acc1"], reference["acc1"])
    if "acc5" in reference:
        assert close(ours["acc5"], reference["acc5"])
    assert close(ours["mean_per_class_recall"], reference["mean_per_class_recall"], roundings=num_classes + 1)


def test_retrieval_equals_clip_benchmarks_on_a_real_model(model, tokenizer):
    images = noise_images(24, seed=2)
    words = ["red", "round", "small", "shiny", "old", "wet", "tall", "dark"]
    captions = [[f"{words[i % 8]} {words[(i * j + 3) % 8]} thing {i}" for j in range(1 + i % 3)] for i in range(24)]
    preprocess = engine.preprocess_of(model)
    pixels = [preprocess.batch([preprocess.to_pixels(im)], "cpu")[0] for im in images]
    loader = DataLoader(list(zip(pixels, captions, strict=True)), batch_size=8, collate_fn=image_captions_collate_fn)
    ks = list(metrics.RECALL_KS)
    reference = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=ks)

    # The same forward passes on the same batches: the same embeddings.
    with torch.inference_mode():
        image_emb_ND = torch.cat([model.encode_image(batch) for batch, _ in loader])
        text_emb_MD = torch.cat([model.encode_text(tokenizer([c for cs in texts for c in cs])) for _, texts in loader])
    text_image_M = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    ours = metrics.clip_benchmark_names(metrics.retrieval_metrics(image_emb_ND, text_emb_MD, text_image_M))
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        assert close(ours[name], value), name
    assert 0 < ours["image_retrieval_recall@5"] < ours["image_retrieval_recall@10"] < 1  # not trivially 0 or 1


def test_zeroshot_classification_equals_clip_benchmarks_on_a_real_model(model, tokenizer, tmp_path):
    """clipdr reads the task from clip_benchmark's layout; clip_benchmark's evaluate gets the same images through
    the same preprocessing. On clip_benchmark's own logits clipdr's metrics are equal to rounding; end to end the
    embeddings are computed in other batches, so they may differ in the last bits, and the metrics (counts) stay
    equal unless two scores tie to within that (checked)."""
    classes, templates = ["apple", "boat", "cat", "dog", "egg", "fig"], ["a photo of a {c}.", "{c}", "a {c} thing"]
    images = noise_images(24, seed=3)
    labels = [i % len(classes) for i in range(len(images))]
    root = tmp_path / "wds_toy"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    members = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image.save(buffer := io.BytesIO(), format="PNG")
        members.append((f"s{i:04d}", {"png": buffer.getvalue(), "cls": str(label).encode()}))
    sources.write_tar_shard(str(root / "test" / "0.tar"), members)
    engine.clear_cache()
    report = engine.evaluate(model, MODEL, EvaluateConfig(zeroshot=(str(root),), batch_size=7), "cpu")
    engine.clear_cache()

    # clip_benchmark's evaluate, and the logits of the classifier it built (saved by it), on the same model and images.
    preprocess = engine.preprocess_of(model)
    pixels = [preprocess.batch([preprocess.to_pixels(im)], "cpu")[0] for im in images]
    loader = DataLoader(ClassificationSet(pixels, labels, classes), batch_size=8)
    saved = str(tmp_path / "classifier.pt")
    reference = evaluate_classification(model, loader, tokenizer, classes, templates, "cpu", amp=False, save_clf=saved)
    classifier_DC = torch.load(saved)
    logits_NC, target_N = zeroshot_classification.run_classification(model, classifier_DC, loader, "cpu", amp=False)

    # The classifier: clipdr's from all prompts in one batch, clip_benchmark's class by class.
    with torch.inference_mode():
        prompts = [t.replace("{c}", c) for c in classes for t in templates]
        text_emb_CTD = model.encode_text(tokenizer(prompts)).view(len(classes), len(templates), -1)
    ours_CD = metrics.classifier_weights(text_emb_CTD)
    # Unit vectors: the template mean and two normalisations are a few roundings per element, each at most
    # UNIT_ROUNDOFF, and the D-term norms add up to sqrt(D) of them.
    assert torch.allclose(ours_CD, classifier_DC.T, rtol=0, atol=16 * UNIT_ROUNDOFF * text_emb_CTD.shape[-1] ** 0.5)

    ours = metrics.clip_benchmark_names(metrics.zeroshot_metrics(logits_NC, target_N), len(classes))
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        assert close(ours[name], value, roundings=len(classes) + 1), name
    assert 0 < reference["acc1"] < reference["acc5"] < 1  # neither trivial

    scores_NC = (logits_NC / 100).sort(dim=1, descending=True).values
    assert (scores_NC[:, :-1] - scores_NC[:, 1:]).min() > 64 * UNIT_ROUNDOFF  # no near-tie a batch could flip
    (described,) = report.datasets
    assert described["clip_benchmark"].keys() == reference.keys()
    for name, value in reference.items():
        assert close(described["clip_benchmark"][name], value, roundings=len(classes) + 1), name
