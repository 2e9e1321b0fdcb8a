"""Export a trained model for use outside clipdr: open_clip weights, the fused model, ONNX encoders, a model card.

An export folder holds::

    open_clip_model.safetensors   the trained (unfused) weights, for open_clip (see "Loading" below)
    open_clip_config.json         open_clip's model_cfg + preprocess_cfg: create_model_and_transforms(
                                  "local-dir:<folder>") loads config, weights *and* preprocessing in one call
    fused_model.safetensors       the re-parameterised weights (every MobileOne / RepMixer branch fused):
                                  clipdr.export.load_fused(name, <this file>)
    image_encoder.onnx            fused image tower: image (B, 3, H, W) float32, preprocessed -> image_embedding
    text_encoder.onnx             fused text tower: text (B, L) int64 tokens -> text_embedding (both L2-normalised)
    image_encoder.mlpackage,      with export.coreml: the fused towers as Core ML ML programs (`clipdr.coreml`):
    text_encoder.mlpackage        image float32 / text int32 in, float16 L2-normalised embeddings out
    export.json                   what was exported, from where, checksums, parity measurements
    MODEL_CARD.md                 architecture, parameters, training data and teachers, metrics, usage
    vocab.json, merges.txt,       the tokenizer for apps without Python (`clipdr.tokenizer_assets`):
    tokenizer.json                BPE vocabulary and merges, cleaning, pre-split pattern, special ids, truncation

Why two weight files: open_clip builds a model from its JSON config, and the configs describe the train-time
architecture (timm's FastViT / MCi with MobileOne branches, MCt's RepMixers); open_clip 3.3 forwards no timm
kwargs (such as ``inference_mode``) that would build fused modules instead. A fused state dict therefore has
keys no open_clip config produces. So the open_clip file keeps the trained, unfused weights (which also stay
fine-tunable: fusing folds BatchNorm statistics in and cannot be undone), and the fused form, for inference,
is a separate file and the ONNX graphs. Fusing changes outputs only by float rounding: the export checks that
fused and ONNX embeddings match the trained model's within ``export.tolerance`` and records the differences.

WiSE-FT (``export.wise_alpha``): the exported weights are ``start + alpha * (finetuned - start)`` of a fine-tuned
model and the start its run recorded (`clipdr.evaluate.loading.with_wise_ft`); ``export.json`` keeps them under
``wise_ft`` (alpha, start, where the fine-tuned weights came from) and the model card says so.

Loading: `load_routes` writes the exact open_clip calls into ``export.json`` and the model card, and lists only
calls that give the trained preprocessing. ``create_model_and_transforms(name, pretrained=<file>)`` alone does
not: open_clip takes preprocessing from a pretrained *tag* and otherwise falls back to its defaults (OpenAI
mean/std, bicubic), so that route passes the preprocessing as ``image_*`` arguments. ``local-dir:`` reads it from
``open_clip_config.json``. Architectures with clipdr's own towers (the tiny MCi timm model, the MCt text tower)
need ``import clipdr.models`` first on either route: open_clip 3.3 forwards no timm kwargs, so no stock timm name
can describe the tiny MCi.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import clipdr
from clipdr import coreml, models, quantize, storage, tokenizer_assets, wiseft
from clipdr.config import MOVED, Config, ExportConfig
from clipdr.evaluate.loading import LoadedModel

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
FUSED_WEIGHTS = "fused_model.safetensors"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
IMAGE_COREML = "image_encoder.mlpackage"  # folders (Core ML packages), not files
TEXT_COREML = "text_encoder.mlpackage"
# The smaller ONNX variants beside each fp32 encoder (`clipdr.quantize`): image_encoder.fp16.onnx, ...int8.onnx.
ONNX_VARIANTS = tuple(v for v in quantize.VARIANTS if v != "fp32")
VARIANT_FILES = {
    (tower, variant): quantize.variant_path(base, variant).name
    for tower, base in (("image", IMAGE_ONNX), ("text", TEXT_ONNX))
    for variant in ONNX_VARIANTS
}
MANIFEST = "export.json"
MODEL_CARD = "MODEL_CARD.md"
_ALL_FILES = (
    OPEN_CLIP_WEIGHTS,
    OPEN_CLIP_CONFIG,
    FUSED_WEIGHTS,
    IMAGE_ONNX,
    TEXT_ONNX,
    *VARIANT_FILES.values(),
    IMAGE_COREML,
    TEXT_COREML,
    MANIFEST,
    MODEL_CARD,
    *tokenizer_assets.FILES,
)
EXPORTERS = ("dynamo", "torchscript")
_EXAMPLE_CAPTIONS = ("a photo of a red circle.", "two small blue squares on a striped background.", "a dog")
_ONNX_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GiB limit, with room: larger graphs keep weights beside
# Stands for the export folder in the loading snippets: the folder moves (S3, MLflow artifacts, downloads).
FOLDER = "<this folder>"


class ExportError(ValueError):
    """A model or setting that cannot be exported, or an export that fails its parity checks."""


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and its manifest (the content of ``export.json``)."""

    output: str
    manifest: dict[str, Any]


# --------------------------------------------------------------------------- encoders and parity


class ImageEncoder(nn.Module):
    """``image_BCHW -> image_emb_BD``, L2-normalised: the image tower as exported."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, image_BCHW: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_image(image_BCHW), dim=-1)


class TextEncoder(nn.Module):
    """``tokens_BL -> text_emb_BD``, L2-normalised: the text tower as exported."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens_BL: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_text(tokens_BL), dim=-1)


def example_inputs(model: nn.Module, name: str, batch_size: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A reproducible batch of preprocessed-looking images (uniform pixels, the model's normalisation) and tokens."""
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    pixels_BCHW = torch.rand(batch_size, 3, height, width, generator=generator)
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)
    captions = [_EXAMPLE_CAPTIONS[i % len(_EXAMPLE_CAPTIONS)] for i in range(batch_size)]
    return (pixels_BCHW - mean) / std, models.get_tokenizer(name)(captions)


@torch.inference_mode()
def embeddings(model: nn.Module, image_BCHW: Tensor, tokens_BL: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalised (image, text) embeddings of ``model`` (eval mode), float32 on CPU."""
    return ImageEncoder(model)(image_BCHW).float(), TextEncoder(model)(tokens_BL).float()


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def fuse(model: nn.Module, name: str, tolerance: float) -> tuple[nn.Module, dict[str, float]]:
    """A re-parameterised copy of ``model`` and the largest embedding differences to it (image, text).

    Raises:
        ExportError: A difference exceeds ``tolerance``.
    """
    reference = model.eval()
    fused = models.reparameterize(reference)
    image_BCHW, tokens_BL = example_inputs(reference, name, batch_size=4)
    ref_image, ref_text = embeddings(reference, image_BCHW, tokens_BL)
    image, text = embeddings(fused, image_BCHW, tokens_BL)
    parity = {"image": max_abs_diff(image, ref_image), "text": max_abs_diff(text, ref_text)}
    _check(parity, tolerance, "fused model vs trained model")
    return fused, parity


def _check(parity: Mapping[str, float], tolerance: float, what: str) -> None:
    bad = {k: v for k, v in parity.items() if not v <= tolerance}  # "not <=" also catches NaN
    if bad:
        raise ExportError(f"{what}: embeddings differ by {bad} (max abs), more than export.tolerance {tolerance:g}")


def load_fused(name: str, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The fused model of an export: ``name``'s architecture, re-parameterised, with ``fused_model.safetensors``.

    Fusing a freshly built model gives the fused module structure; the file then fills it (strict).
    """
    from safetensors.torch import load_file

    model = models.reparameterize(models.create_model(name), inplace=True)
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval()


def load_trained(folder: str | Path) -> tuple[str, nn.Module]:
    """``(name, model)`` of a local export folder: the trained (unfused) model in eval mode, with the preprocessing
    the export records, from ``open_clip_config.json`` and ``open_clip_model.safetensors``."""
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / OPEN_CLIP_CONFIG).read_text())
    name = config["clipdr"]["model"]
    model = models.create_model(name, force_preprocess_cfg=config["preprocess_cfg"])
    model.load_state_dict(load_file(str(Path(folder) / OPEN_CLIP_WEIGHTS), device="cpu"))
    return name, model.eval()


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    # Cloned and contiguous: safetensors refuses tensors that share storage or are strided views.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- ONNX


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str, exporter: str
) -> None:
    """Exports one encoder with a dynamic batch dimension (the rest of the input shape is fixed)."""
    module = module.eval()
    num_params = sum(p.numel() * p.element_size() for p in module.parameters())
    if exporter == "dynamo":
        # torch.export based (the default exporter since torch 2.9); it prints progress unless verbose=False.
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=num_params > _ONNX_SINGLE_FILE_LIMIT,
            verbose=False,
        )
    elif exporter == "torchscript":
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation and traces Python conditionals: known, not news.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                dynamo=False,
            )
    else:
        raise ExportError(f"export.onnx_exporter must be one of {list(EXPORTERS)}, got {exporter!r}")


def run_onnx(path: Path, inputs: Tensor, variant: str = "fp32") -> Tensor:
    """Runs an exported encoder (of ``variant``, `quantize.VARIANTS`) with onnxruntime on CPU."""
    session = quantize.session(path, variant)
    (output,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    return torch.from_numpy(output)


def export_encoders(
    fused: nn.Module, reference: nn.Module, name: str, folder: Path, exporter: str, tolerance: float
) -> dict[str, float]:
    """Writes the ONNX image and text encoders of ``fused``; checks them against ``reference`` with onnxruntime.

    The check uses a batch size other than the export's (3 vs 2), so the batch dimension is known to be free.

    Returns:
        Max abs embedding differences: ONNX vs the fused torch model, and vs the trained model (image, text).
    """
    image_BCHW, tokens_BL = example_inputs(fused, name, batch_size=2)
    export_onnx(ImageEncoder(fused), image_BCHW, folder / IMAGE_ONNX, "image", "image_embedding", exporter)
    export_onnx(TextEncoder(fused), tokens_BL, folder / TEXT_ONNX, "text", "text_embedding", exporter)
    image_BCHW, tokens_BL = example_inputs(fused, name, batch_size=3, seed=1)
    fused_image, fused_text = embeddings(fused, image_BCHW, tokens_BL)
    ref_image, ref_text = embeddings(reference, image_BCHW, tokens_BL)
    onnx_image, onnx_text = run_onnx(folder / IMAGE_ONNX, image_BCHW), run_onnx(folder / TEXT_ONNX, tokens_BL)
    parity = {
        "image_vs_fused": max_abs_diff(onnx_image, fused_image),
        "text_vs_fused": max_abs_diff(onnx_text, fused_text),
        "image_vs_trained": max_abs_diff(onnx_image, ref_image),
        "text_vs_trained": max_abs_diff(onnx_text, ref_text),
    }
    _check(parity, tolerance, "ONNX (onnxruntime) vs torch")
    return parity


def export_variants(fused: nn.Module, name: str, folder: Path) -> dict[str, dict[str, float]]:
    """Writes the fp16 and int8 variants of both ONNX encoders in ``folder`` and checks them against fp32.

    A variant's max abs embedding difference to the fp32 graph must stay within `quantize.ERROR_BOUND_FACTOR` times
    the difference that rounding only its weights to the variant's grid gives (`quantize.simulate_weight_rounding`).

    Returns:
        ``{"image_fp16": {"max_abs_diff": ..., "weight_rounding": ..., "bound": ...}, ...}``.

    Raises:
        ExportError: A variant exceeds its bound.
    """
    image_BCHW, tokens_BL = example_inputs(fused, name, batch_size=3, seed=1)
    checks: dict[str, dict[str, float]] = {}
    for tower, base, inputs in (("image", IMAGE_ONNX, image_BCHW), ("text", TEXT_ONNX, tokens_BL)):
        reference = run_onnx(folder / base, inputs)
        for variant, path in quantize.write_variants(folder / base, ONNX_VARIANTS).items():
            with tempfile.TemporaryDirectory() as tmp:
                simulated = Path(tmp) / "weights_rounded.onnx"
                quantize.simulate_weight_rounding(folder / base, variant, simulated)
                weight_rounding = max_abs_diff(run_onnx(simulated, inputs), reference)
            error = max_abs_diff(run_onnx(path, inputs, variant), reference)
            bound = quantize.ERROR_BOUND_FACTOR * weight_rounding
            checks[f"{tower}_{variant}"] = {"max_abs_diff": error, "weight_rounding": weight_rounding, "bound": bound}
            if not error <= bound:
                raise ExportError(
                    f"{path.name}: embeddings differ from {base} by {error:.3g} (max abs), more than "
                    f"{quantize.ERROR_BOUND_FACTOR:g} x {weight_rounding:.3g}, the difference its weight rounding "
                    "alone gives"
                )
    return checks


# --------------------------------------------------------------------------- CoreML


def export_coreml(
    fused: nn.Module, reference: nn.Module, name: str, folder: Path, tolerance: float
) -> dict[str, float]:
    """Writes the Core ML image and text encoders of ``fused`` (`clipdr.coreml`) and checks what can be checked.

    Core ML predicts on macOS only. Here the ExportedProgram each package was converted from is run on other inputs
    (batch 3; exported at 2) and compared with the fused and trained models; the packages' specs are read back.

    Returns:
        Max abs embedding differences of the converted programs vs the fused and trained models (image, text).

    Raises:
        ExportError: A difference exceeds ``tolerance``, or a saved spec is not what was asked for.
    """
    image_BCHW, tokens_BL = example_inputs(fused, name, batch_size=2)
    check_image_BCHW, check_tokens_BL = example_inputs(fused, name, batch_size=3, seed=1)
    fused_image, fused_text = embeddings(fused, check_image_BCHW, check_tokens_BL)
    ref_image, ref_text = embeddings(reference, check_image_BCHW, check_tokens_BL)
    parity: dict[str, float] = {}
    for tower, encoder, example, check, fused_emb, ref_emb, filename in (
        ("image", ImageEncoder(fused), image_BCHW, check_image_BCHW, fused_image, ref_image, IMAGE_COREML),
        ("text", TextEncoder(fused), tokens_BL, check_tokens_BL, fused_text, ref_text, TEXT_COREML),
    ):
        program = coreml.exported_program(encoder, example)
        with torch.inference_mode():
            converted_emb = program.module()(check).float()
        parity[f"{tower}_program_vs_fused"] = max_abs_diff(converted_emb, fused_emb)
        parity[f"{tower}_program_vs_trained"] = max_abs_diff(converted_emb, ref_emb)
        output = f"{tower}_embedding"
        model = coreml.convert(program, tower, output)
        coreml.save(model, folder / filename, _coreml_descriptions(tower, name))
        described = coreml.describe(folder / filename)
        want_shape = list(example.shape[1:])
        got = described["inputs"].get(tower, {})
        if list(described["outputs"]) != [output] or got.get("shape", [])[1:] != want_shape:
            raise ExportError(f"{filename}: unexpected spec {described}")
    _check(parity, tolerance, "Core ML (the converted ExportedProgram) vs torch")
    return parity


def _coreml_descriptions(tower: str, name: str) -> dict[str, str]:
    if tower == "image":
        return {
            "": f"{name} image encoder (fused), clipdr",
            "image": "RGB pixels (B, 3, H, W), preprocessed: resized, cropped, scaled to [0, 1], minus mean, over std",
            "image_embedding": "L2-normalised image embedding (B, D)",
        }
    return {
        "": f"{name} text encoder (fused), clipdr",
        "text": "token ids (B, context length) from the model's tokenizer (tokenizer.json), right-padded with 0",
        "text_embedding": "L2-normalised text embedding (B, D)",
    }


# --------------------------------------------------------------------------- open_clip files


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def open_clip_config(model: nn.Module, name: str) -> dict[str, Any]:
    """open_clip's ``open_clip_config.json`` (what hf-hub / local-dir models carry): model and preprocess config."""
    try:
        model_cfg = models.model_config(name)
    except ValueError as e:
        raise ExportError(f"cannot export {name!r}: {e}") from None
    preprocess = {k: _plain(v) for k, v in model.visual.preprocess_cfg.items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess, "clipdr": {"model": name}}


def load_routes(config: Mapping[str, Any]) -> dict[str, str]:
    """The documented ways to load an export with open_clip: Python snippets, with `FOLDER` for the export folder.

    Each snippet defines ``model`` (eval mode, trained weights), ``preprocess`` (the inference preprocessing the
    model was trained with) and ``tokenizer``.

    Args:
        config: The export's ``open_clip_config.json`` content (`open_clip_config`).

    Returns:
        ``{"local-dir": ..., "name": ...}``: config, weights and preprocessing from the folder; or the model's
        name with the weights file and the preprocessing spelled out. No ``name`` route for a model named
        ``hf-hub:`` / ``local-dir:``: open_clip ignores ``pretrained`` for those and would load their own weights.
    """
    name, pp = config["clipdr"]["model"], config["preprocess_cfg"]
    q = json.dumps  # a Python string literal in double quotes
    needs_towers = models.needs_clipdr(config["model_cfg"])
    towers = "import clipdr.models  # registers clipdr's towers (tiny MCi, MCt): open_clip alone cannot build them\n"
    configs = "import clipdr.models  # registers clipdr's model configs and towers\n"
    local_dir = (
        "import open_clip\n"
        + (towers if needs_towers else "")
        + f"\nmodel, _, preprocess = open_clip.create_model_and_transforms({q('local-dir:' + FOLDER)})\n"
        + "model.eval()\n"
        + f"tokenizer = open_clip.get_tokenizer({q('local-dir:' + FOLDER)})\n"
    )
    if name.startswith(("hf-hub:", "local-dir:")):
        return {"local-dir": local_dir}
    by_name = (
        "import open_clip\n"
        + (configs if needs_towers or models.is_clipdr_config(name) else "")
        + "\n# The image_* arguments are needed: without them open_clip uses its defaults (OpenAI mean/std, bicubic).\n"
        + "model, _, preprocess = open_clip.create_model_and_transforms(\n"
        + f"    {q(name)},\n"
        + f"    pretrained={q(FOLDER + '/' + OPEN_CLIP_WEIGHTS)},\n"
        + f"    image_mean={tuple(pp['mean'])!r},\n"
        + f"    image_std={tuple(pp['std'])!r},\n"
        + f"    image_interpolation={q(pp['interpolation'])},\n"
        + f"    image_resize_mode={q(pp['resize_mode'])},\n"
        + ")\n"
        + "model.eval()\n"
        + f"tokenizer = open_clip.get_tokenizer({q(name)})\n"
    )
    return {"local-dir": local_dir, "name": by_name}


def _tower_params(model: nn.Module) -> tuple[int, int]:
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual.") and "logit_" not in n)
    return image, text


# --------------------------------------------------------------------------- model card


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def model_card(manifest: Mapping[str, Any], run: Any | None) -> str:
    """The markdown model card of an export (``run``: the training run's `tracking.RunSummary`, when known)."""
    name = manifest["model"]
    arch = manifest["architecture"]
    params = manifest["parameters"]
    pp = manifest["preprocess"]
    lines = [
        f"# {name}",
        "",
        f"Exported by clipdr {manifest['clipdr_version']} on {manifest['exported_at']} from `{manifest['source']}`.",
        "",
        "## Intended use",
        "",
        "Image and text embeddings in one space (CLIP): zero-shot image classification by comparing an image's "
        "embedding with embeddings of class prompts, and image-text retrieval, on servers (MLflow, onnxruntime) or "
        "on devices (ONNX, with the tokenizer files). For research and for products whose images resemble the "
        "training data; measure on your own data before relying on it (see Limitations).",
        "",
        "## License",
        "",
        "clipdr, the code that trained and exported this model, is under the Apache License 2.0. The weights carry "
        "the terms of what they were made from. Apple's MobileCLIP weights and the DataCompDR datasets are "
        "published under their own terms (see apple/ml-mobileclip, apple/ml-mobileclip-dr and the DataCompDR "
        "dataset cards); a model initialised from those weights, distilled from them as teachers, or trained on "
        "DataCompDR inherits those terms, and so does this export. " + _inherited_terms(manifest.get("training") or {}),
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{name}` ({arch['family']}) |",
        f"| image tower | {arch['image_tower']} |",
        f"| text tower | {arch['text_tower']} |",
        f"| embedding dim | {arch['embed_dim']} |",
        f"| input | {pp['size']} px, resize {pp['resize_mode']} ({pp['interpolation']}), mean {pp['mean']}, "
        f"std {pp['std']} |",
        f"| text | {arch['context_length']} tokens, open_clip tokenizer of `{name}` |",
        f"| parameters (M) | image {params['image_fused'] / 1e6:.2f} fused / {params['image'] / 1e6:.2f} "
        f"train-time; text {params['text_fused'] / 1e6:.2f} fused / {params['text'] / 1e6:.2f} train-time |",
        f"| logit scale | {manifest['logit_scale']:.2f} |",
        "",
        "## Training data",
        "",
    ]
    training = manifest.get("training") or {}
    if training:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in training.items()]
    else:
        lines.append("Unknown: the model was not loaded from a clipdr training checkpoint or MLflow run.")
    wise = manifest.get("wise_ft")
    if wise:
        lines += [
            "",
            f"**WiSE-FT**: these weights are start + {wise['alpha']:g} x (fine-tuned - start), per tensor: the start "
            f"`{wise['start']}` (what the training run started from), the fine-tuned weights `{wise['finetuned']}`.",
        ]
    lines += [
        "",
        "The data's license is the dataset's: clipdr's synthetic world (`clipdr synth`) is generated (shapes, "
        "colours, template captions) and holds no third-party content; DataCompDR carries its own terms (see "
        "License), and its images remain their owners'.",
        "",
        "## Evaluation",
        "",
    ]
    # At a WiSE-FT alpha, the run's metrics of that alpha (wise_ft/alpha_<a>/..., train.finetune.eval_alphas).
    prefix = f"{wiseft.alpha_label(wise['alpha'])}/" if wise else ""
    metrics = {
        k.removeprefix(prefix): v
        for k, v in sorted((run.metrics if run else {}).items())
        if k.startswith((f"{prefix}zeroshot/", f"{prefix}retrieval/"))
    }
    at = f" at WiSE-FT alpha {wise['alpha']:g} ({prefix}...)" if wise else ""
    if metrics:
        lines += [f"Latest values on the training run{at} (fractions in [0, 1]).", "", "| metric | value |"]
        lines += ["|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        set_alpha = f" with `evaluate.wise_alpha={wise['alpha']:g}` (it logs to a run of its own)" if wise else ""
        lines.append(f"Not evaluated{at} yet: run `clipdr evaluate` on the model{set_alpha}.")
    lines += [
        "",
        "## Limitations",
        "",
        "- Accuracy is what the Evaluation table shows, on those datasets only; a model trained on the synthetic "
        "world knows coloured shapes on textured backgrounds, not natural images.",
        "- English captions; text longer than the context length is truncated (the tokenizer keeps the first "
        f"{arch['context_length'] - 2} tokens).",
        "- Web-scale training data (DataCompDR) carries the biases of web alt-text and images; zero-shot labels "
        "reflect the prompts chosen. Not for identifying people or for decisions about them.",
        "- The fp16 and int8 ONNX encoders give slightly different embeddings from fp32 (see Checks); measure "
        "their accuracy on your task. The fp16 graphs are for hardware with fp16 arithmetic; on a CPU they are "
        "not faster.",
        "- The Core ML encoders (when exported) compute in float16 and return float16 embeddings; they are checked "
        "here through the torch program they were converted from, not run (Core ML predicts on macOS / iOS only).",
        "",
        "## Files",
        "",
        "| file | what | sha256 |",
        "|---|---|---|",
    ]
    what = {
        OPEN_CLIP_WEIGHTS: "trained (unfused) open_clip weights",
        OPEN_CLIP_CONFIG: "open_clip model + preprocess config",
        FUSED_WEIGHTS: "re-parameterised weights, for inference",
        IMAGE_ONNX: "fused image encoder -> L2-normalised embedding",
        TEXT_ONNX: "fused text encoder -> L2-normalised embedding",
        IMAGE_COREML: "fused image encoder, Core ML ML program (fp16 compute)",
        TEXT_COREML: "fused text encoder, Core ML ML program (fp16 compute)",
        **{
            file: f"{tower} encoder, {variant} ({_VARIANT_WHAT[variant]})"
            for (tower, variant), file in VARIANT_FILES.items()
        },
        **tokenizer_assets.FILES,
    }
    lines += [f"| `{f}` | {what[f]} | `{info['sha256'][:16]}` |" for f, info in manifest["files"].items()]
    parity = manifest["parity"]
    lines += [
        "",
        "## Checks",
        "",
        f"Max abs embedding difference (tolerance {manifest['tolerance']:g}): fused vs trained "
        f"{parity['fused']}; ONNX (onnxruntime) {parity.get('onnx', 'not exported')}; Core ML "
        f"{parity.get('coreml', 'not exported')} (the torch program each package was converted from: Core ML "
        "itself predicts on macOS only, and computes in fp16 there).",
        "",
    ]
    if parity.get("onnx_variants"):
        lines += [
            "ONNX variants against the fp32 graphs (max abs embedding difference; bound: "
            f"{quantize.ERROR_BOUND_FACTOR:g} x the difference that rounding only the weights gives):",
            "",
            "| encoder | variant | max abs difference | bound | file size vs fp32 |",
            "|---|---|---|---|---|",
        ]
        files = manifest["files"]
        for key, check in parity["onnx_variants"].items():
            tower, variant = key.split("_")
            base = IMAGE_ONNX if tower == "image" else TEXT_ONNX
            ratio = files[VARIANT_FILES[tower, variant]]["bytes"] / files[base]["bytes"]
            lines.append(f"| {tower} | {variant} | {check['max_abs_diff']:.2e} | {check['bound']:.2e} | {ratio:.2f} |")
        lines.append("")
    lines += [
        "## How to load",
        "",
        "**safetensors, with open_clip.** Each snippet gives the trained model (`model`), the preprocessing it was "
        f"trained with (`preprocess`: {pp['size']} px, resize {pp['resize_mode']} ({pp['interpolation']}), mean "
        f"{pp['mean']}, std {pp['std']}) and its tokenizer; `<this folder>` is this folder.",
        "",
        "Config, weights and preprocessing from this folder (`open_clip_config.json`):",
        "",
        "```python",
        manifest["load"]["local-dir"].rstrip("\n"),
        "```",
        "",
    ]
    if "name" in manifest["load"]:
        lines += [
            "By name, with the weights file and this model's preprocessing (without it, wrong embeddings and no "
            "warning):",
            "",
            "```python",
            manifest["load"]["name"].rstrip("\n"),
            "```",
            "",
        ]
    lines += [
        "**Fused safetensors**, for inference: `clipdr.models.reparameterize(model)`, or "
        f'`clipdr.export.load_fused("{name}", "{FOLDER}/{FUSED_WEIGHTS}")`; images through `preprocess` above.',
        "",
    ]
    if manifest.get("onnx"):
        variants = manifest["onnx"].get("variants", {})
        lines += [
            "**ONNX (fp32"
            + "".join(f", {v}" for v in variants)
            + ")**: `image` takes float32 pixels (B, 3, H, W) from `preprocess` above, `text` the tokenizer's int64 "
            "tokens (B, context length); both return float32 L2-normalised embeddings, whichever variant.",
            "",
            "```python",
            "import onnxruntime",
            "",
            f"image_session = onnxruntime.InferenceSession({IMAGE_ONNX!r})",
            "image_emb = image_session.run(None, {'image': pixels})[0]",
            f"text_session = onnxruntime.InferenceSession({TEXT_ONNX!r})",
            "text_emb = text_session.run(None, {'text': tokens})[0]",
        ]
        if "int8" in variants:
            lines.append(f"# int8: the same with {variants['int8']['image']!r} / {variants['int8']['text']!r}")
        if "fp16" in variants:
            lines += [
                f"# fp16: {variants['fp16']['image']!r} / {variants['fp16']['text']!r}; onnxruntime's CPU provider "
                "crashes on them in its NCHWc pass, so leave it out:",
                f"# onnxruntime.InferenceSession({variants['fp16']['image']!r}, "
                f"disabled_optimizers={list(quantize.FP16_DISABLED_OPTIMIZERS)!r})",
            ]
        lines += ["```", ""]
    if manifest.get("coreml"):
        lines += _coreml_card(manifest["coreml"], manifest["architecture"]["context_length"])
    if manifest.get("tokenizer"):
        lines += [
            f"**Tokenizer files**, for apps without Python: `{tokenizer_assets.VOCAB}`, `{tokenizer_assets.MERGES}` "
            f"and `{tokenizer_assets.CONFIG}` (cleaning rules, pre-split pattern, special ids, truncation, padding; "
            "the steps are in clipdr's docs/export.md).",
            "",
        ]
    model_uri = _mlflow_model_uri(manifest, run)
    lines += [
        "**MLflow pyfunc**: the model clipdr logged for this run takes raw images (encoded bytes; base64 over "
        "HTTP) and/or captions and returns L2-normalised embeddings, preprocessing and tokenising inside; its "
        "weights are safetensors, nothing is unpickled. Needs clipdr installed."
        + (" It holds the run's own weights, not this export's WiSE-FT." if manifest.get("wise_ft") else ""),
        "",
        "```python",
        "import mlflow.pyfunc",
        "import pandas as pd",
        "",
        f"served = mlflow.pyfunc.load_model({model_uri!r})",
        "rows = served.predict(pd.DataFrame({'image': [open('photo.jpg', 'rb').read(), None], "
        "'text': [None, 'a photo of a dog']}))",
        "rows['image_embedding'][0], rows['text_embedding'][1]",
        "```",
        "",
        f"Over HTTP: `mlflow models serve -m {model_uri} --env-manager local -h 127.0.0.1 -p 5000`, then POST "
        '`{"dataframe_records": [{"image": "<base64>"}, {"text": "a photo of a dog"}]}` to `/invocations`.',
        "",
        "The open_clip weights are the trained, unfused ones: open_clip's configs describe the train-time "
        "architecture (MobileOne / RepMixer branches), so fused weights would not load into them. Fusing is "
        "exact up to float rounding (see Checks).",
        "",
    ]
    return "\n".join(lines)


def _coreml_card(info: Mapping[str, Any], context_length: int) -> list[str]:
    image, text = info["image"], info["text"]
    return [
        f"**Core ML** (`{image['file']}`, `{text['file']}`; ML programs, {info['compute_precision']} compute, "
        f"{info['minimum_deployment_target']}+ / macOS 13+): `{image['input']}` takes float32 pixels (B, 3, H, W) "
        f"from `preprocess` above (not an image type: the mean / std are applied by the app), `{text['input']}` "
        f"int32 token ids (B, {context_length}) from the tokenizer files; both return float16 L2-normalised "
        f"`{image['output']}` / `{text['output']}`; B from 1 to {info['max_batch']}. Predicting needs macOS or iOS:",
        "",
        "```python",
        "import coremltools as ct",
        "",
        f"image_model = ct.models.MLModel({image['file']!r})",
        f"image_emb = image_model.predict({{{image['input']!r}: pixels}})[{image['output']!r}]",
        f"text_model = ct.models.MLModel({text['file']!r})",
        f"text_emb = text_model.predict({{{text['input']!r}: tokens.astype('int32')}})[{text['output']!r}]",
        "```",
        "",
        f"In Swift: `try MLModel(contentsOf: MLModel.compileModel(at: <url of {image['file']}>))`, inputs as "
        "`MLMultiArray`.",
        "",
    ]


_VARIANT_WHAT = {"fp16": "float16 weights and compute, float32 inputs and outputs", "int8": "dynamic int8 quantisation"}
# Section headings of the model card, in order (tests check them).
CARD_SECTIONS = (
    "## Intended use",
    "## License",
    "## Architecture",
    "## Training data",
    "## Evaluation",
    "## Limitations",
    "## Files",
    "## Checks",
    "## How to load",
)


def _inherited_terms(training: Mapping[str, Any]) -> str:
    """What the card can tell about this model's sources from its training run (initial weights, teachers, data)."""
    sources = [
        f"{key}: {training[key]}" for key in ("initialised from", "teachers", "data") if training.get(key) is not None
    ]
    if not sources:
        return "This export does not record what the model was trained from: check its training run."
    return "This model's training run records: " + "; ".join(sources) + "."


def _mlflow_model_uri(manifest: Mapping[str, Any], run: Any | None) -> str:
    """The MLflow model of this export: its source when that is one, else the model its training run logged."""
    source = str(manifest.get("source") or "")
    if source.startswith(("models:/", "runs:/")):
        return source
    run_id = run.run_id if run is not None else manifest.get("mlflow_run_id")
    if run_id:
        return f"runs:/{run_id}/model"
    return "models:/<registered name>@champion"


def _training_info(loaded: LoadedModel, run: Any | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    # A run logs its config flattened; runs logged before [train] had sections spell the moved keys the old way.
    params = {MOVED.get(k, k): v for k, v in run.params.items()} if run else {}
    tags = dict(run.tags) if run else {}
    mode = loaded.meta.get("mode") or params.get("train.mode") or tags.get("clipdr.mode")
    for key, value in (
        ("mode", mode),
        ("data", params.get("train.data")),
        ("samples seen", loaded.samples_seen),
        ("knowledge-distillation weight", params.get("train.loss.kd_weight")),
        ("synthetic captions", params.get("train.loss.use_syn_captions")),
        ("initialised from", params.get(wiseft.START_PARAM) or None),
        ("MLflow run", f"{run.run_name} ({run.run_id})" if run else loaded.run_id or None),
    ):
        if value not in (None, ""):
            info[key] = value
    teachers = []
    for key, value in sorted(params.items()):
        if key.startswith("teacher."):
            try:
                spec = json.loads(value)
                teachers.append(
                    f"{spec.get('name', key[8:])}: {spec.get('model')} ({spec.get('pretrained') or 'random'})"
                )
            except ValueError:
                teachers.append(key[8:])
    if teachers:
        info["teachers"] = "; ".join(teachers)
    return info


# --------------------------------------------------------------------------- the export


@contextlib.contextmanager
def _local_folder(output: str) -> Iterator[Path]:
    """A local folder to write into; for an ``s3://`` output, a temporary one uploaded when the block ends."""
    if storage.is_s3(output):
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
            for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):  # packages are folders
                storage.write_bytes(storage.join(output, path.relative_to(tmp).as_posix()), path.read_bytes())
        return
    folder = Path(storage.resolve(output)[1])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in _ALL_FILES:  # a previous export's files must not pass for this one's
        if (folder / stale).is_dir():
            shutil.rmtree(folder / stale)
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
    yield folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(
    loaded: LoadedModel,
    cfg: ExportConfig,
    run: Any | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes the export of ``loaded`` to ``cfg.output`` (see the module docstring).

    Args:
        loaded: The model (on CPU) and what is known about it.
        cfg: Output folder, ONNX settings, tolerance.
        run: The training run's `tracking.RunSummary`, for the model card's training data and metrics.
        log: Progress lines.

    Raises:
        ExportError: Unknown exporter, a model open_clip has no config for, or a failed parity check.
    """
    from safetensors.torch import save_file

    if cfg.coreml:
        try:
            coreml._coremltools()
        except coreml.CoreMLUnavailable as e:
            raise ExportError(str(e)) from None
    if cfg.onnx and cfg.onnx_exporter not in EXPORTERS:
        raise ExportError(f"export.onnx_exporter must be one of {list(EXPORTERS)}, got {cfg.onnx_exporter!r}")
    if not cfg.tolerance > 0:
        raise ExportError(f"export.tolerance must be positive, got {cfg.tolerance}")
    name, model = loaded.name, loaded.model.to("cpu").eval()
    config = open_clip_config(model, name)
    fused, fused_parity = fuse(model, name, cfg.tolerance)
    log(f"export: fused {name}; max abs embedding difference {fused_parity}")
    variant = models.get_variant(name) if name in models.list_variants() else None
    (image, text), (image_fused, text_fused) = _tower_params(model), _tower_params(fused)
    manifest: dict[str, Any] = {
        "model": name,
        "source": loaded.source,
        "mlflow_run_id": loaded.run_id,
        "clipdr_version": clipdr.__version__,
        "exported_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "architecture": {
            "family": variant.family if variant else "open_clip",
            "image_tower": variant.image_tower if variant else json.dumps(config["model_cfg"].get("vision_cfg")),
            "text_tower": variant.text_tower if variant else json.dumps(config["model_cfg"].get("text_cfg")),
            "embed_dim": config["model_cfg"]["embed_dim"],
            "context_length": int(getattr(model, "context_length", 77)),
        },
        "parameters": {"image": image, "text": text, "image_fused": image_fused, "text_fused": text_fused},
        "preprocess": config["preprocess_cfg"],
        "load": load_routes(config),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "training": _training_info(loaded, run),
        "wise_ft": loaded.wise_ft,
        "tolerance": cfg.tolerance,
        "parity": {"fused": fused_parity},
        "files": {},
    }
    with _local_folder(cfg.output) as folder:
        save_file(_state_dict(model), str(folder / OPEN_CLIP_WEIGHTS), metadata={"clipdr_model": name})
        (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(_state_dict(fused), str(folder / FUSED_WEIGHTS), metadata={"clipdr_model": name, "fused": "true"})
        tokenizer = models.get_tokenizer(name)
        reason = tokenizer_assets.unsupported(tokenizer)
        if reason:
            log(f"export: no tokenizer files: {reason}")
            manifest["tokenizer"] = None
        else:
            tokenizer_assets.write(tokenizer, folder)
            manifest["tokenizer"] = tokenizer_assets.CONFIG
        if cfg.onnx:
            log(f"export: ONNX encoders ({cfg.onnx_exporter} exporter)")
            manifest["parity"]["onnx"] = export_encoders(fused, model, name, folder, cfg.onnx_exporter, cfg.tolerance)
            log(f"export: ONNX variants {', '.join(ONNX_VARIANTS)}")
            manifest["parity"]["onnx_variants"] = export_variants(fused, name, folder)
            manifest["onnx"] = {
                "exporter": cfg.onnx_exporter,
                "image": {"input": "image", "output": "image_embedding"},
                "text": {"input": "text", "output": "text_embedding"},
                "variants": {
                    variant: {tower: VARIANT_FILES[tower, variant] for tower in ("image", "text")}
                    for variant in ONNX_VARIANTS
                },
            }
        if cfg.coreml:
            log(f"export: Core ML encoders (coremltools, {coreml.COMPUTE_PRECISION} compute)")
            manifest["parity"]["coreml"] = export_coreml(fused, model, name, folder, cfg.tolerance)
            manifest["coreml"] = {
                "compute_precision": coreml.COMPUTE_PRECISION,
                "minimum_deployment_target": coreml.DEPLOYMENT_TARGET,
                "max_batch": coreml.MAX_BATCH,
                "image": {"file": IMAGE_COREML, "input": "image", "output": "image_embedding"},
                "text": {"file": TEXT_COREML, "input": "text", "output": "text_embedding"},
            }
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in (MANIFEST, MODEL_CARD):
                manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            elif path.is_dir() and path.name in (IMAGE_COREML, TEXT_COREML):
                size, digest = coreml.package_sha256(path)
                manifest["files"][path.name] = {"bytes": size, "sha256": digest}
        (folder / MODEL_CARD).write_text(model_card(manifest, run))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"export: {len(manifest['files']) + 2} files -> {cfg.output}")
    return ExportResult(cfg.output, manifest)


def run(cfg: Config, log: Callable[[str], None] = print) -> ExportResult:
    """``clipdr export``: loads ``export.model``, exports it, and logs the folder to its MLflow run if it has one."""
    from clipdr import tracking
    from clipdr.evaluate import loading

    ec = cfg.export
    try:
        wise = loading.wise_ft_on(ec.wise_alpha, "export.wise_alpha")
        loaded = loading.load(
            ec.model, ec.pretrained, "cpu", tracking_uri=cfg.tracking.uri, allow_pickle=ec.allow_pickle
        )
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(f"export.model: {e}") from None
    if wise:
        try:
            loaded = loading.with_wise_ft(loaded, ec.wise_alpha, cfg.tracking.uri, "export.wise_alpha")
        except (ValueError, FileNotFoundError) as e:
            raise ExportError(str(e)) from None
        log(f"export: WiSE-FT at alpha {ec.wise_alpha:g} with the start {loaded.wise_ft['start']}")
    run_summary = None
    if loaded.run_id:
        try:
            run_summary = tracking.run_summary(loaded.run_id, uri=cfg.tracking.uri)
        except tracking.RegistryError:
            log(f"export: training run {loaded.run_id} is not in {tracking.tracking_uri(cfg.tracking.uri)}")
    result = export_model(loaded, ec, run_summary, log)
    if ec.log_artifacts and run_summary is not None:
        tracker = tracking.open_run(run_summary.run_id, uri=cfg.tracking.uri)
        # Beside the run's own export, not over it: export/wise_ft/alpha_0.30/...
        under = f"export/{wiseft.alpha_label(ec.wise_alpha)}" if loaded.wise_ft else "export"
        with _downloaded(ec.output) as folder:
            for path in sorted(folder.iterdir()):
                if path.is_dir():  # a Core ML package
                    tracker.log_artifacts(path, f"{under}/{path.name}")
                else:
                    tracker.log_artifact(path, under)
        log(f"export: logged to MLflow run {run_summary.run_id} under {under}/")
    return result


@contextlib.contextmanager
def _downloaded(output: str) -> Iterator[Path]:
    if not storage.is_s3(output):
        yield Path(storage.resolve(output)[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        prefix = output.rstrip("/") + "/"
        for uri in storage.list_files(output, recursive=True):
            local = Path(tmp) / uri[len(prefix) :] if uri.startswith(prefix) else Path(tmp) / storage.basename(uri)
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(uri))
        yield Path(tmp)
