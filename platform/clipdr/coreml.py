"""CoreML encoders: a torch encoder -> an ML program package (``.mlpackage``), through ``torch.export``.

The route, and why. coremltools (9.0, the pinned version) converts TorchScript (``torch.jit.trace``) or a
``torch.export`` ExportedProgram; it dropped ONNX input in version 6. It is tested against torch up to 2.7 and warns
on clipdr's torch 2.14.1. Tracing fails on open_clip's towers (the ViT's trace fails its own consistency check; the
MCi and MCt traces carry ``int`` casts of dynamic shapes that the converter rejects), while the ExportedProgram of
each fused tower (``run_decompositions({})``: the ATEN dialect the converter expects) converts. With an
ExportedProgram coremltools takes input and output names, types and shapes from the program, not from ``inputs=`` /
``outputs=``: so no ``ImageType`` input (the image input is the preprocessed float tensor, as for ONNX), and the
names are set afterwards on the saved spec.

Settings (see docs/export.md): ML program, fp16 compute precision (the Neural Engine computes in fp16 only; fp32
would run on GPU/CPU and double the weights), minimum deployment target iOS 16 / macOS 13 (the first with fp16
ML program outputs), batch dimension 1..``MAX_BATCH``.

Prediction needs macOS (Core ML itself): on Linux a package is converted, saved and its spec read, not run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MAX_BATCH = 64  # upper bound of the batch dimension in the packages (Core ML needs a bounded range)
DEPLOYMENT_TARGET = "iOS16"
COMPUTE_PRECISION = "float16"
# Spec dtypes the converter gives: float32 pixels in (preprocessed), int32 tokens in (Core ML has no int64
# multi-arrays; token ids < 49,408 fit), float16 embeddings out (fp16 compute precision).
INPUT_DTYPES = {"image": "FLOAT32", "text": "INT32"}
OUTPUT_DTYPE = "FLOAT16"


class CoreMLUnavailable(ImportError):
    """coremltools is not installed (it is the optional extra ``clipdr[coreml]``)."""


def _coremltools() -> Any:
    try:
        with _quiet():
            import coremltools
    except ImportError:
        raise CoreMLUnavailable(
            "export.coreml needs coremltools: pip install 'clipdr[coreml]' (coremltools 9.0)"
        ) from None
    return coremltools


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # coremltools logs a warning per conversion that torch 2.14.1 is above its tested 2.7 (documented) and issues
    # DeprecationWarnings about its own internals (_TORCH_OPS_REGISTRY); on import it logs that its sklearn converter
    # and its Core ML runtime (macOS only) are unavailable. None is news to an export log.
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def exported_program(module: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """The ExportedProgram coremltools converts: ``module`` (eval) with a free batch dimension, ATEN dialect.

    ``example`` needs a batch of at least 2: torch.export specialises a dimension of size 1.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    return program.run_decompositions({})


def convert(program: torch.export.ExportedProgram, input_name: str, output_name: str) -> Any:
    """``program`` as a Core ML ML program (a ``coremltools.models.MLModel``) with the given feature names."""
    ct = _coremltools()
    with _quiet():
        converted = ct.convert(
            program,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        )
        spec = converted.get_spec()
        ct.utils.rename_feature(spec, spec.description.input[0].name, input_name)
        ct.utils.rename_feature(spec, spec.description.output[0].name, output_name)
        # skip_model_load: compiling needs macOS; on Linux the converter skips it too.
        return ct.models.MLModel(spec, weights_dir=converted.weights_dir, skip_model_load=True)


def save(model: Any, path: Path, description: dict[str, str]) -> None:
    """Saves ``model`` as ``path`` (an ``.mlpackage`` folder) with short descriptions of its features."""
    for feature in (*model.input_description, *model.output_description):
        if feature in description:
            (model.input_description if feature in model.input_description else model.output_description)[feature] = (
                description[feature]
            )
    model.short_description = description.get("", "")
    model.save(str(path))


def load_spec(path: str | Path) -> Any:
    """The spec (protobuf ``Model``) of a saved package, without compiling it (works on Linux)."""
    ct = _coremltools()
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def describe(path: str | Path) -> dict[str, Any]:
    """Inputs and outputs of a saved package: ``{"inputs": {name: {"dtype", "shape", "batch"}}, "outputs": ...}``.

    ``shape`` is the default shape, ``batch`` the (lower, upper) range of the first dimension ((1, 1) if fixed).
    """
    spec = load_spec(path)
    ct = _coremltools()
    array_type = ct.proto.FeatureTypes_pb2.ArrayFeatureType

    def feature(f: Any) -> dict[str, Any]:
        array = f.type.multiArrayType
        ranges = array.shapeRange.sizeRanges
        return {
            "dtype": array_type.ArrayDataType.Name(array.dataType),
            "shape": list(array.shape),
            "batch": [ranges[0].lowerBound, ranges[0].upperBound] if ranges else [1, 1],
        }

    return {
        "inputs": {f.name: feature(f) for f in spec.description.input},
        "outputs": {f.name: feature(f) for f in spec.description.output},
        "spec_version": spec.specificationVersion,
    }


def op_types(path: str | Path) -> dict[str, int]:
    """How often each MIL op type occurs in a saved package's ``main`` function (all its blocks)."""
    counts: dict[str, int] = {}

    def walk(block: Any) -> None:
        for op in block.operations:
            counts[op.type] = counts.get(op.type, 0) + 1
            for nested in op.blocks:
                walk(nested)

    for block in load_spec(path).mlProgram.functions["main"].block_specializations.values():
        walk(block)
    return counts


def package_sha256(path: Path) -> tuple[int, str]:
    """``(bytes, sha256)`` of a package folder: every file's relative path and content, in sorted order."""
    digest = hashlib.sha256()
    size = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        data = file.read_bytes()
        digest.update(hashlib.sha256(data).digest())
        size += len(data)
    return size, digest.hexdigest()
