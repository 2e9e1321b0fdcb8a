"""``clipdr datacompdr`` end to end through Ray: shards in the published layout with img2dataset's numbered keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipdr import augparams, records, storage
from clipdr.cli import main
from clipdr.data import datacompdr
from clipdr.data.sources import write_tar_shard
from tests.unit.test_datacompdr import D, encode_image, npz_bytes, unit_rows

pytestmark = pytest.mark.integration

K, S = 3, 5  # S: DataCompDR's, which the CLI does not change
NAMES = tuple(t.name for t in datacompdr.DATACOMPDR_TEACHERS)
OP = {name: index for index, name in enumerate(datacompdr.DATACOMPDR_OP_NAMES)}
# torchvision v1 magnitudes as DataCompDR stores them; TranslateX is in pixels of the 224-px view, Solarize in grey
# levels, so the conversion to clipdr's resolution-free values is checked too.
OPS = ([[OP["TranslateX"], -30.45], [OP["Solarize"], 178.5]], [[OP["Color"], 0.27], [OP["Posterize"], 7.0]])
BAD_OPS = [[OP["Identity"], 0.0], [OP["Color"], -1.5]]  # Color factor 1 + m below 0: replay cannot apply it


def sample(rng: np.random.Generator, shard: int, i: int, ops: list = ()) -> tuple[str, dict, dict]:
    """One joined sample as img2dataset numbers it (``<shard><index>``), DataComp's uid only in its ``json``."""
    key = f"{shard:05d}{i:04d}"
    paug = [[[k, 2 * k, 20 - k, 30 - k], ops or OPS[(i + k) % 2]] for k in range(K)]
    image_KE, text_RE = unit_rows(rng, K), unit_rows(rng, 1 + S)
    uid = rng.bytes(16).hex()
    members = {
        "jpg": encode_image(40, 30, seed=100 * shard + i, fmt="JPEG"),
        "txt": f"caption {key}\n".encode(),
        "url.txt": f"https://example.com/{uid}.jpg".encode(),
        "json": json.dumps({"uid": uid, "sha256": "0" * 64}).encode(),
        "syn.json": json.dumps({"syn_text": [f"synthetic {j} of {key}" for j in range(S)]}).encode(),
        "paug.json": json.dumps({"param_aug": paug}).encode(),
        "npz": npz_bytes(image_emb=image_KE, text_emb=text_RE),
    }
    expected = {"uid": uid, "caption": f"caption {key}", "paug": paug, "image_KE": image_KE, "text_RE": text_RE}
    return key, members, expected


def expected_view(record: list) -> augparams.AugParams:
    (top, left, height, width), ops = record
    scale = {"TranslateX": 1 / 224, "Solarize": 1 / 255}
    mapped = tuple((op, m * scale.get(datacompdr.DATACOMPDR_OP_NAMES[op], 1.0)) for op, m in ops)
    return augparams.AugParams(top, left, height, width, False, mapped)


def test_cli_converts_numbered_shards_through_ray(ray_local, tmp_path, capsys):
    rng = np.random.default_rng(0)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    expected, keys_by_shard = {}, []
    for shard in range(3):
        samples = [sample(rng, shard, i) for i in range(3)]
        if shard == 1:
            samples.insert(1, sample(rng, shard, 9, BAD_OPS))
            samples[1][2]["skip"] = True
        write_tar_shard(storage.join(src, f"{shard:05d}.tar"), [(key, members) for key, members, _ in samples])
        expected.update({key: want for key, _, want in samples})
        keys_by_shard.append([key for key, _, want in samples if "skip" not in want])  # tar order

    argv = ["datacompdr", "--set", f"datacompdr.source={src}", "--set", f"datacompdr.output={out}"]
    assert main([*argv, "--set", f"datacompdr.num_augmentations={K}"]) == 0
    assert f"9 samples (1 skipped) -> {out}" in capsys.readouterr().out

    dataset = records.open_dataset(out, require_teachers=NAMES, min_syn_captions=S, extra_files="error")
    manifest = dataset.manifest
    assert dict(manifest.skipped) == {str(datacompdr.DataCompDRSkipReason.INVALID_MAGNITUDE): 1}
    assert [(s.path, s.num_rows) for s in manifest.shards] == [(f"{i:05d}.parquet", 3) for i in range(3)]
    assert manifest.has_uid and manifest.num_augmentations == K
    for uri, keys in zip(dataset.shard_uris, keys_by_shard, strict=True):
        table = records.read_shard(uri)
        assert table.column(records.KEY).to_pylist() == keys
        assert table.column(records.UID).to_pylist() == [expected[key]["uid"] for key in keys]
        assert table.column(records.CAPTION).to_pylist() == [expected[key]["caption"] for key in keys]
        views_NKL = records.aug_params(table)
        for i, key in enumerate(keys):
            want = expected[key]
            assert table.column(records.SYN_CAPTIONS)[i].as_py() == [f"synthetic {j} of {key}" for j in range(S)]
            assert augparams.views_from_array(views_NKL[i]) == [expected_view(r) for r in want["paug"]]
            for t, name in enumerate(NAMES):  # fp16 storage of unit vectors
                half = slice(t * D, (t + 1) * D)
                np.testing.assert_allclose(
                    records.image_embeddings(table, name)[i], want["image_KE"][:, half], atol=1e-3
                )
                np.testing.assert_allclose(records.text_embeddings(table, name)[i], want["text_RE"][:, half], atol=1e-3)
