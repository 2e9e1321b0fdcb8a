"""Evaluation: metrics on hand-computed cases, the clip_benchmark layout, caching, preprocessing, model loading."""

from __future__ import annotations

import collections
import io
import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from clipdr import checkpoint, models
from clipdr.config import EvaluateConfig, SynthConfig
from clipdr.data import sources, synthetic
from clipdr.evaluate import datasets, engine, loading, metrics, suite

TOKENIZER_MODEL = "clipdr-tiny-vit"  # any open_clip tokenizer will do for the hand-set model


@pytest.fixture(autouse=True)
def _fresh_cache():
    engine.clear_cache()
    yield
    engine.clear_cache()


# --------------------------------------------------------------------------- metrics, by hand


def test_classifier_normalises_each_template_before_averaging():
    text_emb_CTD = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 1.0]]])
    weights_CD = metrics.classifier_weights(text_emb_CTD)
    s = 1 / math.sqrt(2)
    assert torch.allclose(weights_CD, torch.tensor([[s, s], [0.0, 1.0]]))  # unnormalised mean would be (1, .5)


def test_zeroshot_metrics_by_hand():
    labels_N = torch.tensor([0, 1, 2, 2])
    logits_NC = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # class 0 first: top-1 hit
            [5.0, 0, 1, 2, 3, 4],  # class 1 last of 6: misses top-1 and top-5
            [5.0, 1, 4, 0, 2, 3],  # class 2 second: top-5 hit only
            [0.0, 1, 9, 2, 3, 4],  # class 2 first
        ]
    )
    result = metrics.zeroshot_metrics(logits_NC, labels_N)
    assert result["top1"] == pytest.approx(2 / 4)
    assert result["top5"] == pytest.approx(3 / 4)
    # Per class present: class 0: 1/1, class 1: 0/1, class 2: 1/2; classes 3-5 have no images and do not count.
    assert result["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_zeroshot_metrics_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        metrics.zeroshot_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))


@pytest.mark.parametrize("chunk", [1, 1024])
def test_retrieval_metrics_with_several_captions_per_image(chunk):
    image_emb_ND = torch.eye(3)
    text_emb_MD = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # image 0
            [0.1, 0.0, 0.9],  # image 0, but closer to image 2
            [0.0, 0.9, 0.3],  # image 1
            [0.0, 0.8, 0.5],  # image 2, but closer to image 1
            [0.3, 0.0, 0.8],  # image 2
        ]
    )
    text_image_M = torch.tensor([0, 0, 1, 2, 2])
    result = metrics.retrieval_metrics(image_emb_ND, text_emb_MD, text_image_M, ks=(1, 2), chunk=chunk)
    # Image 2 ranks image 0's second caption first, its own second: found at 2 only.
    assert result["image_to_text_R1"] == pytest.approx(2 / 3)
    assert result["image_to_text_R2"] == pytest.approx(1.0)
    # Captions 1 and 3 rank another image first and their own second.
    assert result["text_to_image_R1"] == pytest.approx(3 / 5)
    assert result["text_to_image_R2"] == pytest.approx(1.0)
    assert result["mean_recall"] == pytest.approx((2 / 3 + 1 + 3 / 5 + 1) / 4)


def test_metric_names_are_mlflow_safe():
    assert metrics.metric_name("zeroshot", "wds/imagenet 1k@v2", "top1") == "zeroshot/wds_imagenet_1k_v2/top1"


# --------------------------------------------------------------------------- a clip_benchmark layout on disk


def png(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_task(root, classnames, templates, samples, shard_size=2):
    """A clip_benchmark zero-shot task folder; ``samples`` are (rgb, label) pairs."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        members = [
            (f"s{i:04d}", {"png": png(rgb), "cls": str(label).encode()})
            for i, (rgb, label) in enumerate(samples[start : start + shard_size], start)
        ]
        sources.write_tar_shard(str(root / "test" / f"{shard}.tar"), members)
    (root / "test" / "nshards.txt").write_text(f"{math.ceil(len(samples) / shard_size)}\n")
    return str(root)


def write_retrieval(root, samples):
    """A clip_benchmark retrieval folder; ``samples`` are (rgb, captions) pairs, captions in .txt lines."""
    (root / "test").mkdir(parents=True)
    members = [
        (f"r{i:04d}", {"png": png(rgb), "txt": "\n".join(captions).encode()})
        for i, (rgb, captions) in enumerate(samples)
    ]
    sources.write_tar_shard(str(root / "test" / "0.tar"), members)
    return str(root)


def test_finds_tasks_in_clip_benchmark_layout_and_reads_them(tmp_path):
    samples = [((255, 0, 0), 0), ((0, 255, 0), 1), ((0, 0, 255), 2)] * 4
    write_task(tmp_path / "zs" / "wds_colours", ["red", "green", "blue"], ["a {c}.", "{c}"], samples, shard_size=1)
    write_task(tmp_path / "zs" / "second", ["a", "b", "c"], ["{c}"], samples[:3])
    (tasks_uri, task_uri) = (str(tmp_path / "zs"), str(tmp_path / "zs" / "wds_colours"))

    tasks = datasets.find_zeroshot_tasks(tasks_uri)
    assert [t.name for t in tasks] == ["colours", "second"]  # clip_benchmark's wds_ prefix dropped
    assert [t.name for t in datasets.find_zeroshot_tasks(task_uri)] == ["colours"]  # a task folder itself
    colours = tasks[0]
    assert colours.prompts()[:3] == ["a red.", "red", "a green."]
    # 12 shards 0..11: numeric order, not 0, 1, 10, 11, 2, ...
    assert [s.rsplit("/", 1)[1] for s in colours.shards][:4] == ["0.tar", "1.tar", "2.tar", "3.tar"]

    skipped = collections.Counter()
    read = list(datasets.iter_zeroshot_samples(colours, skipped))
    assert [s.label for s in read] == [0, 1, 2] * 4
    assert [s.key for s in read] == [f"s{i:04d}" for i in range(12)]
    assert not skipped


def test_max_samples_draws_a_seeded_subset_stratified_by_class(tmp_path):
    # In class order, as clip_benchmark exports ImageNet: the first 4 samples would all be class 0.
    samples = [((40 * label, 0, 0), label) for label in range(4) for _ in range(3)]
    (task,) = datasets.find_zeroshot_tasks(write_task(tmp_path / "ordered", list("abcd"), ["{c}"], samples))
    skipped = collections.Counter()
    read = list(datasets.iter_zeroshot_samples(task, skipped, max_samples=4, seed=1))
    assert sorted(s.label for s in read) == [0, 1, 2, 3]  # one of each class's three
    assert [s.key for s in read] == sorted(s.key for s in read)  # in reading order
    assert not skipped
    again = list(datasets.iter_zeroshot_samples(task, collections.Counter(), max_samples=4, seed=1))
    assert [s.key for s in again] == [s.key for s in read]
    draws = {
        tuple(s.key for s in datasets.iter_zeroshot_samples(task, collections.Counter(), max_samples=4, seed=seed))
        for seed in range(4)
    }
    assert len(draws) > 1  # the seed chooses which member of each class
    pairs = datasets.find_retrieval_set(write_retrieval(tmp_path / "pairs", [((i, 0, 0), [f"c{i}"]) for i in range(9)]))
    subset = [s.key for s in datasets.iter_retrieval_samples(pairs, collections.Counter(), max_samples=3, seed=5)]
    assert len(subset) == 3 and subset == sorted(subset)
    assert subset == [s.key for s in datasets.iter_retrieval_samples(pairs, collections.Counter(), 3, seed=5)]


@pytest.mark.parametrize("counts", [(50, 30, 15, 5), (7, 7, 7), (1, 1, 98), (3,)])
@pytest.mark.parametrize("max_samples", [1, 2, 10, 20, 33])
def test_stratified_subset_keeps_each_class_share(counts, max_samples):
    labels = [label for label, count in enumerate(counts) for _ in range(count)]  # class order
    chosen = datasets.stratified_subset(labels, max_samples, seed=3)
    assert len(chosen) == min(max_samples, len(labels)) and chosen == sorted(set(chosen))
    per_class = collections.Counter(labels[i] for i in chosen)
    for label, count in enumerate(counts):
        share = count * len(chosen) / len(labels)
        assert math.floor(share) <= per_class[label] <= math.ceil(share), (label, per_class)
    assert chosen == datasets.stratified_subset(labels, max_samples, seed=3)
    assert datasets.stratified_subset(labels, 0, seed=3) == list(range(len(labels)))


def test_zeroshot_label_outside_classes_names_shard_and_key(tmp_path):
    task_uri = write_task(tmp_path / "bad", ["red", "green"], ["{c}"], [((255, 0, 0), 0), ((0, 255, 0), 7)])
    (task,) = datasets.find_zeroshot_tasks(task_uri)
    with pytest.raises(ValueError, match=r"0\.tar: sample 's0001' has label 7, outside the 2 classes"):
        list(datasets.iter_zeroshot_samples(task, collections.Counter()))


def test_missing_layout_pieces_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.find_zeroshot_tasks(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no zero-shot task"):
        datasets.find_zeroshot_tasks(str(tmp_path / "empty"))
    task = tmp_path / "notemplates"
    task.mkdir()
    (task / "classnames.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"zeroshot_classification_templates\.txt"):
        datasets.find_zeroshot_tasks(str(task))
    with pytest.raises(ValueError, match="no tar shards"):
        datasets.find_retrieval_set(str(tmp_path / "empty"))


def test_retrieval_captions_from_txt_lines_or_json(tmp_path):
    root = tmp_path / "flickr"
    root.mkdir()
    members = [
        ("a", {"jpg": png((1, 2, 3)), "txt": b"first caption\n\nsecond caption\n", "json": b'{"scene": 1}'}),
        ("b", {"png": png((4, 5, 6)), "json": json.dumps({"captions": ["one", "two", "three"]}).encode()}),
        ("c", {"png": png((7, 8, 9)), "json": json.dumps(["only"]).encode()}),
        ("d", {"png": png((7, 8, 9))}),  # no caption: skipped
    ]
    sources.write_tar_shard(str(root / "0.tar"), members)
    dataset = datasets.find_retrieval_set(str(root))
    skipped = collections.Counter()
    read = list(datasets.iter_retrieval_samples(dataset, skipped))
    assert [s.captions for s in read] == [("first caption", "second caption"), ("one", "two", "three"), ("only",)]
    assert skipped == {"missing_caption": 1}


# --------------------------------------------------------------------------- end to end on a hand-set model


class HandSetClip(nn.Module):
    """Image embedding = mean RGB of the (unnormalised) input; text embeddings looked up from a table."""

    def __init__(self, text_vectors: dict[str, tuple[float, ...]]) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.preprocess_cfg = {
            "size": 8,
            "mode": "RGB",
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "interpolation": "bilinear",
            "resize_mode": "shortest",
            "fill_color": 0,
        }
        tokenizer = models.get_tokenizer(TOKENIZER_MODEL)
        self.table = {tuple(tokenizer([t])[0].tolist()): torch.tensor(v) for t, v in text_vectors.items()}
        self.calls = collections.Counter()

    def encode_image(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        self.calls["image"] += len(image_BCHW)
        return image_BCHW.mean(dim=(2, 3))

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        self.calls["text"] += len(tokens_BL)
        return torch.stack([self.table[tuple(row.tolist())] for row in tokens_BL.cpu()])


# Classifiers (mean of normalised template embeddings): red ~ (.949, .316, 0), green ~ (0, .707, .707), blue (0, 0, 1).
PROMPTS = {
    "a red thing.": (1.0, 0.0, 0.0),
    "red": (0.8, 0.6, 0.0),
    "a green thing.": (0.0, 1.0, 0.0),
    "green": (0.0, 0.0, 1.0),
    "a blue thing.": (0.0, 0.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
}
ZEROSHOT_SAMPLES = [
    ((255, 0, 0), 0),  # red -> red
    ((0, 255, 0), 1),  # green -> green (.707 vs red .316)
    ((0, 0, 255), 2),  # blue -> blue (1 vs green .707)
    ((0, 0, 255), 1),  # labelled green, predicted blue: the one top-1 miss (green is second)
    ((0, 153, 204), 1),  # (0, .6, .8) -> green .99 vs blue .8
    ((153, 204, 0), 0),  # (.6, .8, 0) -> red .82 vs green .57
]
# Image rows x caption columns of cosine similarities (captions: crimson, scarlet -> image 0; lime -> 1; teal -> 2):
#   image 0 (1, 0, 0):     1    .6   0    0      finds a caption of its own first
#   image 1 (0, 1, 0):     0    .8   .8   1      ranks teal (image 2's) first
#   image 2 (0, .6, .8):   0    .48  .96  .6     ranks lime (image 1's) first
CAPTIONS = {"crimson": (1.0, 0.0, 0.0), "scarlet": (0.6, 0.8, 0.0), "lime": (0.0, 0.8, 0.6), "teal": (0.0, 1.0, 0.0)}
RETRIEVAL_SAMPLES = [((255, 0, 0), ["crimson", "scarlet"]), ((0, 255, 0), ["lime"]), ((0, 153, 204), ["teal"])]


@pytest.fixture
def hand_set(tmp_path):
    task = write_task(tmp_path / "colours", ["red", "green", "blue"], ["a {c} thing.", "{c}"], ZEROSHOT_SAMPLES)
    retrieval = write_retrieval(tmp_path / "wds_pairs", RETRIEVAL_SAMPLES)
    model = HandSetClip({**PROMPTS, **CAPTIONS})
    return model, EvaluateConfig(zeroshot=(task,), retrieval=(retrieval,), batch_size=4)


def test_evaluate_model_by_hand(hand_set):
    model, cfg = hand_set
    result = engine.evaluate_model(model, TOKENIZER_MODEL, cfg, "cpu")
    expected = {
        "zeroshot/colours/top1": 5 / 6,
        "zeroshot/colours/top5": 1.0,  # top-3 of 3 classes
        "zeroshot/colours/mean_per_class_recall": (1 + 2 / 3 + 1) / 3,
        "zeroshot/mean_top1": 5 / 6,
        "retrieval/pairs/image_to_text_R1": 1 / 3,
        "retrieval/pairs/image_to_text_R5": 1.0,  # k clamped to the 4 captions
        "retrieval/pairs/image_to_text_R10": 1.0,
        "retrieval/pairs/text_to_image_R1": 1 / 4,  # only "crimson" ranks its image first
        "retrieval/pairs/text_to_image_R5": 1.0,
        "retrieval/pairs/text_to_image_R10": 1.0,
    }
    expected["retrieval/pairs/mean_recall"] = sum(v for k, v in expected.items() if "_R" in k) / 6
    expected["retrieval/mean_recall"] = expected["retrieval/pairs/mean_recall"]
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def test_repeated_calls_reuse_images_and_recompute_texts(hand_set, monkeypatch):
    model, cfg = hand_set
    first = engine.evaluate_model(model, TOKENIZER_MODEL, cfg, "cpu")

    def no_reading(*args, **kwargs):
        raise AssertionError("images were read again")

    monkeypatch.setattr(datasets, "iter_zeroshot_samples", no_reading)
    monkeypatch.setattr(datasets, "iter_retrieval_samples", no_reading)
    # Weights change between calls in training: swap blue's prompts so the classifier must be rebuilt.
    tokenizer = models.get_tokenizer(TOKENIZER_MODEL)
    for prompt in ("a blue thing.", "blue"):
        model.table[tuple(tokenizer([prompt])[0].tolist())] = torch.tensor([1.0, 0.0, 0.0])
    second = engine.evaluate_model(model, TOKENIZER_MODEL, cfg, "cpu")
    assert second["zeroshot/colours/top1"] < first["zeroshot/colours/top1"]
    assert second["retrieval/pairs/mean_recall"] == first["retrieval/pairs/mean_recall"]
    # 9 samples but 5 distinct images (same bytes: the retrieval images repeat zero-shot ones): each embedded once.
    distinct = {rgb for rgb, _ in ZEROSHOT_SAMPLES + RETRIEVAL_SAMPLES}
    assert len(distinct) == 5 and model.calls["image"] == 2 * len(distinct)


def test_a_task_suite_gives_one_aggregate_of_local_toy_tasks(hand_set, tmp_path):
    model, cfg = hand_set
    (tmp_path / "suites").mkdir()
    toy = tmp_path / "suites" / "toy.toml"
    toy.write_text(
        'root = ".."\n'  # task roots relative to the suite file's folder's parent: tmp_path
        '[[task]]\nroot = "colours"\nkind = "zeroshot"\nmetric = "acc1"\n'
        '[[task]]\nroot = "wds_pairs"\nkind = "retrieval"\n'
        'metric = ["image_retrieval_recall@1", "text_retrieval_recall@1"]\n'
    )
    only_suite = EvaluateConfig(suite=str(toy), batch_size=4)
    result = engine.evaluate_model(model, TOKENIZER_MODEL, only_suite, "cpu")
    full = engine.evaluate_model(model, TOKENIZER_MODEL, cfg, "cpu")
    assert {k: v for k, v in result.items() if not k.startswith("suite/")} == full  # the same datasets
    # colours: top-1 5/6; pairs: text -> image R@1 1/4, image -> text R@1 1/3 (test_evaluate_model_by_hand).
    assert result["suite/toy/mean"] == pytest.approx((5 / 6 + (1 / 4 + 1 / 3) / 2) / 2, abs=1e-6)
    both = EvaluateConfig(**{**vars(cfg), "suite": str(toy)})  # datasets named in both places are read once
    assert engine.evaluate_model(model, TOKENIZER_MODEL, both, "cpu") == result
    some = EvaluateConfig(**{**vars(both), "tasks": ("colours",)})
    assert not any(k.startswith("suite/") for k in engine.evaluate_model(model, TOKENIZER_MODEL, some, "cpu"))

    toy.write_text('root = ".."\n[[task]]\nroot = "colours"\nmetric = "acc5"\n')
    engine.clear_cache()
    with pytest.raises(ValueError, match=r"task 'colours' has no \['acc5'\]"):  # 3 classes: no acc5
        engine.evaluate_model(model, TOKENIZER_MODEL, only_suite, "cpu")
    toy.write_text('[[task]]\nroot = "colours"\nmetric = "top1"\n')
    with pytest.raises(ValueError, match=r"unknown metrics \['top1'\]"):  # clip_benchmark's names only
        suite.load_suite(str(toy))


def test_tasks_subset_and_unknown_names(hand_set):
    model, cfg = hand_set
    only = engine.evaluate_model(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "tasks": ("pairs",)}), "cpu")
    assert all(k.startswith(("retrieval/", "partial/retrieval/")) for k in only)  # the mean of 1 of 2: partial/
    with pytest.raises(ValueError, match=r"unknown datasets \['imagenet'\]; available: colours, pairs"):
        engine.evaluate_model(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "tasks": ("imagenet",)}), "cpu")
    with pytest.raises(ValueError, match="all empty"):
        engine.evaluate_model(model, TOKENIZER_MODEL, EvaluateConfig(), "cpu")


def test_max_samples_evaluates_a_subset(hand_set):
    model, cfg = hand_set
    report = engine.evaluate(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "max_samples": 2}), "cpu")
    assert [d["num_samples"] for d in report.datasets] == [2, 2]
    assert "partial/zeroshot/colours/top1" in report.metrics


def test_a_partial_evaluation_leaves_the_full_metric_names_alone(hand_set):
    model, cfg = hand_set
    full = engine.evaluate(model, TOKENIZER_MODEL, cfg, "cpu").metrics
    first_two = engine.evaluate(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "max_samples": 2}), "cpu")
    assert set(first_two.metrics) == {f"partial/{name}" for name in full}  # every value is of 2 samples
    one_task = engine.evaluate(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "tasks": ("colours",)}), "cpu")
    # The task's own metrics are whole; the mean over datasets is not the mean over all of them.
    assert one_task.metrics == {
        **{k: v for k, v in full.items() if k.startswith("zeroshot/colours/")},
        "partial/zeroshot/mean_top1": full["zeroshot/colours/top1"],
    }
    every_task = EvaluateConfig(**{**vars(cfg), "tasks": ("colours", "pairs")})
    assert engine.evaluate(model, TOKENIZER_MODEL, every_task, "cpu").metrics == full


def test_the_gate_reads_the_full_evaluation_not_a_later_partial_one(hand_set, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from clipdr import lifecycle, tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    model, cfg = hand_set
    full = engine.evaluate(model, TOKENIZER_MODEL, cfg, "cpu").metrics
    quick = engine.evaluate(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "max_samples": 2}), "cpu").metrics
    with tracking.Tracker.start("clipdr-train", "student") as tracker:
        tracker.log_metrics(full, step=64)  # the final, full evaluation
        tracker.log_metrics(quick, step=128)  # a quick look afterwards, later in the run
    client = MlflowClient(tracking.tracking_uri())
    client.create_registered_model("student")
    client.create_model_version("student", f"runs:/{tracker.run_id}/model", run_id=tracker.run_id)
    decision = lifecycle.promote("student", "1", "zeroshot/mean_top1")
    assert decision.candidate_value == pytest.approx(full["zeroshot/mean_top1"]) == 5 / 6


# --------------------------------------------------------------------------- real tiny models, the world's splits


@pytest.mark.parametrize("name", ["clipdr-tiny-mci", "clipdr-tiny-vit"])
def test_cached_pixels_match_the_models_own_transform(name):
    _, _, transform = models.create_model_and_transforms(name)
    model = models.create_model(name)
    preprocess = engine.preprocess_of(model)
    assert preprocess.mean is not None  # the uint8 cache applies
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    cached = preprocess.batch([preprocess.to_pixels(image)], torch.device("cpu"))[0]
    assert torch.equal(cached, transform(image))


def test_world_splits_with_a_tiny_model_share_images_across_tasks(tmp_path):
    world = SynthConfig(output=str(tmp_path / "world"), num_teacher=0, num_student=0, num_zeroshot=24, num_retrieval=12)
    synthetic.generate(world)
    cfg = EvaluateConfig(zeroshot=(f"{world.output}/zeroshot",), retrieval=(f"{world.output}/retrieval",))
    torch.manual_seed(0)
    model = models.create_model("clipdr-tiny-vit")
    model.train()
    result = engine.evaluate_model(model, "clipdr-tiny-vit", cfg, "cpu")
    assert model.training  # mode restored
    assert {f"zeroshot/{task}/top1" for task in synthetic.TASKS} <= result.keys()
    assert "retrieval/retrieval/text_to_image_R10" in result and "zeroshot/mean_top1" in result
    assert all(0.0 <= v <= 1.0 for v in result.values())
    # Seven tasks show the same 24 images: stored (and embedded) once, next to the 12 retrieval images.
    (bank,) = engine._BANKS.values()
    assert len(bank.pixels) == 24 + 12


# --------------------------------------------------------------------------- loading models


def _checkpoint(folder, name, step, run_id="run-abc"):
    folder.mkdir(parents=True)
    model = models.create_model(name)
    meta = checkpoint.CheckpointMeta(name, "clip", "run", run_id, step, step * 8, step, 10)
    checkpoint.save(folder, model.state_dict(), meta)
    return model


def test_load_checkpoint_folder_and_latest_of_a_run_folder(tmp_path):
    _checkpoint(tmp_path / "run" / "checkpoint_a", "clipdr-tiny-vit", step=5)
    newest = _checkpoint(tmp_path / "run" / "checkpoint_b", "clipdr-tiny-vit", step=10)
    loaded = loading.load(str(tmp_path / "run"))
    assert (loaded.kind, loaded.name, loaded.run_id, loaded.samples_seen) == (
        "checkpoint",
        "clipdr-tiny-vit",
        "run-abc",
        80,
    )
    assert loaded.source.endswith("checkpoint_b") and not loaded.model.training
    for key, value in newest.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_load_errors_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"not an MLflow model URI .* or a known model name"):
        loading.load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a training checkpoint"):
        loading.load(str(tmp_path / "empty"))
    _checkpoint(tmp_path / "ckpt", "clipdr-tiny-vit", step=1)
    with pytest.raises(ValueError, match="pretrained='x' only applies to a model name"):
        loading.load(str(tmp_path / "ckpt"), pretrained="x")


def test_per_sample_scores_are_what_each_metric_is_the_mean_of(hand_set):
    model, cfg = hand_set
    plain = engine.evaluate(model, TOKENIZER_MODEL, cfg, "cpu")
    report = engine.evaluate(model, TOKENIZER_MODEL, cfg, "cpu", per_sample=True)
    assert report.metrics == plain.metrics and not plain.per_sample  # asking for them changes no value
    scores = report.per_sample
    # By hand (the tables above): the fourth zero-shot image is the one miss; image 0 finds its caption first;
    # crimson, the first caption, is the only one to rank its image first; scarlet belongs to image 0 too.
    assert scores["zeroshot/colours/top1"].values.tolist() == [1, 1, 1, 0, 1, 1]
    assert scores["retrieval/pairs/image_to_text_R1"].values.tolist() == [1, 0, 0]
    assert scores["retrieval/pairs/text_to_image_R1"].values.tolist() == [1, 0, 0, 0]
    assert scores["retrieval/pairs/text_to_image_R1"].units.tolist() == [0, 0, 1, 2]
    assert {s.group for s in scores.values()} == {"zeroshot/colours", "retrieval/pairs"}
    for name, sample in scores.items():
        assert sample.mean == pytest.approx(report.metrics[name], abs=1e-6), name
    for metric in ("zeroshot/mean_top1", "retrieval/mean_recall", "retrieval/pairs/mean_recall"):
        weights = engine.sample_mean_weights(metric, scores)
        assert sum(w * scores[n].mean for n, w in weights.items()) == pytest.approx(report.metrics[metric], abs=1e-6)
    with pytest.raises(ValueError, match="not a mean over evaluation samples"):
        engine.sample_mean_weights("zeroshot/colours/mean_per_class_recall", scores)
    subset = engine.evaluate(model, TOKENIZER_MODEL, EvaluateConfig(**{**vars(cfg), "max_samples": 2}), "cpu", True)
    assert set(subset.per_sample) <= set(subset.metrics)  # named as the metrics: partial/...
    assert engine.sample_mean_weights("partial/zeroshot/mean_top1", subset.per_sample) == {
        "partial/zeroshot/colours/top1": 1.0
    }
