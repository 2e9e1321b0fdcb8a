"""DataCompDR compatibility: a fixture in Apple's per-sample layout, converted, checked, rerun and resumed."""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from clipdr import augment, augparams, records, storage
from clipdr.data import datacompdr
from clipdr.data.datacompdr import DataCompDRLayout, DataCompDRSampleError, DataCompDRSkipReason
from clipdr.data.sources import decode_rgb, write_tar_shard
from clipdr.reinforce import datacompdr as conversion

K, S, D = 3, 5, 768
TEACHERS = datacompdr.DATACOMPDR_TEACHERS
NAMES = tuple(t.name for t in TEACHERS)
# A small reference frame, so one fixture image (96 x 64) is "full resolution" and its windows get rescaled.
LAYOUT = DataCompDRLayout(num_augmentations=K, num_syn_captions=S, reference_max_side=48)
# torchvision v1 RandAugment magnitudes at bin 9 of 31 on a 224 x 224 view: what DataCompDR records store.
V1_SPACE = T.RandAugment()._augmentation_space(31, (224, 224))
V1_MAGNITUDE = {name: float(m[9]) if m.ndim > 0 else 0.0 for name, (m, _) in V1_SPACE.items()}
SIGNED = {name for name, (_, signed) in V1_SPACE.items() if signed}


# --------------------------------------------------------------------------- fixture builders


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    """(rows, 2 * D) float32: two independently L2-normalised 768-d halves, as DataCompDR concatenates them."""
    halves = [rng.standard_normal((rows, D)).astype(np.float32) for _ in TEACHERS]
    return np.concatenate([h / np.linalg.norm(h, axis=1, keepdims=True) for h in halves], axis=1)


def encode_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def pth_gz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()}, buf)
    return gzip.compress(buf.getvalue())


def bf16_round_trip(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(array).to(torch.bfloat16).float().numpy()


def records_for(rng: np.random.Generator, frame: tuple[int, int]) -> list:
    """K DataCompDR ``param_aug`` records inside a (width, height) frame, RandAugment ops at v1 magnitudes."""
    width, height = frame
    out = []
    for k in range(K):
        h, w = int(rng.integers(4, height - k)), int(rng.integers(4, width - k))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        ops = []
        for _ in range(2):
            op_index = int(rng.integers(0, len(datacompdr.DATACOMPDR_OP_NAMES)))
            name = datacompdr.DATACOMPDR_OP_NAMES[op_index]
            sign = -1.0 if name in SIGNED and rng.random() < 0.5 else 1.0
            ops.append([op_index, sign * V1_MAGNITUDE[name]])
        out.append([[top, left, h, w], ops])
    return out


def expected_view(record: list, scale: tuple[float, float] = (1.0, 1.0)) -> augparams.AugParams:
    """The clipdr view of a record, written out independently of the module (module docstring table)."""
    (top, left, h, w), ops = record
    sy, sx = scale
    mapped = []
    for op_index, magnitude in ops:
        name = datacompdr.DATACOMPDR_OP_NAMES[op_index]
        if name in ("TranslateX", "TranslateY"):
            magnitude = magnitude / 224
        elif name == "Solarize":
            magnitude = magnitude / 255
        mapped.append((augparams.OP_NAMES.index(name), magnitude))
    return augparams.AugParams(round(top * sy), round(left * sx), round(h * sy), round(w * sx), False, tuple(mapped))


class Fixture:
    """Two joined DataCompDR tar shards with good and bad samples, and what a conversion must produce."""

    def __init__(self, root: Path) -> None:
        self.src = str(root / "src")
        self.rng = np.random.default_rng(0)
        self.expected: dict[str, dict] = {}  # key -> image bytes, caption, syn, views, per-teacher embeddings
        self.skipped = collections.Counter()
        shard_a = [
            self.good("a0", encode_image(40, 30, 1), "npz"),
            self.good("a1", encode_image(32, 32, 2, "JPEG"), "pth"),
            self.bad("a2", "missing_image", drop=("image", "txt")),  # not joined: DataCompDR as released
            self.bad("a3", DataCompDRSkipReason.MISSING_PAUG, drop=("paug.json",)),
            self.bad("a4", DataCompDRSkipReason.INVALID_EMBEDDINGS, replace={"npz": b"PK\x03\x04 not a zip"}),
            self.good("a5", encode_image(96, 64, 3), "npz"),  # larger than the 48-px frame: windows scale by 2
            self.bad("a6", DataCompDRSkipReason.EMBEDDING_SHAPE_MISMATCH, image_rows=K - 1),
            self.bad("a7", DataCompDRSkipReason.MISSING_EMBEDDINGS, drop=("npz",)),
        ]
        shard_b = [
            self.good("b0", encode_image(20, 40, 4), "pth", drop=("json",)),  # no uid: a null in the uid column
            self.bad(
                "b1", DataCompDRSkipReason.INVALID_EMBEDDINGS, kind="pth", replace={"pth.gz": b"\x1f\x8b garbage"}
            ),
            self.bad("b2", DataCompDRSkipReason.INVALID_PAUG, replace={"paug.json": b'{"param_aug": [[1, 2'}),
            self.bad("b3", DataCompDRSkipReason.CROP_OUTSIDE_IMAGE, crop=[10, 0, 25, 10]),  # 10 + 25 > 30 rows
            self.bad("b4", DataCompDRSkipReason.UNNORMALIZED_EMBEDDINGS, half_scale=0.5),
            self.bad("b5", "missing_caption", drop=("txt",)),
            self.bad("b6", DataCompDRSkipReason.MISSING_SYN_CAPTIONS, drop=("syn.json",)),
            self.bad("b8", DataCompDRSkipReason.INVALID_MAGNITUDE, ops=[[0, 0.0], [7, -1.5]]),  # Color factor < 0
            self.good("b7", encode_image(24, 24, 5), "npz_split", norm=1.005),  # RayGen's text_emb + syn_text_emb
        ]
        write_tar_shard(storage.join(self.src, "00000000.tar"), shard_a)
        write_tar_shard(storage.join(self.src, "00000001.tar"), shard_b)
        self.keys = ["a0", "a1", "a5", "b0", "b7"]

    def members(self, key: str, image: bytes, kind: str, frame: tuple[int, int], norm: float = 1.0, **bad) -> dict:
        paug = records_for(self.rng, frame)
        if "crop" in bad:
            paug[0][0] = bad["crop"]
        if "ops" in bad:
            paug[-1][1] = bad["ops"]
        image_KE = unit_rows(self.rng, bad.get("image_rows", K)) * norm
        text_RE = unit_rows(self.rng, 1 + S) * norm
        if "half_scale" in bad:
            text_RE[2, :D] *= bad["half_scale"]
        syn = [f"synthetic caption {j} of {key}" for j in range(S)]
        parts = {
            "url.txt": f"https://example.com/{key}.jpg".encode(),
            "json": json.dumps({"uid": f"uid-{key}", "sha256": "0" * 64}).encode(),
            "syn.json": json.dumps({"syn_text": syn}).encode(),
            "paug.json": json.dumps({"param_aug": paug}).encode(),
        }
        if kind == "npz":
            parts["npz"] = npz_bytes(image_emb=image_KE, text_emb=text_RE)
        elif kind == "npz_split":
            parts["npz"] = npz_bytes(image_emb=image_KE, text_emb=text_RE[:1], syn_text_emb=text_RE[1:])
        else:
            parts["pth.gz"] = pth_gz_bytes(image_emb=image_KE, text_emb=text_RE)
            image_KE, text_RE = bf16_round_trip(image_KE), bf16_round_trip(text_RE)
        parts["jpg" if image[:2] == b"\xff\xd8" else "png"] = image
        parts["txt"] = f"  real caption of {key}\n".encode()
        for ext in bad.get("drop", ()):
            for member in ("jpg", "png") if ext == "image" else (ext,):
                parts.pop(member, None)
        parts.update(bad.get("replace", {}))
        return {"parts": parts, "paug": paug, "syn": syn, "image_KE": image_KE, "text_RE": text_RE}

    def good(
        self, key: str, image: bytes, kind: str, norm: float = 1.0, drop: tuple[str, ...] = ()
    ) -> tuple[str, dict]:
        width, height = Image.open(io.BytesIO(image)).size
        scale = max(width, height) / 48 if max(width, height) > 48 else 1.0
        frame = (round(width / scale), round(height / scale))
        built = self.members(key, image, kind, frame, norm, drop=drop)

        def split(rows: np.ndarray) -> dict[str, np.ndarray]:
            halves = np.split(rows, len(TEACHERS), axis=1)
            return {n: h / np.linalg.norm(h, axis=1, keepdims=True) for n, h in zip(NAMES, halves, strict=True)}

        self.expected[key] = {
            "image": image,
            "ext": "jpg" if image[:2] == b"\xff\xd8" else "png",
            "caption": f"real caption of {key}",
            "uid": None if "json" in drop else f"uid-{key}",
            "syn": built["syn"],
            "views": [expected_view(r, (height / frame[1], width / frame[0])) for r in built["paug"]],
            "image_emb": split(built["image_KE"]),
            "text_emb": split(built["text_RE"]),
        }
        return key, built["parts"]

    def bad(self, key: str, reason: str, kind: str = "npz", **bad) -> tuple[str, dict]:
        self.skipped[str(reason)] += 1
        return key, self.members(key, encode_image(40, 30, 99), kind, (40, 30), **bad)["parts"]


@pytest.fixture
def fixture(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def file_stats(directory: str) -> dict[str, tuple[int, int]]:
    return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in storage.list_files(directory, recursive=True)}


def without_time(manifest: records.Manifest) -> dict:
    data = manifest.to_dict()
    data.pop("created_at")
    return data


# --------------------------------------------------------------------------- conversion


def test_converted_dataset_matches_the_fixture(fixture: Fixture, tmp_path: Path):
    out = str(tmp_path / "out")
    manifest = conversion.convert(fixture.src, out, layout=LAYOUT)

    dataset = records.open_dataset(out, require_teachers=NAMES, min_syn_captions=S, extra_files="error")
    assert [s.path for s in manifest.shards] == ["00000000.parquet", "00000001.parquet"]
    assert [s.num_rows for s in manifest.shards] == [3, 2]
    assert dict(manifest.skipped) == dict(fixture.skipped)
    assert manifest.teachers == TEACHERS and manifest.captioner == datacompdr.DATACOMPDR_CAPTIONER
    assert (manifest.num_augmentations, manifest.num_syn_captions, manifest.augment) == (K, S, LAYOUT.augment)
    assert manifest.source_fingerprint.startswith("sha256:") and manifest.source_uri == fixture.src

    table = pa.concat_tables([records.read_shard(uri) for uri in dataset.shard_uris])
    assert table.column(records.KEY).to_pylist() == fixture.keys
    assert manifest.has_uid and table.column(records.UID).to_pylist() == [
        fixture.expected[k]["uid"] for k in fixture.keys
    ]
    views_NKL = records.aug_params(table)
    for i, key in enumerate(fixture.keys):
        want = fixture.expected[key]
        row = {name: table.column(name)[i].as_py() for name in (records.IMAGE, records.IMAGE_EXT, records.CAPTION)}
        assert row == {records.IMAGE: want["image"], records.IMAGE_EXT: want["ext"], records.CAPTION: want["caption"]}
        assert table.column(records.SYN_CAPTIONS)[i].as_py() == want["syn"]
        for name in NAMES:  # fp16 storage of unit vectors: ~2e-5 absolute
            np.testing.assert_allclose(records.image_embeddings(table, name)[i], want["image_emb"][name], atol=1e-4)
            np.testing.assert_allclose(records.text_embeddings(table, name)[i], want["text_emb"][name], atol=1e-4)
        views = augparams.views_from_array(views_NKL[i])
        assert views == want["views"]
        image = decode_rgb(table.column(records.IMAGE)[i].as_py())
        size = 224 if i % 2 else 256  # replay works on the stored image, at the teachers' and a student's resolution
        assert augment.replay_uint8(image, views[i % K], size).shape == (3, size, size)


def test_rerun_is_idempotent(fixture: Fixture, tmp_path: Path):
    out = str(tmp_path / "out")
    first = conversion.convert(fixture.src, out, layout=LAYOUT)
    before = file_stats(out)
    second = conversion.convert(fixture.src, out, layout=LAYOUT)
    assert file_stats(out) == before  # nothing rewritten, the manifest included
    assert without_time(second) == without_time(first)
    assert without_time(records.read_manifest(out)) == without_time(first)


def test_interrupted_conversion_completes_on_rerun(fixture: Fixture, tmp_path: Path):
    reference = conversion.convert(fixture.src, str(tmp_path / "reference"), layout=LAYOUT)
    out = str(tmp_path / "out")
    shards = conversion.list_source_shards(fixture.src)
    manifest = conversion.build_manifest(fixture.src, shards, layout=LAYOUT)
    conversion.convert_shard(shards[0], out, manifest, layout=LAYOUT)  # ... and the job dies here
    assert not storage.exists(records.manifest_uri(out))
    first_shard = file_stats(out)

    resumed = conversion.convert(fixture.src, out, layout=LAYOUT)
    after = file_stats(out)
    assert {p: after[p] for p in first_shard} == first_shard  # the finished shard was kept, not rewritten
    assert without_time(resumed) == without_time(reference)  # skip counts of the kept shard come from its footer
    records.open_dataset(out, require_teachers=NAMES)


def test_stale_manifest_goes_first_and_other_settings_reconvert(fixture: Fixture, tmp_path: Path):
    out = str(tmp_path / "out")
    conversion.convert(fixture.src, out, layout=LAYOUT)
    before = file_stats(out)
    storage.delete(storage.join(out, "00000001.parquet"))
    conversion.convert(fixture.src, out, layout=LAYOUT)
    assert file_stats(out)[storage.join(out, "00000000.parquet")] == before[storage.join(out, "00000000.parquet")]

    # Windows taken as they are: a5's windows no longer scale, so every shard is converted again.
    other = DataCompDRLayout(num_augmentations=K, num_syn_captions=S, reference_max_side=None)
    manifest = conversion.convert(fixture.src, out, layout=other)
    after = file_stats(out)
    assert all(after[p] != before[p] for p in before if p.endswith(".parquet"))
    table = records.read_shard(records.open_dataset(out).shard_uris[0])
    i = table.column(records.KEY).to_pylist().index("a5")
    raw = fixture.expected["a5"]["views"][0]
    assert augparams.views_from_array(records.aug_params(table)[i])[0].window == tuple(v // 2 for v in raw.window)
    assert dict(manifest.skipped) == dict(fixture.skipped)


def test_reader_yields_joined_samples_and_counts_skips(fixture: Fixture):
    skipped = collections.Counter()
    samples = []
    for name in ("00000000.tar", "00000001.tar"):
        samples += datacompdr.iter_shard(storage.join(fixture.src, name), skipped, layout=LAYOUT)
    assert [s.key for s in samples] == fixture.keys
    assert skipped == fixture.skipped
    a0 = samples[0]
    assert (a0.uid, a0.url) == ("uid-a0", "https://example.com/a0.jpg")
    assert a0.image is not None and a0.image.size == (40, 30)
    for sample in samples:
        assert 0.0 <= sample.norm_error < LAYOUT.norm_tolerance
        for name in NAMES:
            assert sample.image_emb[name].shape == (K, D) and sample.text_emb[name].shape == (1 + S, D)
            np.testing.assert_allclose(np.linalg.norm(sample.text_emb[name], axis=1), 1.0, atol=1e-5)
    assert samples[-1].norm_error == pytest.approx(0.005, abs=1e-4)  # b7 was stored at norm 1.005, renormalised


def test_unreadable_and_missing_sources(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        conversion.convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(datacompdr.DataCompDRError, match="no DataCompDR tar shards"):
        conversion.convert(str(tmp_path / "empty"), str(tmp_path / "out"))
    skipped = collections.Counter()
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    assert list(datacompdr.iter_shard(str(tmp_path / "junk.tar"), skipped)) == []
    assert skipped == {"unreadable_shard": 1}


# --------------------------------------------------------------------------- parameter mapping


def test_op_table_is_torchvisions_and_clipdrs():
    assert datacompdr.DATACOMPDR_OP_NAMES == tuple(V1_SPACE) == augparams.OP_NAMES


@pytest.mark.parametrize(
    ("name", "sign"), [(name, sign) for name in V1_SPACE for sign in ((1.0, -1.0) if name in SIGNED else (1.0,))]
)
def test_mapped_ops_replay_as_torchvision_v1_applied_them(name: str, sign: float):
    # The oracle: torchvision v1's own _apply_op with the magnitude a record stores, on the same crop; a 64-px view
    # (layout.view_size) keeps it fast and checks that translations follow the view size.
    # (The crop's resize is augment's business: its uint8 bicubic kernel is v2's, not v1's float one.)
    magnitudes, _ = T.RandAugment()._augmentation_space(31, (64, 64))[name]
    magnitude = sign * (float(magnitudes[9]) if magnitudes.ndim > 0 else 0.0)
    source = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    record = [[5, 7, 50, 60], [[datacompdr.DATACOMPDR_OP_NAMES.index(name), magnitude]]]
    layout = DataCompDRLayout(num_augmentations=1, augment=records.AugmentSpec(num_ops=1), view_size=64)
    view = datacompdr.map_view(datacompdr.parse_record(record, layout), (80, 60), layout)
    assert view.window == (5, 7, 50, 60) and not view.flip
    crop = augment.replay_uint8(source, augparams.AugParams(*view.window), 64)
    apple = _apply_op(crop, name, magnitude, InterpolationMode.NEAREST, None)
    ours = augment.replay_uint8(source, view, 64)
    # v1 and v2 saturation/sharpness kernels round differently by one grey level; everything else is exact.
    tolerance = 1 if name in ("Color", "Sharpness") else 0
    assert (apple.int() - ours.int()).abs().max().item() <= tolerance


def test_magnitude_conversion_table():
    to = datacompdr.to_clipdr_magnitude
    assert to("TranslateX", -30.45317268371582, 224) == pytest.approx(-150 / 331 * 0.3, rel=1e-6)
    assert to("TranslateY", 30.45317268371582, 224) == pytest.approx(150 / 331 * 0.3, rel=1e-6)
    assert to("Solarize", 178.5, 224) == pytest.approx(0.7)
    assert (to("Posterize", 7.0, 224), to("Rotate", -9.0, 224), to("ShearX", 0.09, 224)) == (7.0, -9.0, 0.09)
    assert (to("Brightness", -0.27, 224), to("Equalize", 0.0, 224), to("Identity", 0.0, 224)) == (-0.27, 0.0, 0.0)


def test_reference_frame_and_window_scaling():
    assert datacompdr.reference_size((1000, 750), 512) == (512, 384)
    assert datacompdr.reference_size((400, 300), 512) == (400, 300)
    assert datacompdr.reference_size((1001, 3), 512) == (512, 2)
    assert datacompdr.reference_size((4000, 3000), None) == (4000, 3000)
    view = datacompdr.RecordView(window=(10, 20, 100, 200), flip=False, ops=((0, 0.0), (0, 0.0)))
    assert datacompdr.map_view(view, (1024, 768)).window == (20, 40, 200, 400)
    assert datacompdr.map_view(view, (512, 384)).window == (10, 20, 100, 200)
    edge = datacompdr.RecordView(window=(0, 0, 384, 512), flip=False, ops=view.ops)
    assert datacompdr.map_view(edge, (1000, 750)).window == (0, 0, 750, 1000)
    with pytest.raises(DataCompDRSampleError) as e:
        datacompdr.map_view(view, (200, 100))
    assert e.value.reason == DataCompDRSkipReason.CROP_OUTSIDE_IMAGE


def test_record_variants():
    crop = [1, 2, 3, 4]
    assert datacompdr.parse_record([crop, None]).ops == ((0, 0.0), (0, 0.0))  # RandAugment skipped: Identity
    assert datacompdr.parse_record([crop, [[5, 9.0]]]).ops == ((5, 9.0), (0, 0.0))  # padded to num_ops
    flip_layout = DataCompDRLayout(transforms=("random_resized_crop", "random_horizontal_flip", "rand_augment"))
    assert datacompdr.parse_record([crop, True, [[0, 0.0], [0, 0.0]]], flip_layout).flip is True
    erase = DataCompDRLayout(transforms=("random_resized_crop", "rand_augment", "random_erase"))
    assert datacompdr.parse_record([crop, None, None], erase).window == (1, 2, 3, 4)
    mixing = DataCompDRLayout(transforms=("random_resized_crop", "rand_augment", "mixup"))
    assert datacompdr.parse_record([None, crop, None, None], mixing).window == (1, 2, 3, 4)
    layout = DataCompDRLayout(num_augmentations=1)
    as_string = {"param_aug": json.dumps([[crop, [[3, 30.0], [11, 0.0]]]])}  # the Hugging Face loader's form
    assert datacompdr.parse_param_aug(as_string, layout)[0].ops == ((3, 30.0 / 224), (11, 0.0))


@pytest.mark.parametrize(
    ("record", "layout", "reason"),
    [
        ([[1, 2, 3, 4], None, [0, 0, 5, 5]], ("random_resized_crop", "rand_augment", "random_erase"), "unsupported"),
        ([7, [1, 2, 3, 4], None, None], ("random_resized_crop", "rand_augment", "mixup"), "unsupported"),
        ([[1, 2, 3, 4], None, [0.5, [1, 2, 3, 4]]], ("random_resized_crop", "rand_augment", "cutmix"), "unsupported"),
        ([[1, 2, 3], None], None, "invalid"),
        ([[1, 2.5, 3, 4], None], None, "invalid"),
        ([[1, 2, 3, 4], [[14, 0.0]]], None, "invalid"),
        ([[1, 2, 3, 4], [[5, float("nan")]]], None, "invalid"),
        ([[1, 2, 3, 4], [[10, 6.5]]], None, "magnitude"),  # Posterize keeps a whole number of bits
        ([[1, 2, 3, 4], [[10, 9.0]]], None, "magnitude"),
        ([[1, 2, 3, 4], [[0, 0.0], [7, -1.5]]], None, "magnitude"),  # Color factor 1 + m below 0
        ([[1, 2, 3, 4], [[11, 300.0]]], None, "magnitude"),  # Solarize threshold past white
        ([[1, 2, 3, 4], [[0, 0.0]] * 3], None, "invalid"),
        ([[1, 2, 3, 4]], None, "invalid"),
        ({"crop": [1, 2, 3, 4]}, None, "invalid"),
        ([[1, 2, 3, 4], "flip", None], ("random_resized_crop", "random_horizontal_flip", "rand_augment"), "invalid"),
    ],
)
def test_bad_records_are_skipped_with_a_reason(record, layout, reason):
    layout = DataCompDRLayout(transforms=layout) if layout else datacompdr.DEFAULT_LAYOUT
    with pytest.raises(DataCompDRSampleError) as e:
        datacompdr.parse_record(record, layout)
    want = {
        "unsupported": DataCompDRSkipReason.UNSUPPORTED_AUGMENTATION,
        "invalid": DataCompDRSkipReason.INVALID_PAUG,
        "magnitude": DataCompDRSkipReason.INVALID_MAGNITUDE,
    }
    assert e.value.reason == want[reason]


def test_embedding_split_and_tolerance():
    rng = np.random.default_rng(0)
    rows = unit_rows(rng, 2)
    parts, error = datacompdr.split_embeddings(rows * 1.01, TEACHERS, 0.02)
    assert error == pytest.approx(0.01, abs=1e-5)
    np.testing.assert_allclose(parts["openai"], rows[:, :D], atol=1e-6)
    np.testing.assert_allclose(parts["datacomp_xl"], rows[:, D:], atol=1e-6)
    cases = [
        (rows * 1.05, DataCompDRSkipReason.UNNORMALIZED_EMBEDDINGS),
        (rows[:, :D], DataCompDRSkipReason.EMBEDDING_SHAPE_MISMATCH),
        (np.where(np.arange(2 * D) == 3, np.nan, rows), DataCompDRSkipReason.INVALID_EMBEDDINGS),
        (np.concatenate([rows[:, :D], np.zeros((2, D), np.float32)], axis=1), DataCompDRSkipReason.INVALID_EMBEDDINGS),
    ]
    for embeddings, reason in cases:
        with pytest.raises(DataCompDRSampleError) as e:
            datacompdr.split_embeddings(embeddings, TEACHERS, 0.02)
        assert e.value.reason == reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_augmentations": 0},
        {"num_syn_captions": -1},
        {"caption_sets": (("syn_text", 5),)},  # syn_text is the default set: num_syn_captions is its S
        {"caption_sets": (("syn_text_a", 0),)},
        {"caption_sets": (("syn_text_a-b", 1), ("syn_text_a_b", 1))},  # both name the set a_b
        {"caption_sets": (("syn_text_default", 1),)},
        {"caption_sets": (("captions", 1),)},
        {"transforms": ("rand_augment",)},
        {"transforms": ("random_resized_crop", "sharpen")},
        {"transforms": ("resize", "random_resized_crop")},
        {"transforms": ("rand_augment", "random_resized_crop")},
        {"reference_max_side": 0},
        {"norm_tolerance": 0.0},
        {"view_size": 0},
        {"augment": records.AugmentSpec(num_ops=-1)},
    ],
)
def test_bad_layouts_are_value_errors(kwargs):
    with pytest.raises(datacompdr.DataCompDRError):
        DataCompDRLayout(**kwargs)


# --------------------------------------------------------------------------- several caption sets (DFNDR, RayGen)

# RayGen's keys: syn.json ``syn_text{tag}``, embeddings ``<key>_emb``; ``dci-short`` is a real DFN CoCa fine-tune name.
SETS = {"syn_text": 5, "syn_text_dci-short": 2, "syn_text_dfn_mscoco38k": 3}
SET_NAMES = {"syn_text": "default", "syn_text_dci-short": "dci_short", "syn_text_dfn_mscoco38k": "dfn_mscoco38k"}


class MultiSetSource:
    """One joined tar in the multi-set layout (RayGen's split ``text_emb`` + ``<key>_emb``), with a sample lacking a
    set's captions and one lacking a set's embeddings."""

    def __init__(self, root: Path) -> None:
        self.src = str(root / "multi")
        rng = np.random.default_rng(7)
        self.expected: dict[str, dict] = {}
        samples = []
        for i, (key, drop) in enumerate(
            [
                ("m0", None),
                ("m1", None),
                ("m2", "syn:syn_text_dci-short"),
                ("m3", "emb:syn_text_dfn_mscoco38k"),
                ("m4", None),
            ]
        ):
            syn = {k: [f"{k} caption {j} of {key}" for j in range(n)] for k, n in SETS.items()}
            emb = {"image_emb": unit_rows(rng, K), "text_emb": unit_rows(rng, 1)}
            emb |= {f"{k}_emb": unit_rows(rng, n) for k, n in SETS.items()}
            if drop:
                where, _, set_key = drop.partition(":")
                (syn if where == "syn" else emb).pop(set_key if where == "syn" else f"{set_key}_emb")
            width, height = 32 + i, 24
            members = {
                "png": encode_image(width, height, 40 + i),
                "txt": f"real caption of {key}".encode(),
                "json": json.dumps({"uid": f"uid-{key}"}).encode(),
                "syn.json": json.dumps(syn).encode(),
                "paug.json": json.dumps({"param_aug": records_for(rng, (width, height))}).encode(),
                "npz" if i % 2 == 0 else "pth.gz": (npz_bytes if i % 2 == 0 else pth_gz_bytes)(**emb),
            }
            if i % 2:
                emb = {k: bf16_round_trip(v) for k, v in emb.items()}
            samples.append((key, members))
            self.expected[key] = {"syn": syn, "emb": emb, "drop": drop}
        write_tar_shard(storage.join(self.src, "00000000.tar"), samples)

    def halves(self, key: str, emb_key: str) -> dict[str, np.ndarray]:
        rows = self.expected[key]["emb"][emb_key]
        return {
            n: h / np.linalg.norm(h, axis=1, keepdims=True) for n, h in zip(NAMES, np.split(rows, 2, 1), strict=True)
        }


def test_every_caption_set_of_the_source_is_imported_by_name_as_parts_training_reads(tmp_path: Path):
    source = MultiSetSource(tmp_path)
    (shard,) = conversion.list_source_shards(source.src)
    found = datacompdr.find_caption_sets(shard.uri)
    assert found == SETS  # syn_text first, then by key
    S, caption_sets = conversion.choose_caption_sets(found)
    layout = DataCompDRLayout(
        num_augmentations=K, num_syn_captions=S, caption_sets=caption_sets, reference_max_side=None
    )
    assert (S, layout.set_names) == (5, ("dci_short", "dfn_mscoco38k"))
    out = str(tmp_path / "out")
    manifest = conversion.convert(source.src, out, layout=layout)

    dataset = records.open_dataset(out, require_teachers=NAMES, extra_files="error")  # parts' footers checked
    assert manifest.caption_sets == {SET_NAMES[k]: n for k, n in SETS.items()}
    assert dict(manifest.skipped) == {"missing_caption_set": 2}  # m2 lacks a set's captions, m3 its embeddings
    part = manifest.part("captions__dfn_mscoco38k")
    assert (part.captioner.name, part.teachers) == ("syn_text_dfn_mscoco38k", NAMES)
    keys = ["m0", "m1", "m4"]
    columns = [records.SYN_CAPTIONS, *(records.text_emb_column(n) for n in NAMES)]
    for key, _ in caption_sets:
        name = SET_NAMES[key]
        columns += [records.syn_captions_column(name), *(records.set_text_emb_column(n, name) for n in NAMES)]
    table = records.read_shard_with_parts(out, dataset.manifest, manifest.shards[0].path, [records.KEY, *columns])
    assert table.column(records.KEY).to_pylist() == keys
    for i, key in enumerate(keys):
        want = source.expected[key]
        assert table.column(records.SYN_CAPTIONS)[i].as_py() == want["syn"]["syn_text"]
        for name, halves in source.halves(key, "syn_text_emb").items():  # the default set: rows 1.. of text_emb
            np.testing.assert_allclose(records.text_embeddings(table, name)[i, 1:], halves, atol=1e-4)
        for set_key, _ in caption_sets:
            set_name = SET_NAMES[set_key]
            assert table.column(records.syn_captions_column(set_name))[i].as_py() == want["syn"][set_key]
            for name, halves in source.halves(key, f"{set_key}_emb").items():  # fp16 of unit vectors: ~2e-5
                column = table.column(records.set_text_emb_column(name, set_name))
                np.testing.assert_allclose(records.fixed_shape_numpy(column)[i], halves, atol=1e-4)

    # A rerun keeps every file; a lost part file reconverts its shard alone.
    before = file_stats(out)
    assert without_time(conversion.convert(source.src, out, layout=layout)) == without_time(manifest)
    assert file_stats(out) == before
    storage.delete(storage.join(out, records.part_file("captions__dci_short", manifest.shards[0].path)))
    assert without_time(conversion.convert(source.src, out, layout=layout)) == without_time(manifest)
    records.open_dataset(out, extra_files="error")


def test_chosen_caption_sets_only_and_a_non_default_set_trains(tmp_path: Path):
    """DFNDR's training reads one set (run_dfndr2b.sh: ``^syn_text_dfn_mscoco38k$``): imported alone, the base is an
    embeddings-only dataset, the set a part, and one training step on it draws its captions and its targets."""
    from clipdr.config import Config, TrainConfig, TrainLoss
    from clipdr.train import data, pipeline
    from clipdr.train.loop import Step, build_student
    from clipdr.train.plan import make_plan

    source = MultiSetSource(tmp_path)
    with pytest.raises(
        datacompdr.DataCompDRError, match=r"names \['syn_text_coca'\], which the source's syn.json lacks"
    ):
        conversion.choose_caption_sets(SETS, ["syn_text_coca"])
    S, caption_sets = conversion.choose_caption_sets(SETS, ["syn_text_dfn_mscoco38k"])
    layout = DataCompDRLayout(
        num_augmentations=K, num_syn_captions=S, caption_sets=caption_sets, reference_max_side=None
    )
    out = str(tmp_path / "out")
    manifest = conversion.convert(source.src, out, layout=layout)
    assert (manifest.num_syn_captions, manifest.captioner, manifest.caption_sets) == (0, None, {"dfn_mscoco38k": 3})
    assert dict(manifest.skipped) == {"missing_caption_set": 1}  # m3; m2 lacks only a set not imported
    assert records.SYN_CAPTIONS not in manifest.schema().names

    student = "clipdr-tiny-vit"
    cfg = Config(
        train=TrainConfig(data=out, model=student, loss=TrainLoss(kd_weight=0.5), syn_caption_sets=("dfn_mscoco38k",))
    )
    plan = make_plan(cfg, list(manifest.teachers), dataset_caption_sets=manifest.caption_sets)
    assert plan.syn_caption_sets == ("dfn_mscoco38k",) and plan.num_syn_captions == 3
    shard = manifest.shards[0].path
    columns = pipeline._columns(plan, manifest, 0)  # epoch 0's drawn view and caption
    table = records.read_shard_with_parts(out, manifest, shard, columns)
    preprocess = data.student_preprocess(student)
    out_batch = data.ReplayBatch(manifest, preprocess, student, seed=0, epoch=0, caption_sets=plan.syn_caption_sets)(
        table
    )
    j = out_batch[data.SYN_INDEX]
    sets = [records.set_text_emb_column(name, "dfn_mscoco38k") for name in NAMES]
    whole = records.read_shard_with_parts(out, manifest, shard, [records.syn_captions_column("dfn_mscoco38k"), *sets])
    for name, column in zip(NAMES, sets, strict=True):
        stored = records.stacked(whole, column)  # every row, in either layout
        assert (out_batch[data.teacher_syn_text_column(name)] == stored[range(len(j)), j]).all()
    texts = whole.column(records.syn_captions_column("dfn_mscoco38k")).to_pylist()
    want = data._tokenize(
        data._tokenizer(student, preprocess.context_length),
        [t[k] for t, k in zip(texts, j, strict=True)],
        preprocess.context_length,
    )
    assert (out_batch[data.SYN_TEXT] == want).all()

    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in out_batch.items() if isinstance(v, np.ndarray)}
    model = build_student(plan, torch.device("cpu"))
    parts = Step(model, plan, torch.device("cpu"))(batch)
    assert {"kd_loss_syn", "clip_loss_syn"} <= set(parts) and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
