"""The synthetic image-text world: determinism, captions, zero-shot labels, the written layout, caching."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipdr import cli
from clipdr.config import NoiseConfig, SynthConfig, load_config
from clipdr.data import families, sources
from clipdr.data import synthetic as synth

TINY = SynthConfig(
    seed=3,
    image_size=32,
    formats=("webdataset", "parquet"),
    shard_size=10,
    num_teacher=25,
    num_student=15,
    num_zeroshot=12,
    num_retrieval=7,
)
COUNTS = {"teacher": 25, "student": 15, "zeroshot": 12, "retrieval": 7}
ATTRIBUTE_WORDS = (
    set(synth.COLOURS) | set(synth.SHAPES) | set(synth.SIZES) | set(synth.BACKGROUND_COLOURS) | set(synth.TEXTURES)
)


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def normalised(caption: str) -> str:
    """Lowercase with slug separators as spaces, as a tokenizer would split them."""
    return " " + re.sub(r"[_\-\s]+", " ", caption.lower()) + " "


def scenes(num: int, seed: int = 0, **kwargs) -> list[synth.Scene]:
    rng = np.random.default_rng(seed)
    return [synth.sample_scene(rng, **kwargs) for _ in range(num)]


# --------------------------------------------------------------------------- determinism and images


@pytest.mark.parametrize("split", synth.SPLITS)
def test_samples_are_a_pure_function_of_seed_split_and_index(split):
    cfg = SynthConfig(seed=11)
    first = [synth.make_sample(cfg, split, i) for i in range(6)]
    again = [synth.make_sample(cfg, split, i) for i in reversed(range(6))][::-1]
    for a, b in zip(first, again, strict=True):
        assert (a.key, a.image_bytes, a.caption, a.meta) == (b.key, b.image_bytes, b.caption, b.meta)
    assert [s.key for s in first] == [f"{split}-{i:08d}" for i in range(6)]
    other_seed = [synth.make_sample(dataclasses.replace(cfg, seed=12), split, i) for i in range(6)]
    assert all(a.image_bytes != b.image_bytes for a, b in zip(first, other_seed, strict=True))
    assert [a.caption for a in first] != [b.caption for b in other_seed]
    assert len({s.image_bytes for s in first}) == len(first)


def test_meta_is_json_and_reproduces_the_image():
    cfg = SynthConfig(image_size=48)
    for split in synth.SPLITS:
        sample = synth.make_sample(cfg, split, 5)
        meta = json.loads(json.dumps(sample.meta))
        assert meta == sample.meta
        scene = synth.Scene.from_dict(meta["scene"])
        assert synth.encode_jpeg(synth.render_scene(scene, 48)) == sample.image_bytes


@pytest.mark.parametrize("image_size", [16, 32, 64, 96])
def test_images_decode_at_the_configured_size(image_size):
    cfg = SynthConfig(image_size=image_size)
    for split in synth.SPLITS:
        sample = synth.make_sample(cfg, split, 1)
        image = sources.decode_rgb(sample.image_bytes)
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        assert sample.image is not None and sample.image.size == (image_size, image_size)


def test_every_shape_and_texture_renders_and_differs():
    # Same placement, one attribute changed at a time: the pixels must change.
    base = synth.sample_scene(np.random.default_rng(0), num_objects=1, colour="red", shape="circle")
    obj = dataclasses.replace(base.objects[0], size="large", center=(0.5, 0.5), angle=0.0)
    images = {}
    for shape in synth.SHAPES:
        scene = dataclasses.replace(base, objects=(dataclasses.replace(obj, shape=shape),))
        images[shape] = np.asarray(synth.render_scene(scene, 64), dtype=np.int16)
    for a in synth.SHAPES:
        for b in synth.SHAPES:
            if a < b:
                assert np.abs(images[a] - images[b]).sum(axis=2).max() > 100, (a, b)
    plain = dataclasses.replace(base.background, texture="plain")
    for texture in synth.TEXTURES:
        bg = dataclasses.replace(plain, texture=texture)
        pixels = np.asarray(synth.render_scene(synth.Scene(objects=(), background=bg), 32), dtype=np.int16)
        spread = pixels.max(axis=(0, 1)) - pixels.min(axis=(0, 1))
        assert (spread.max() == 0) == (texture == "plain"), texture


def test_object_pixels_show_the_labelled_colour_in_the_labelled_cell():
    palette = np.array(list(synth.COLOURS.values()), dtype=np.float64)
    for index in range(64):
        sample = synth.make_sample(SynthConfig(), "zeroshot", index)
        (obj,) = sample.meta["scene"]["objects"]
        if obj["shape"] == "ring":  # a ring's centre shows the background
            continue
        pixels = np.asarray(Image.open(io.BytesIO(sample.image_bytes)), dtype=np.float64)
        x, y = (int(c * 64) for c in obj["center"])
        nearest = np.argmin(((palette - pixels[y, x]) ** 2).sum(axis=1))
        assert tuple(synth.COLOURS)[nearest] == obj["colour"], (index, obj)
        assert synth.POSITIONS[(y * 3 // 64) * 3 + x * 3 // 64] == obj["position"]


# --------------------------------------------------------------------------- captions


def test_clean_captions_state_every_attribute():
    rng = np.random.default_rng(1)
    seen_templates = set()
    for scene in scenes(400, seed=1):
        caption = synth.clean_caption(scene, rng)
        punctuation = frozenset(c for c in caption if c in ":;()")
        seen_templates.add((punctuation, "background is" in caption, caption.split()[0] in synth.COUNT_WORDS))
        count_word = synth.COUNT_WORDS[len(scene.objects)]
        assert re.search(rf"\b{count_word} (shape|object)s?\b", caption), caption
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption, caption
            assert synth.POSITION_PHRASES[obj.position] in caption, caption
        bg = scene.background
        assert (
            f"{bg.texture} {bg.colour} background" in caption
            or f"{bg.colour} {bg.texture} background" in caption
            or (f"background is {bg.colour} and {bg.texture}" in caption)
        ), caption
    assert len(seen_templates) >= 5  # several phrasings, not one template


@pytest.mark.parametrize("family", families.FAMILIES.values(), ids=lambda f: f.name)
def test_clean_position_phrases_never_contain_each_other(family):
    phrases = list(family.position_phrases.values())
    assert all(a == b or a not in b for a in phrases for b in phrases)


def _noisy_statistics(noise: NoiseConfig, num: int = 3000) -> dict[str, float]:
    """Rates measured from the caption text alone, over single-object scenes."""
    rng = np.random.default_rng(7)
    stats = collections.Counter()
    for scene in scenes(num, seed=7, num_objects=1):
        obj = scene.objects[0]
        caption = synth.noisy_caption(scene, rng, noise)
        tokens = words(caption)
        text = normalised(caption)
        if not (set(tokens) & (ATTRIBUTE_WORDS | {"shape"})):
            stats["irrelevant"] += 1
            continue
        stats["relevant"] += 1
        stats["num_words"] += len(tokens)
        colours = [t for t in tokens if t in synth.COLOURS]
        if colours:
            stats["colour_stated"] += 1
            stats["colour_wrong"] += colours[0] != obj.colour
        shapes = [t for t in tokens if t in synth.SHAPES]
        if shapes:
            stats["shape_stated"] += 1
            stats["shape_wrong"] += shapes[0] != obj.shape
        stats["size_stated"] += any(t in synth.SIZES for t in tokens)
        stats["position_stated"] += any(f" {p} " in text for p in synth.POSITION_PHRASES.values())
        stats["background_stated"] += "background" in tokens
    relevant = max(stats["relevant"], 1)
    return {
        "irrelevant": stats["irrelevant"] / num,
        "mean_words": stats["num_words"] / relevant,
        "colour_stated": stats["colour_stated"] / relevant,
        "colour_wrong": stats["colour_wrong"] / max(stats["colour_stated"], 1),
        "shape_stated": stats["shape_stated"] / relevant,
        "shape_wrong": stats["shape_wrong"] / max(stats["shape_stated"], 1),
        "size_stated": stats["size_stated"] / relevant,
        "position_stated": stats["position_stated"] / relevant,
        "background_stated": stats["background_stated"] / relevant,
    }


def test_noisy_caption_rates_match_the_noise_config():
    noise = NoiseConfig()
    got = _noisy_statistics(noise)
    # 3000 draws: binomial standard errors are <= 0.01, so 0.04 is 4+ sigma; the seeds are fixed anyway.
    tolerance = 0.04
    assert got["irrelevant"] == pytest.approx(noise.irrelevant_rate, abs=tolerance)
    assert got["colour_stated"] == pytest.approx(1 - noise.drop_colour, abs=tolerance)
    assert got["shape_stated"] == pytest.approx(1 - noise.drop_shape, abs=tolerance)
    assert got["size_stated"] == pytest.approx(1 - noise.drop_size, abs=tolerance)
    assert got["position_stated"] == pytest.approx(1 - noise.drop_position, abs=tolerance)
    assert got["background_stated"] == pytest.approx(1 - noise.drop_background, abs=tolerance)
    assert got["colour_wrong"] == pytest.approx(noise.wrong_rate, abs=tolerance)
    assert got["shape_wrong"] == pytest.approx(noise.wrong_rate, abs=tolerance)
    assert got["mean_words"] < 8  # alt-text is short; a clean caption of one object has ~15 words


def test_noisy_caption_extremes():
    clean = NoiseConfig(
        drop_count=0.0,
        drop_size=0.0,
        drop_position=0.0,
        drop_background=0.0,
        drop_colour=0.0,
        drop_shape=0.0,
        drop_object=0.0,
        wrong_rate=0.0,
        filler_rate=0.0,
        shuffle_rate=0.0,
        irrelevant_rate=0.0,
    )
    got = _noisy_statistics(clean, num=300)
    assert got["irrelevant"] == 0 and got["colour_wrong"] == 0 and got["shape_wrong"] == 0
    assert got["colour_stated"] == got["shape_stated"] == got["size_stated"] == got["position_stated"] == 1
    always_wrong = dataclasses.replace(clean, wrong_rate=1.0)
    got = _noisy_statistics(always_wrong, num=300)
    assert got["colour_wrong"] == got["shape_wrong"] == 1
    junk = _noisy_statistics(dataclasses.replace(clean, irrelevant_rate=1.0), num=300)
    assert junk["irrelevant"] == 1


def test_noisy_caption_details_count_what_they_state():
    rng = np.random.default_rng(3)
    noise = NoiseConfig()
    details = [synth.noisy_caption_details(scene, rng, noise) for scene in scenes(2000, seed=3)]
    irrelevant = [d for d in details if d.irrelevant]
    assert all(d.num_stated == 0 and not set(words(d.text)) & ATTRIBUTE_WORDS for d in irrelevant)
    stated = sum(d.num_stated for d in details)
    wrong = sum(d.num_wrong for d in details)
    assert wrong / stated == pytest.approx(noise.wrong_rate, abs=0.03)


def test_noisy_fillers_and_irrelevant_texts_carry_no_attribute_words():
    for text in synth.FILLERS + synth.IRRELEVANT:
        assert not set(words(text)) & (ATTRIBUTE_WORDS | {"shape", "background"}), text
        assert not any(f" {p} " in normalised(text) for p in synth.POSITION_PHRASES.values()), text


def test_student_meta_records_the_caption_noise():
    sample = synth.make_sample(SynthConfig(), "student", 0)
    assert set(sample.meta["noise"]) == {"irrelevant", "num_stated", "num_wrong"}
    assert "labels" not in sample.meta


# --------------------------------------------------------------------------- zero-shot tasks


def test_zeroshot_tasks_and_templates():
    tasks = synth.zeroshot_tasks()
    assert {"object", "shape", "colour", "position", "size"} <= set(tasks)
    assert len(tasks["object"]) == len(synth.COLOURS) * len(synth.SHAPES) == 64
    for task, classnames in tasks.items():
        assert len(set(classnames)) == len(classnames) >= 2, task
        assert all(c and "\n" not in c for c in classnames)
        templates = synth.ZEROSHOT_TEMPLATES[task]
        assert templates and all(t.count("{c}") == 1 for t in templates), task


def test_zeroshot_labels_are_valid_and_match_the_scene():
    tasks = synth.zeroshot_tasks()
    for index in range(130):
        sample = synth.make_sample(SynthConfig(), "zeroshot", index)
        labels = sample.meta["labels"]
        assert set(labels) == set(tasks)
        assert all(0 <= labels[t] < len(tasks[t]) for t in tasks)
        (obj,) = sample.meta["scene"]["objects"]
        bg = sample.meta["scene"]["background"]
        assert labels["object"] == index % 64  # balanced: every class once per 64 samples
        assert tasks["object"][labels["object"]] == f"{obj['colour']} {obj['shape']}"
        assert tasks["shape"][labels["shape"]] == obj["shape"]
        assert tasks["colour"][labels["colour"]] == obj["colour"]
        assert tasks["size"][labels["size"]] == obj["size"]
        assert tasks["position"][labels["position"]] == synth.POSITION_PHRASES[obj["position"]]
        assert tasks["background"][labels["background"]] == bg["colour"]
        assert tasks["texture"][labels["texture"]] == bg["texture"]


def test_zeroshot_labels_need_one_object():
    scene = synth.sample_scene(np.random.default_rng(0), num_objects=2)
    with pytest.raises(ValueError, match="single-object"):
        synth.zeroshot_labels(scene)


# --------------------------------------------------------------------------- generate


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    messages: list[str] = []
    summary = synth.generate(dataclasses.replace(TINY, output=str(out)), progress=messages.append)
    assert messages and not summary["cached"]
    return out, summary


def test_generate_writes_the_layout_with_exact_counts(world):
    out, summary = world
    for split in ("teacher", "student", "retrieval"):
        num_shards = -(-COUNTS[split] // TINY.shard_size)
        tars = sorted((out / split).glob("*.tar"))
        assert [p.name for p in tars] == [f"{split}-{i:05d}.tar" for i in range(num_shards)]
        keys = []
        for tar in tars:
            samples = read_tar(tar)
            assert all(set(parts) == {"jpg", "txt", "json"} for parts in samples.values())
            keys += samples
            parquet = pq.read_table(tar.parent / "parquet" / tar.with_suffix(".parquet").name)
            assert parquet.column_names == ["key", "image", "caption", "meta"]
            assert parquet.column("key").to_pylist() == list(samples)
        assert keys == [synth.sample_key(split, i) for i in range(COUNTS[split])]
        skipped: collections.Counter = collections.Counter()
        read_back = list(sources.iter_source(str(out / split), skipped))
        assert len(read_back) == COUNTS[split] and not skipped
        first = synth.make_sample(TINY, split, 0)
        assert (read_back[0].caption, read_back[0].meta, read_back[0].image_bytes) == (
            first.caption,
            first.meta,
            first.image_bytes,
        )
        assert summary["splits"][split]["count"] == COUNTS[split]


def test_generate_writes_clip_benchmark_zeroshot_folders(world):
    out, summary = world
    tasks = synth.zeroshot_tasks()
    for task, classnames in tasks.items():
        folder = out / "zeroshot" / task
        assert (folder / "classnames.txt").read_text().splitlines() == list(classnames)
        templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert templates == list(synth.ZEROSHOT_TEMPLATES[task]) and all("{c}" in t for t in templates)
        assert (folder / "test" / "nshards.txt").read_text().strip() == "2"
        keys, labels = [], []
        for shard in range(2):
            for key, parts in read_tar(folder / "test" / f"{shard}.tar").items():
                assert set(parts) == {"jpg", "cls"}
                keys.append(key)
                labels.append(int(parts["cls"].decode()))
                assert Image.open(io.BytesIO(parts["jpg"])).size == (32, 32)
        assert keys == [synth.sample_key("zeroshot", i) for i in range(COUNTS["zeroshot"])]
        assert labels == [synth.make_sample(TINY, "zeroshot", i).meta["labels"][task] for i in range(12)]
        assert all(0 <= label < len(classnames) for label in labels)
        assert summary["zeroshot_tasks"][task]["classnames"] == list(classnames)
    marker = json.loads((out / "world.json").read_text())
    assert marker["splits"]["zeroshot"]["count"] == COUNTS["zeroshot"]
    assert marker["config"]["seed"] == TINY.seed and marker["world_version"] == synth.WORLD_VERSION


def test_splits_are_disjoint(world):
    out, _ = world
    images_by_split: dict[str, set[str]] = {}
    keys: list[str] = []
    for split in synth.SPLITS:
        digests = set()
        for tar in sorted((out / split).rglob("*.tar")):
            for key, parts in read_tar(tar).items():
                digests.add(hashlib.sha256(parts["jpg"]).hexdigest())
                keys.append(key)
        images_by_split[split] = digests
    unique_keys = set(keys)
    assert all(key.split("-")[0] in synth.SPLITS for key in unique_keys)
    assert len(unique_keys) == sum(COUNTS.values())
    assert sum(len(d) for d in images_by_split.values()) == len(set().union(*images_by_split.values()))


def test_generate_is_cached_until_the_world_changes(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, output=str(tmp_path), formats=("webdataset",))
    first = synth.generate(cfg)
    assert not first["cached"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("a cached world must not be rendered again")

    with monkeypatch.context() as patch:
        patch.setattr(synth, "_write_shard", fail)
        again = synth.generate(dataclasses.replace(cfg, workers=4))  # how fast it is made is not what it is
    assert again["cached"] and again["splits"] == first["splits"]
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    smaller = dataclasses.replace(cfg, num_teacher=8, num_zeroshot=0)
    redone = synth.generate(smaller)
    assert not redone["cached"]
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == ["teacher-00000.tar"]
    assert len(read_tar(tmp_path / "teacher" / "teacher-00000.tar")) == 8
    assert not [p for p in (tmp_path / "zeroshot").rglob("*") if p.is_file()]  # stale shards and texts removed
    assert json.loads((tmp_path / "world.json").read_text())["splits"]["teacher"]["count"] == 8

    noisier = dataclasses.replace(smaller, noise=dataclasses.replace(smaller.noise, irrelevant_rate=0.5))
    assert not synth.generate(noisier)["cached"]
    assert synth.generate(noisier)["cached"]


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    cfg = dataclasses.replace(TINY, formats=("webdataset",), num_teacher=20, num_student=10, num_zeroshot=10)
    synth.generate(dataclasses.replace(cfg, output=str(tmp_path / "serial"), workers=1))
    synth.generate(dataclasses.replace(cfg, output=str(tmp_path / "parallel"), workers=2))
    serial = {p.relative_to(tmp_path / "serial"): p.read_bytes() for p in (tmp_path / "serial").rglob("*.tar")}
    parallel = {p.relative_to(tmp_path / "parallel"): p.read_bytes() for p in (tmp_path / "parallel").rglob("*.tar")}
    assert serial and serial == parallel


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"formats": ("csv",)}, "synth.formats"),
        ({"formats": ()}, "synth.formats"),
        ({"shard_size": 0}, "synth.shard_size"),
        ({"image_size": 8}, "synth.image_size"),
        ({"num_student": -1}, "synth.num_student"),
        ({"max_objects": 4}, "synth.max_objects"),
        ({"noise": NoiseConfig(wrong_rate=1.5)}, "synth.noise.wrong_rate"),
        ({"family": "cubes"}, "synth.family"),
    ],
)
def test_invalid_configs_are_refused(tmp_path, change, message):
    cfg = dataclasses.replace(TINY, output=str(tmp_path), **change)
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.generate(cfg)
    assert not any(tmp_path.iterdir())


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split 'train'"):
        synth.make_sample(SynthConfig(), "train", 0)


# --------------------------------------------------------------------------- the second world family

REPO = Path(__file__).resolve().parents[2]
TILES = families.TILES
# TINY's tar shards and zero-shot texts, hashed in path order, as the code before world families wrote them (commit
# e050e01): the first family's worlds, so their cache markers and source fingerprints, are unchanged byte for byte.
FIRST_FAMILY_DIGEST = "25dcfc958c57ff0f6a67969728cf607a0c205632d180288163f6b5bbb45c6918"
# Two samples of each of the 36 object classes, so the balanced task can be counted.
TINY_TILES = dataclasses.replace(TINY, family="tiles", formats=("webdataset",), num_zeroshot=72)


def test_first_family_worlds_are_unchanged_byte_for_byte(world):
    out, summary = world
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.suffix in (".tar", ".txt")):
        digest.update(path.relative_to(out).as_posix().encode())
        digest.update(path.read_bytes())
    assert digest.hexdigest() == FIRST_FAMILY_DIGEST
    # The cache marker's identity is the one of before families; another family is another world.
    assert "family" not in summary["config"] and summary["world_version"] == 2
    assert synth._world_identity(dataclasses.replace(TINY, family="tiles"))["config"]["family"] == "tiles"


@pytest.fixture(scope="module")
def tiles_world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiles")
    return out, synth.generate(dataclasses.replace(TINY_TILES, output=str(out)))


def test_tiles_zeroshot_tasks_are_the_familys_balanced_and_valid(tiles_world):
    out, summary = tiles_world
    tasks = synth.zeroshot_tasks(TILES)
    assert list(tasks) == list(TILES.tasks) == list(summary["zeroshot_tasks"])
    assert "fill" in tasks and len(tasks["object"]) == len(TILES.colours) * len(TILES.shapes) == 36
    assert sorted(p.name for p in (out / "zeroshot").iterdir()) == sorted(tasks)
    for task, classnames in tasks.items():
        folder = out / "zeroshot" / task
        assert (folder / "classnames.txt").read_text().splitlines() == list(classnames)
        assert len(set(classnames)) == len(classnames) >= 2, task
        templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert templates == list(TILES.zeroshot_templates[task]) and all(t.count("{c}") == 1 for t in templates)
        labels = [
            int(parts["cls"].decode())
            for shard in range(int((folder / "test" / "nshards.txt").read_text()))
            for parts in read_tar(folder / "test" / f"{shard}.tar").values()
        ]
        assert len(labels) == 72
        counts = collections.Counter(labels)
        # Every class occurs; the headline task exactly twice per class (sample i shows class i mod 36).
        assert sorted(counts) == list(range(len(classnames))), (task, counts)
        if task == "object":
            assert set(counts.values()) == {2}
    for index in range(0, 72, 7):  # a label names what the scene shows
        sample = synth.make_sample(TINY_TILES, "zeroshot", index)
        (obj,) = sample.meta["scene"]["objects"]
        labels = sample.meta["labels"]
        assert tasks["object"][labels["object"]] == f"{obj['colour']} {obj['shape']}"
        assert tasks["fill"][labels["fill"]] == obj.get("fill", "solid")
        assert tasks["position"][labels["position"]] == TILES.position_phrases[obj["position"]]
        assert tasks["texture"][labels["texture"]] == sample.meta["scene"]["background"]["texture"]


def test_tiles_samples_are_deterministic_and_differ_from_the_first_family():
    first_words = set(synth.SHAPES) | set(synth.COLOURS) | set(synth.SIZES) | set(synth.BACKGROUND_COLOURS)
    first_words |= set(synth.TEXTURES) - {"plain"}
    for split in synth.SPLITS:
        tiles = [synth.make_sample(TINY_TILES, split, i) for i in range(8)]
        again = [synth.make_sample(TINY_TILES, split, i) for i in reversed(range(8))][::-1]
        assert [(s.image_bytes, s.caption, s.meta) for s in tiles] == [
            (s.image_bytes, s.caption, s.meta) for s in again
        ]
        shapes = [synth.make_sample(TINY, split, i) for i in range(8)]
        assert all(a.image_bytes != b.image_bytes for a, b in zip(tiles, shapes, strict=True))
        for sample in tiles:
            objects = sample.meta["scene"]["objects"]
            assert all(o["shape"] in TILES.shapes and o["position"] in TILES.positions for o in objects)
            assert sample.meta["scene"]["background"]["texture"] in TILES.textures
            if split != "student":  # clean captions (teacher, zero-shot, retrieval) speak the family's words only
                assert not set(words(sample.caption)) & first_words, sample.caption
            # The meta reproduces the image with the family's sizes.
            scene = synth.Scene.from_dict(json.loads(json.dumps(sample.meta["scene"])))
            assert synth.encode_jpeg(synth.render_scene(scene, TINY.image_size, TILES)) == sample.image_bytes


def test_tiles_shapes_fills_and_textures_render_and_differ():
    base = synth.sample_scene(np.random.default_rng(0), num_objects=1, family=TILES)
    obj = dataclasses.replace(base.objects[0], size="huge", center=(0.5, 0.5), angle=0.0, fill="solid")
    images = {}
    for shape in TILES.shapes:
        for fill in TILES.fills:
            scene = dataclasses.replace(base, objects=(dataclasses.replace(obj, shape=shape, fill=fill),))
            images[shape, fill] = np.asarray(synth.render_scene(scene, 64, TILES), dtype=np.int16)
    for a in images:
        for b in images:
            if a < b:
                assert np.abs(images[a] - images[b]).sum(axis=2).max() > 100, (a, b)
    plain = dataclasses.replace(base.background, texture="plain")
    for texture in TILES.textures:
        bg = dataclasses.replace(plain, texture=texture)
        pixels = np.asarray(synth.render_scene(synth.Scene(objects=(), background=bg), 32, TILES), dtype=np.int16)
        spread = pixels.max(axis=(0, 1)) - pixels.min(axis=(0, 1))
        assert (spread.max() == 0) == (texture == "plain"), texture


def test_tiles_clean_captions_state_every_attribute():
    rng = np.random.default_rng(5)
    styles = set()
    for scene in scenes(300, seed=5, family=TILES):
        caption = synth.clean_caption(scene, rng, TILES)
        count_word = synth.COUNT_WORDS[len(scene.objects)]
        assert re.search(rf"\b{count_word} (tile|piece)s?\b", caption), caption
        for obj in scene.objects:
            phrases = {
                fmt.format(
                    size=obj.size, fill=obj.fill, colour=obj.colour, shape=obj.shape,
                    position=TILES.position_phrases[obj.position],
                )
                for fmt, _ in TILES.caption_styles
            }  # fmt: skip
            found = [p for p in phrases if p in caption]
            assert found, caption
            styles.update(found)
        assert f"{scene.background.colour}" in caption and scene.background.texture in caption, caption
    assert len({re.sub(r"[a-z ]+", "", p) for p in styles}) >= 3  # several object phrasings, not one


def test_tiles_noisy_captions_speak_with_the_familys_noise():
    rng = np.random.default_rng(9)
    listing = NoiseConfig(**{f.name: 0.0 for f in dataclasses.fields(NoiseConfig)})  # every attribute, said right
    synonyms = fills = 0
    one_object = scenes(1000, seed=9, num_objects=1, family=TILES)
    for scene in one_object:
        (obj,) = scene.objects
        text = normalised(synth.noisy_caption(scene, rng, listing, TILES))
        said_by_synonym = any(f" {s} " in text for s in TILES.colour_synonyms[obj.colour])
        assert said_by_synonym != (f" {obj.colour} " in text), text  # one name of the colour, the own or another
        synonyms += said_by_synonym
        fills += f" {obj.fill} {obj.shape} " in text  # the fill is said with the shape
    assert fills == len(one_object)
    # 1000 draws: the binomial standard error is 0.015, so 0.06 is 4 sigma; the seeds are fixed anyway.
    assert synonyms / len(one_object) == pytest.approx(TILES.synonym_rate, abs=0.06)
    no_shape = dataclasses.replace(listing, drop_shape=1.0)
    for scene in one_object[:50]:
        tokens = words(synth.noisy_caption(scene, rng, no_shape, TILES))
        assert "tile" in tokens and not set(tokens) & (set(TILES.shapes) | set(TILES.fills)), tokens
    noisy = NoiseConfig(filler_rate=1.0, irrelevant_rate=0.5)
    texts = [synth.noisy_caption(scene, rng, noisy, TILES) for scene in one_object[:300]]
    assert any(f in t for t in texts for f in TILES.fillers) and any(t in TILES.irrelevant for t in texts)
    assert not any(f in t for t in texts for f in synth.FILLERS if len(f) > 3)  # the first family's web noise
    attribute_words = (
        set(TILES.colours) | set(TILES.shapes) | set(TILES.sizes) | set(TILES.fills) | set(TILES.background_colours)
    ) | {w for synonyms in TILES.colour_synonyms.values() for s in synonyms for w in s.split()}
    for text in TILES.fillers + TILES.irrelevant:
        assert not set(words(text)) & (attribute_words | set(TILES.textures) | {"tile", "piece", "backdrop"}), text


def test_demo_world2_is_the_demo_lifecycle_on_the_tiles_family(tmp_path, monkeypatch):
    """`clipdr demo --config jobs/configs/demo_world2.toml` (docs/demo.md): demo.toml's lifecycle, settings and all,
    on a tiles world with its own noise and its own products and runs; the demo stage accepts it, and its world
    generates (at toy size) with the family's zero-shot tasks where its evaluation reads them."""
    demo = load_config(REPO / "jobs/configs/demo.toml")
    world2 = load_config(REPO / "jobs/configs/demo_world2.toml")
    assert (demo.synth.family, world2.synth.family) == ("shapes", "tiles")
    assert world2.synth.noise != demo.synth.noise
    renamed = (REPO / "jobs/configs/demo_world2.toml").read_text().replace("demo_world2", "demo")
    (tmp_path / "renamed.toml").write_text(renamed.replace("clipdr-demo-world2", "clipdr-demo"))
    same = load_config(tmp_path / "renamed.toml")
    assert (
        dataclasses.replace(same, synth=dataclasses.replace(same.synth, family="shapes", noise=NoiseConfig())) == demo
    )
    assert cli.build_parser().parse_args(["demo", "--config", "jobs/configs/demo_world2.toml"]).stage == "demo"

    world = str(tmp_path / "world")
    toy = ["--set", f"synth.output={world}", "--set", "synth.image_size=16"]
    toy += [f"--set=synth.num_{split}=4" for split in synth.SPLITS]
    monkeypatch.chdir(REPO)
    assert cli.main(["synth", "--config", "jobs/configs/demo_world2.toml", *toy]) == 0
    assert sorted(p.name for p in (tmp_path / "world" / "zeroshot").iterdir()) == sorted(TILES.tasks)
    assert world2.evaluate.zeroshot == (f"{world2.synth.output}/zeroshot",)
    assert world2.evaluate.retrieval == (f"{world2.synth.output}/retrieval",)
    assert world2.reinforce.source == f"{world2.synth.output}/student"
