"""Export: re-parameterisation parity, every documented open_clip route in a fresh process, ONNX parity, the card."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdr import export, models, quantize, tokenizer_assets
from clipdr.config import ExportConfig
from clipdr.evaluate import loading, preprocess_of
from clipdr.models.registry import MOBILECLIP_PREPROCESS


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


@dataclass(frozen=True)
class Exported:
    folder: Path
    result: export.ExportResult
    loaded: loading.LoadedModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """clipdr-tiny-vit exported with the (fast) TorchScript ONNX exporter.

    Built with MobileCLIP's preprocessing (mean 0, std 1, bilinear), not open_clip's default: the routes test
    must see a route that drops the trained preprocessing fail, as it would for every MobileCLIP variant.
    """
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = models.create_model("clipdr-tiny-vit", force_preprocess_cfg=MOBILECLIP_PREPROCESS.as_dict()).eval()
    loaded = loading.LoadedModel(model, "clipdr-tiny-vit", source="clipdr-tiny-vit", kind="name")
    run = types.SimpleNamespace(
        run_id="r123",
        run_name="demo-reinforced",
        metrics={"zeroshot/mean_top1": 0.5, "train/loss": 1.0, "retrieval/demo/image_retrieval_recall@1": 0.123456},
        params={
            "train.data": "data/demo/reinforced",
            "train.kd_weight": "1.0",
            "teacher.vit": json.dumps({"name": "vit", "model": "clipdr-tiny-vit", "pretrained": ""}),
        },
        tags={"clipdr.mode": "reinforced"},
    )
    cfg = ExportConfig(output=str(folder), onnx_exporter="torchscript")
    return Exported(folder, export.export_model(loaded, cfg, run, log=lambda message: None), loaded)


@pytest.fixture(scope="module")
def exported_mci(tmp_path_factory):
    """clipdr-tiny-mci (a timm tower only clipdr registers), exported without ONNX (test_export_cli covers it)."""
    folder = tmp_path_factory.mktemp("export_mci")
    torch.manual_seed(0)
    loaded = loading.load("clipdr-tiny-mci")
    result = export.export_model(loaded, ExportConfig(output=str(folder), onnx=False), log=lambda message: None)
    return Exported(folder, result, loaded)


def test_export_writes_every_artifact_with_checks(exported):
    folder, result = exported.folder, exported.result
    names = {p.name for p in folder.iterdir()}
    assert names == {
        export.OPEN_CLIP_WEIGHTS,
        export.OPEN_CLIP_CONFIG,
        export.FUSED_WEIGHTS,
        export.IMAGE_ONNX,
        export.TEXT_ONNX,
        *export.VARIANT_FILES.values(),
        export.MANIFEST,
        export.MODEL_CARD,
        *tokenizer_assets.FILES,
    }
    manifest = json.loads((folder / export.MANIFEST).read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert set(manifest["files"]) == names - {export.MANIFEST, export.MODEL_CARD}
    assert max(manifest["parity"]["onnx"].values()) < 1e-4
    assert manifest["tokenizer"] == tokenizer_assets.CONFIG  # tests/unit/test_tokenizer_assets.py checks the files
    card = (folder / export.MODEL_CARD).read_text()
    for expected in ("## Architecture", "| mode | reinforced |", "data/demo/reinforced", "vit: clipdr-tiny-vit"):
        assert expected in card
    assert "| zeroshot/mean_top1 | 0.5000 |" in card and "train/loss" not in card


def test_onnx_encoders_match_torch_with_onnxruntime(exported):
    import onnxruntime

    image, tokens = export.example_inputs(exported.loaded.model, exported.loaded.name, batch_size=5, seed=3)
    ref_image, ref_text = export.embeddings(exported.loaded.model, image, tokens)
    for filename, inputs, reference in ((export.IMAGE_ONNX, image, ref_image), (export.TEXT_ONNX, tokens, ref_text)):
        session = onnxruntime.InferenceSession(str(exported.folder / filename), providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})  # batch 5, exported at 2
        assert output.shape == tuple(reference.shape)
        assert np.abs(output - reference.numpy()).max() < 1e-4, filename


def test_onnx_variants_are_typed_quantised_and_close_to_fp32(exported, tmp_path):
    """Each fp16 / int8 encoder: the graph's inputs and outputs as fp32's, its weights in the variant's type, and
    embeddings within the bound of its rounding (`quantize.ERROR_BOUND_FACTOR` x what rounding only the weights to
    the variant's grid gives) on inputs the export's own check did not use."""
    from onnx import load

    image, tokens = export.example_inputs(exported.loaded.model, exported.loaded.name, batch_size=5, seed=7)
    for (tower, variant), filename in export.VARIANT_FILES.items():
        base = exported.folder / (export.IMAGE_ONNX if tower == "image" else export.TEXT_ONNX)
        path = exported.folder / filename
        assert quantize.io_types(path) == quantize.io_types(base)
        assert quantize.io_types(path) == (
            {"image": "FLOAT", "image_embedding": "FLOAT"}
            if tower == "image"
            else {"text": "INT64", "text_embedding": "FLOAT"}
        )
        weights = quantize.initializer_types(path)
        if variant == "fp16":
            assert weights.get("FLOAT16", 0) > 0 and weights.get("FLOAT", 0) == 0, weights
        else:
            graph = load(str(path)).graph
            initializers = {t.name for t in graph.initializer}
            float_products = [
                n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers
            ]
            assert float_products == [], f"{filename}: matrix products left in fp32"
            assert {"MatMulInteger", "DynamicQuantizeLinear"} <= quantize.op_types(path)
            assert weights.get("INT8", 0) > weights.get("FLOAT", 0), weights
        inputs = image if tower == "image" else tokens
        reference = export.run_onnx(base, inputs)
        quantize.simulate_weight_rounding(base, variant, tmp_path / "rounded.onnx")
        bound = quantize.ERROR_BOUND_FACTOR * export.max_abs_diff(
            export.run_onnx(tmp_path / "rounded.onnx", inputs), reference
        )
        error = export.max_abs_diff(export.run_onnx(path, inputs, variant), reference)
        assert 0 < error <= bound, (filename, error, bound)
        assert path.stat().st_size < (0.7 if variant == "fp16" else 0.5) * base.stat().st_size, filename


def test_the_model_card_is_complete_and_its_evaluation_is_the_runs(exported):
    card = (exported.folder / export.MODEL_CARD).read_text()
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == list(export.CARD_SECTIONS)
    sections = dict(zip(headings, re.split(r"^## .*$", card, flags=re.M)[1:], strict=True))
    assert "Apache License 2.0" in sections["## License"]
    assert "Apple's MobileCLIP weights" in sections["## License"] and "DataCompDR" in sections["## License"]
    assert "inherits those terms" in sections["## License"]
    assert "data/demo/reinforced" in sections["## Training data"] and "license" in sections["## Training data"]
    # The evaluation table is the run's evaluation metrics, every one, at the card's precision.
    rows = re.findall(r"^\| ((?:zeroshot|retrieval)/\S+) \| ([0-9.]+) \|$", sections["## Evaluation"], flags=re.M)
    assert {k: float(v) for k, v in rows} == {
        "zeroshot/mean_top1": 0.5,
        "retrieval/demo/image_retrieval_recall@1": 0.1235,
    }
    # Every supported route is shown.
    how = sections["## How to load"]
    for expected in (
        export.OPEN_CLIP_WEIGHTS,
        export.FUSED_WEIGHTS,
        export.IMAGE_ONNX,
        export.TEXT_ONNX,
        *export.VARIANT_FILES.values(),
        *tokenizer_assets.FILES,
        "mlflow.pyfunc.load_model('runs:/r123/model')",
        "mlflow models serve -m runs:/r123/model",
        "disabled_optimizers=['NchwcTransformer']",
    ):
        assert expected in how, expected
    for (tower, variant), filename in export.VARIANT_FILES.items():
        assert re.search(rf"^\| {tower} \| {variant} \| ", sections["## Checks"], flags=re.M), filename


def test_coreml_packages_have_the_documented_spec_ops_and_fp16_weights(tmp_path):
    """``clipdr export`` with ``export.coreml`` (as docs/export.md shows it); the saved packages, read back as an
    app's Core ML would see them (spec only: predicting needs macOS, and coremltools on Linux has no Core ML
    runtime). What can be run here, the torch program each package was converted from, the export itself compared
    with the fused and trained models on other inputs (``parity.coreml``)."""
    from coremltools.models import MLModel
    from coremltools.proto import MIL_pb2

    from clipdr import coreml
    from clipdr.cli import main

    folder = tmp_path / "export"
    argv = ["export", "--set", "export.model=clipdr-tiny-vit", "--set", f"export.output={folder}"]
    assert main([*argv, "--set", "export.coreml=true", "--set", "export.onnx=false"]) == 0  # ONNX: tests above
    manifest = json.loads((folder / export.MANIFEST).read_text())
    assert {export.IMAGE_COREML, export.TEXT_COREML} <= set(manifest["files"])
    assert max(manifest["parity"]["coreml"].values()) < 1e-4
    size, context_length = manifest["preprocess"]["size"], manifest["architecture"]["context_length"]
    height, width = (size, size) if isinstance(size, int) else size
    params = manifest["parameters"]
    # gather: the token table; reduce_argmax: the end-of-text position the text tower pools at.
    text_ops = {"gather", "reduce_argmax", "reduce_l2_norm"}
    for filename, tower, shape, num_params, needed_ops in (
        (export.IMAGE_COREML, "image", [1, 3, height, width], params["image_fused"], {"conv", "reduce_l2_norm"}),
        (export.TEXT_COREML, "text", [1, context_length], params["text_fused"], text_ops),
    ):
        path = folder / filename
        spec = MLModel(str(path), skip_model_load=True).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        assert coreml.describe(path) == {
            "inputs": {tower: {"dtype": coreml.INPUT_DTYPES[tower], "shape": shape, "batch": [1, 64]}},
            "outputs": {f"{tower}_embedding": {"dtype": "FLOAT16", "shape": [], "batch": [1, 1]}},
            "spec_version": 7,  # iOS 16 / macOS 13
        }
        ops = coreml.op_types(path)
        assert needed_ops <= set(ops), ops
        # fp16 compute precision: the weights are stored in float16, and there are as many as the fused tower has
        # (up to the few constants the converter adds or folds: the ViT's attention mask, ...), none in float32.
        weights: dict[str, int] = {}
        for block in spec.mlProgram.functions["main"].block_specializations.values():
            for op in block.operations:
                if op.type == "const":
                    value = op.attributes["val"].type.tensorType
                    dtype = MIL_pb2.DataType.Name(value.dataType)
                    weights[dtype] = weights.get(dtype, 0) + int(np.prod([d.constant.size for d in value.dimensions]))
        assert "FLOAT32" not in weights, weights
        assert abs(weights["FLOAT16"] - num_params) < 0.01 * num_params, (weights, num_params)
        assert manifest["files"][filename]["sha256"] == coreml.package_sha256(path)[1]
    # The model card shows the Core ML route with these names.
    card = (folder / export.MODEL_CARD).read_text()
    how = card[card.index("## How to load") :]
    for expected in (
        "ct.models.MLModel('image_encoder.mlpackage')",
        "image_model.predict({'image': pixels})['image_embedding']",
        "ct.models.MLModel('text_encoder.mlpackage')",
        "text_model.predict({'text': tokens.astype('int32')})['text_embedding']",
        "float32 pixels (B, 3, H, W) from `preprocess` above",
        "B from 1 to 64",
    ):
        assert expected in how, expected
    assert f"| `{export.IMAGE_COREML}` |" in card and f"| `{export.TEXT_COREML}` |" in card


def test_coreml_without_coremltools_is_a_clear_error(tmp_path, monkeypatch):
    from clipdr import coreml

    def missing():
        raise coreml.CoreMLUnavailable("export.coreml needs coremltools: pip install 'clipdr[coreml]'")

    monkeypatch.setattr(coreml, "_coremltools", missing)
    with pytest.raises(export.ExportError, match=r"clipdr\[coreml\]"):
        export.export_model(
            loading.load("clipdr-tiny-vit"), ExportConfig(output=str(tmp_path), coreml=True), log=lambda m: None
        )
    assert not any(tmp_path.iterdir())


def test_quantized_benchmark_measures_an_export_at_toy_size(exported, tmp_path):
    """What `python jobs/benchmark.py quantized` runs (`benchmarks.main`), on this module's export and a tiny world:
    the table has every variant, the fp32 ONNX row's deltas are zero by construction, the sizes are the files'."""
    from clipdr import benchmarks
    from clipdr.config import SynthConfig
    from clipdr.data import synthetic

    world = SynthConfig(
        output=str(tmp_path / "world"), num_teacher=0, num_student=0, num_zeroshot=8, num_retrieval=8, image_size=32
    )
    synthetic.generate(world)
    output = tmp_path / "quantized.md"
    toy = ["--export", str(exported.folder), "--zeroshot", f"{world.output}/zeroshot", "--retrieval"]
    toy += [f"{world.output}/retrieval", "--batch-sizes", "2", "--iters", "1", "--warmup", "0", "--output", str(output)]
    assert benchmarks.main(["quantized", *toy], prog="jobs/benchmark.py") == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in output.read_text().splitlines()[4:]}
    assert list(rows) == ["torch fp32 (trained)", "ONNX fp32", "ONNX fp16", "ONNX int8"]
    assert rows["ONNX fp32"][1].endswith("(+0.0000)") and rows["ONNX fp32"][2].endswith("(+0.0000)")
    for variant, image_file in (("fp32", export.IMAGE_ONNX), ("fp16", export.VARIANT_FILES["image", "fp16"])):
        assert float(rows[f"ONNX {variant}"][3]) == round((exported.folder / image_file).stat().st_size / 1e6, 2)


# Runs every documented loading snippet of each export, as written, in a fresh process: those without
# `import clipdr.models` first, each checked to have left clipdr unimported (it is importable here, through
# PYTHONPATH or the editable install, so "plain open_clip" is what sys.modules shows, not what fails to import).
# Then the route the docs warn against: name + weights file without the image_* arguments. Embeds raw image
# files with each route's own preprocess and tokenizer, and saves the embeddings.
_ROUTES_SCRIPT = """
import json, sys
import open_clip, torch, torch.nn.functional as F
from PIL import Image

spec = json.loads(open(sys.argv[1]).read())
images = [Image.open(path) for path in spec["images"]]

@torch.no_grad()
def embed_images(model, preprocess):
    return F.normalize(model.encode_image(torch.stack([preprocess(image) for image in images])), dim=-1)

@torch.no_grad()
def embed_captions(model, tokenizer):
    return F.normalize(model.encode_text(tokenizer(spec["captions"])), dim=-1)

out = {}
for exp in spec["exports"]:
    if exp["needs_clipdr"]:  # what the snippets' `import clipdr.models` is for
        try:
            open_clip.create_model_and_transforms("local-dir:" + exp["folder"])
            raise AssertionError(exp["name"] + " loaded without clipdr: its snippets import clipdr needlessly")
        except RuntimeError as e:
            assert "Unknown model" in str(e), e
runs = [(exp, route, code) for exp in spec["exports"] for route, code in exp["routes"].items()]
for exp, route, code in sorted(runs, key=lambda run: "import clipdr" in run[2]):
    scope = {}
    exec(code, scope)
    assert "import clipdr" in code or "clipdr" not in sys.modules, route
    model = scope["model"]
    out[exp["name"] + "/" + route] = embed_images(model, scope["preprocess"]), embed_captions(model, scope["tokenizer"])
for exp in spec["exports"]:
    model, _, preprocess = open_clip.create_model_and_transforms(exp["name"], pretrained=exp["weights"])
    out[exp["name"] + "/without preprocessing"] = embed_images(model.eval(), preprocess)
torch.save(out, spec["out"])
"""

# Same float32 ops on the same weights and pixels on both sides; only kernel choice and summation order may differ
# between processes. 2**10 eps is the worst-case relative rounding of one float32 sum of 2**10 terms, about the
# widest reductions in these towers; a different preprocessing moves embeddings by orders of magnitude more.
_ROUTE_TOL = 2**10 * torch.finfo(torch.float32).eps


def test_every_documented_route_gives_the_trained_model_and_its_preprocessing(exported, exported_mci, tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i, (height, width) in enumerate([(45, 70), (96, 52), (33, 33)]):  # not the input size: resize and crop act
        images.append(tmp_path / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    captions = ["a photo of a red circle.", "two small blue squares."]
    spec = {"images": [str(p) for p in images], "captions": captions, "out": str(tmp_path / "out.pt"), "exports": []}
    for exp in (exported, exported_mci):
        manifest = exp.result.manifest
        card = (exp.folder / export.MODEL_CARD).read_text()
        assert set(manifest["load"]) == {"local-dir", "name"}
        assert all(code.rstrip() in card for code in manifest["load"].values()), "the card shows every route"
        spec["exports"].append(
            {
                "name": exp.loaded.name,
                "folder": str(exp.folder),
                "weights": str(exp.folder / export.OPEN_CLIP_WEIGHTS),
                "needs_clipdr": models.needs_clipdr(models.model_config(exp.loaded.name)),
                "routes": {r: code.replace(export.FOLDER, str(exp.folder)) for r, code in manifest["load"].items()},
            }
        )
    assert [e["needs_clipdr"] for e in spec["exports"]] == [False, True]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-c", _ROUTES_SCRIPT, str(tmp_path / "spec.json")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    for exp in (exported, exported_mci):
        # The trained model through clipdr's own preprocessing (what evaluation uses) and tokenizer.
        model, name = exp.loaded.model, exp.loaded.name
        preprocess = preprocess_of(model)
        pixels = preprocess.batch([preprocess.to_pixels(Image.open(p)) for p in images], torch.device("cpu"))
        ref_image, ref_text = export.embeddings(model, pixels, models.get_tokenizer(name)(captions))
        for route in ("local-dir", "name"):
            image, text = got[f"{name}/{route}"]
            assert export.max_abs_diff(image, ref_image) <= _ROUTE_TOL, (name, route)
            assert export.max_abs_diff(text, ref_text) <= _ROUTE_TOL, (name, route)
        # The check can fail: the same weights through open_clip's default preprocessing embed images differently.
        assert export.max_abs_diff(got[f"{name}/without preprocessing"], ref_image) > _ROUTE_TOL, name


def test_routes_import_clipdr_only_where_open_clip_needs_it():
    def routes(name, architecture=None):
        model_cfg = models.model_config(architecture or name)
        preprocess_cfg = MOBILECLIP_PREPROCESS.as_dict()
        return export.load_routes({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "clipdr": {"model": name}})

    # MobileCLIP2-S0's tower is timm's own fastvit_mci0 and its config is open_clip's: open_clip alone loads it.
    assert not any("import clipdr" in code for code in routes("MobileCLIP2-S0").values())
    # clipdr-tiny-vit is built of open_clip parts, but only clipdr's config folder names it.
    assert ["import clipdr" in code for code in routes("clipdr-tiny-vit").values()] == [False, True]
    for name in ("clipdr-tiny-mci", "MobileCLIP-S0"):  # a clipdr timm tower; MCt
        assert all("import clipdr.models" in code for code in routes(name).values())
    # open_clip ignores pretrained=<file> for hf-hub: / local-dir: names: no by-name route for those.
    assert set(routes("hf-hub:someone/tiny-vit", architecture="clipdr-tiny-vit")) == {"local-dir"}


def test_unknown_exporter_is_refused(tmp_path):
    loaded = loading.load("clipdr-tiny-vit")
    with pytest.raises(export.ExportError, match="onnx_exporter must be one of"):
        export.export_model(loaded, ExportConfig(output=str(tmp_path), onnx_exporter="tflite"), log=lambda m: None)


@pytest.mark.parametrize("layout", ["sections", "flat"])
def test_the_model_card_reads_a_runs_params_in_either_layout_of_train(layout):
    """Runs logged before [train] had sections logged ``train.kd_weight``, now ``train.loss.kd_weight``."""
    prefix = "train.loss." if layout == "sections" else "train."
    params = {f"{prefix}kd_weight": "0.5", f"{prefix}use_syn_captions": "True", "train.mode": "reinforced"}
    run = types.SimpleNamespace(run_id="r1", run_name="n", params=params, tags={})
    info = export._training_info(loading.LoadedModel(None, "m", source="m", kind="name"), run)
    assert (info["knowledge-distillation weight"], info["synthetic captions"], info["mode"]) == (
        "0.5",
        "True",
        "reinforced",
    )
