"""Export: re-parameterisation parity, open_clip reload in a fresh process, ONNX parity, the model card."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from clipdr import export, models
from clipdr.config import ExportConfig
from clipdr.evaluate import loading
from clipdr.models.registry import CONFIG_DIR


@pytest.mark.parametrize("name", ["clipdr-tiny-mci", "clipdr-tiny-mct"])
def test_reparameterised_model_matches_and_reloads(name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = models.create_model(name)
    fused, parity = export.fuse(model, name, tolerance=1e-5)
    assert parity["image"] < 1e-5 and parity["text"] < 1e-5
    # Something was fused: the MobileOne / RepMixer branches are gone from the state dict.
    assert set(fused.state_dict()) != set(model.state_dict())
    assert any("reparam" in key for key in fused.state_dict())

    save_file(export._state_dict(fused), str(tmp_path / export.FUSED_WEIGHTS))
    reloaded = export.load_fused(name, tmp_path / export.FUSED_WEIGHTS)
    image, tokens = export.example_inputs(model, name, batch_size=3)
    for got, want in zip(
        export.embeddings(reloaded, image, tokens), export.embeddings(fused, image, tokens), strict=True
    ):
        assert torch.equal(got, want)


def test_fuse_refuses_a_tolerance_it_cannot_meet():
    with pytest.raises(export.ExportError, match="fused model vs trained model"):
        export.fuse(models.create_model("clipdr-tiny-mci"), "clipdr-tiny-mci", tolerance=-1.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """clipdr-tiny-vit exported with the (fast) TorchScript ONNX exporter, and its reference embeddings."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    loaded = loading.load("clipdr-tiny-vit")
    run = types.SimpleNamespace(
        run_id="r123",
        run_name="demo-reinforced",
        metrics={"zeroshot/mean_top1": 0.5, "train/loss": 1.0},
        params={
            "train.data": "data/demo/reinforced",
            "train.kd_weight": "1.0",
            "teacher.vit": json.dumps({"name": "vit", "model": "clipdr-tiny-vit", "pretrained": ""}),
        },
        tags={"clipdr.mode": "reinforced"},
    )
    cfg = ExportConfig(output=str(folder), onnx_exporter="torchscript")
    result = export.export_model(loaded, cfg, run, log=lambda message: None)
    image, tokens = export.example_inputs(loaded.model, loaded.name, batch_size=5, seed=3)
    reference = export.embeddings(loaded.model, image, tokens)
    return folder, result, (image, tokens), reference


def test_export_writes_every_artifact_with_checks(exported):
    folder, result, _, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert names == {
        export.OPEN_CLIP_WEIGHTS,
        export.OPEN_CLIP_CONFIG,
        export.FUSED_WEIGHTS,
        export.IMAGE_ONNX,
        export.TEXT_ONNX,
        export.MANIFEST,
        export.MODEL_CARD,
    }
    manifest = json.loads((folder / export.MANIFEST).read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert set(manifest["files"]) == names - {export.MANIFEST, export.MODEL_CARD}
    assert max(manifest["parity"]["onnx"].values()) < 1e-4
    card = (folder / export.MODEL_CARD).read_text()
    for expected in ("## Architecture", "| mode | reinforced |", "data/demo/reinforced", "vit: clipdr-tiny-vit"):
        assert expected in card
    assert "| zeroshot/mean_top1 | 0.5000 |" in card and "train/loss" not in card


def test_onnx_encoders_match_torch_with_onnxruntime(exported):
    import onnxruntime

    folder, _, (image, tokens), (ref_image, ref_text) = exported
    for filename, inputs, reference in ((export.IMAGE_ONNX, image, ref_image), (export.TEXT_ONNX, tokens, ref_text)):
        session = onnxruntime.InferenceSession(str(folder / filename), providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})  # batch 5, exported at 2
        assert output.shape == tuple(reference.shape)
        assert np.abs(output - reference.numpy()).max() < 1e-4, filename


def test_plain_open_clip_reloads_the_export_in_a_fresh_process(exported):
    folder, _, (image, tokens), (ref_image, ref_text) = exported
    torch.save({"image": image, "tokens": tokens, "ref_image": ref_image, "ref_text": ref_text}, folder / "ref.pt")
    # No clipdr import: open_clip alone, by name + pretrained file (config registered from clipdr's JSON folder),
    # and by local-dir (config, weights and preprocessing from the export).
    script = textwrap.dedent(
        f"""
        import json, sys, torch, torch.nn.functional as F, open_clip
        assert "clipdr" not in sys.modules
        folder = {str(folder)!r}
        ref = torch.load(folder + "/ref.pt")
        open_clip.add_model_config({str(CONFIG_DIR)!r})
        by_name, _, _ = open_clip.create_model_and_transforms(
            "clipdr-tiny-vit", pretrained=folder + "/{export.OPEN_CLIP_WEIGHTS}")
        by_dir, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
        diffs = {{}}
        for label, model in (("by_name", by_name), ("by_dir", by_dir)):
            model.eval()
            with torch.no_grad():
                image = F.normalize(model.encode_image(ref["image"]), dim=-1)
                text = F.normalize(model.encode_text(ref["tokens"]), dim=-1)
            diffs[label] = float(max((image - ref["ref_image"]).abs().max(), (text - ref["ref_text"]).abs().max()))
        diffs["preprocess_cfg"] = by_dir.visual.preprocess_cfg
        print(json.dumps(diffs, default=list))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs["by_name"] < 1e-6 and diffs["by_dir"] < 1e-6
    exported_pp = json.loads((folder / export.OPEN_CLIP_CONFIG).read_text())["preprocess_cfg"]
    assert diffs["preprocess_cfg"]["mean"] == exported_pp["mean"]


def test_unknown_exporter_is_refused(tmp_path):
    loaded = loading.load("clipdr-tiny-vit")
    with pytest.raises(export.ExportError, match="onnx_exporter must be one of"):
        export.export_model(loaded, ExportConfig(output=str(tmp_path), onnx_exporter="tflite"), log=lambda m: None)
