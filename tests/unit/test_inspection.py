"""``clipdr inspect``: the manifest, column bytes, a few samples' captions and the PNG of their K views replayed."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from clipdr import augment, augparams, cli, inspection, records
from clipdr.data import sources
from tests.unit.test_train_data import NUM_ROWS, K, write_dataset

SIZE = 20


def test_inspect_prints_the_manifest_and_captions_and_writes_the_views(tmp_path, capsys):
    uri, manifest = write_dataset(tmp_path / "ds")
    sheet = tmp_path / "views.png"
    assert cli.main(["inspect", uri, "--samples", "2", "--size", str(SIZE), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"samples       {NUM_ROWS:,} in 1 shards; 0 skipped" in out
    assert "teacher       beta_xl: clipdr-tiny-vit (random init), D=24, 32px bicubic, default a_k 100" in out
    assert f"views         K={K} a sample" in out and "captions      S=2 synthetic a sample by synthetic" in out
    assert "  real        a photo of thing 1" in out and "  synthetic 1 synthetic 1 1" in out
    stored = inspection.column_bytes(records.open_dataset(uri).shard_uris)
    footer = pq.ParquetFile(records.open_dataset(uri).shard_uris[0]).metadata
    assert sum(stored.values()) == sum(
        footer.row_group(g).column(c).total_compressed_size
        for g in range(footer.num_row_groups)
        for c in range(footer.num_columns)
    )
    assert f"{stored[records.image_emb_column('alpha')] / NUM_ROWS:,.0f} bytes a sample" in out

    image = np.asarray(Image.open(sheet))
    step = SIZE + inspection.SHEET_PAD
    assert image.shape == (2 * step - inspection.SHEET_PAD, K * step - inspection.SHEET_PAD, 3)
    table = records.read_shard(records.open_dataset(uri).shard_uris[0])
    for row, k in ((0, 0), (1, K - 1)):  # the cell of (sample, view) is that view replayed from its parameters
        params = augparams.AugParams.from_array(records.aug_params(table)[row, k])
        decoded = sources.decode_rgb(table.column(records.IMAGE)[row].as_py())
        want = augment.replay_uint8(decoded, params, SIZE, "bicubic").numpy().transpose(1, 2, 0)
        assert np.array_equal(image[row * step : row * step + SIZE, k * step : k * step + SIZE], want)
    assert manifest.num_syn_captions == 2


def test_inspect_says_an_embeddings_only_dataset_has_no_captioner_and_refuses_other_folders(tmp_path, capsys):
    uri, _ = write_dataset(tmp_path / "ds", num_syn_captions=0)
    assert cli.main(["inspect", uri, "--samples", "1", "--size", "8", "--sheet", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "S=0: an embeddings-only pass" in out and "synthetic 0" not in out
    assert cli.main(["inspect", str(tmp_path), "--sheet", str(tmp_path / "x.png")]) == 2
    assert "no manifest.json" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
