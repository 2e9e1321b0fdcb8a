"""Smaller ONNX encoders: fp16 weights and compute, and int8 dynamic quantisation, derived from the fp32 graphs.

* ``fp16``: every float initializer and every float operation in float16 (`onnxruntime.transformers.float16`),
  with float32 inputs and outputs (``keep_io_types``) so that an app feeds the same pixels and reads the same
  embeddings as from the fp32 graph. Half the file; on CPUs without fp16 arithmetic onnxruntime computes some
  kernels through casts, so it is for devices with fp16 units (GPUs, phone NPUs), not a CPU speed-up.
* ``int8``: onnxruntime's dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`) of the ``MatMul`` /
  ``Gemm`` weights (int8, symmetric) and the token embedding table (``Gather``: uint8), one scale per tensor; each
  matrix product quantises its input activations at run time (uint8, one scale per call), multiplies in integers
  (``MatMulInteger``) and rescales; the table is dequantised after the lookup. Convolutions stay fp32:
  onnxruntime's CPU kernel for dynamically quantised convolutions (``ConvInteger``) takes uint8 weights only, and
  the int8 (``QInt8``) weights it would need give a graph onnxruntime cannot run. Static quantisation (activation
  scales from calibration data) is not done: it needs a calibration set per model and a per-op-type recipe.

`simulate_weight_rounding` rounds only the weights of an fp32 graph to a variant's grid and keeps fp32 compute:
the error it gives is the part of a variant's error that comes from its weights. The variant also rounds the
activations to the same grid (fp16: same unit roundoff; int8: the same number of levels per tensor), so its error
is about twice the simulated one; the tests allow four times (`ERROR_BOUND_FACTOR`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("fp32", "fp16", "int8")
# What the int8 variant quantises, and which input of each is the weight (module docstring: why not Conv).
QUANTIZED_WEIGHTS = {"MatMul": 1, "Gemm": 1, "Gather": 0}
# A variant rounds the weights and the activations of an op to the same grid; the simulation rounds the weights only:
# the two errors are of one size and add (x2), and may add in phase rather than at random (x2).
ERROR_BOUND_FACTOR = 4.0


def variant_path(fp32_path: str | Path, variant: str) -> Path:
    """``image_encoder.onnx`` -> ``image_encoder.fp16.onnx`` / ``image_encoder.int8.onnx`` (fp32: unchanged)."""
    _check_variant(variant)
    path = Path(fp32_path)
    return path if variant == "fp32" else path.with_name(f"{path.stem}.{variant}{path.suffix}")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def to_fp16(source: Path, target: Path) -> None:
    """Writes ``source`` with float16 weights and compute, float32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    # The converter appends the casts of the inputs after the nodes that read them; onnxruntime needs (and crashes
    # without) a graph in topological order.
    converted.topological_sort()
    onnx.checker.check_model(converted.model)
    onnx.save(converted.model, str(target))


class _DropPreprocessingHint(logging.Filter):
    # onnxruntime's quantiser logs (on the root logger, at every call) a hint to run its shape-inference
    # pre-processing first; that pre-processing is for static quantisation and graphs without shapes.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing before quantization")


def to_int8(source: Path, target: Path) -> None:
    """Writes ``source`` with int8 ``MatMul`` / ``Gemm`` weights and dynamically quantised activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hint = _DropPreprocessingHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_WEIGHTS),
            per_channel=False,
            extra_options={"MatMulConstBOnly": True},  # activation x activation (attention scores) stays fp32
        )
    finally:
        logging.getLogger().removeFilter(hint)


def write_variants(fp32_path: Path, variants: Sequence[str] = ("fp16", "int8")) -> dict[str, Path]:
    """Writes the variants of ``fp32_path`` beside it; ``{variant: path}``."""
    written = {}
    for variant in variants:
        _check_variant(variant)
        target = variant_path(fp32_path, variant)
        if variant == "fp16":
            to_fp16(fp32_path, target)
        elif variant == "int8":
            to_int8(fp32_path, target)
        else:
            continue
        written[variant] = target
    return written


def _quantize_dequantize_int8(weight: np.ndarray) -> np.ndarray:
    """onnxruntime's symmetric per-tensor int8 weight grid: scale = max |w| / 127, round half to even."""
    scale = float(np.abs(weight).max()) / 127.0
    if scale == 0.0:
        return weight
    return (np.clip(np.round(weight / scale), -127, 127) * scale).astype(weight.dtype)


def _quantize_dequantize_uint8(weight: np.ndarray) -> np.ndarray:
    """onnxruntime's asymmetric per-tensor uint8 grid (what it gives a ``Gather`` table): the range [min, max]
    widened to hold 0, in 255 steps, with an integer zero point."""
    low, high = min(float(weight.min()), 0.0), max(float(weight.max()), 0.0)
    scale = (high - low) / 255.0
    if scale == 0.0:
        return weight
    zero_point = np.round(-low / scale)
    quantized = np.clip(np.round(weight / scale) + zero_point, 0, 255)
    return ((quantized - zero_point) * scale).astype(weight.dtype)


def simulate_weight_rounding(fp32_path: Path, variant: str, target: Path) -> None:
    """Writes ``fp32_path`` with only the weights that ``variant`` stores in less precision rounded to its grid.

    fp16: every float32 initializer through float16 and back. int8: the weight input of every ``MatMul`` /
    ``Gemm`` (int8) or ``Gather`` (a token embedding table: uint8, the grid onnxruntime gives it) that is an
    initializer, quantised and dequantised as `to_int8` quantises it.
    """
    import onnx
    from onnx import numpy_helper

    _check_variant(variant)
    model = onnx.load(str(fp32_path))
    graph = model.graph
    if variant == "fp16":
        names = {t.name: "" for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    elif variant == "int8":
        initializers = {t.name for t in graph.initializer}
        names = {
            node.input[QUANTIZED_WEIGHTS[node.op_type]]: node.op_type
            for node in graph.node
            if node.op_type in QUANTIZED_WEIGHTS and node.input[QUANTIZED_WEIGHTS[node.op_type]] in initializers
        }
    else:
        names = {}
    for tensor in graph.initializer:
        if tensor.name not in names:
            continue
        weight = numpy_helper.to_array(tensor)
        if variant == "fp16":
            rounded = weight.astype(np.float16).astype(np.float32)
        elif names[tensor.name] == "Gather":
            rounded = _quantize_dequantize_uint8(weight)
        else:
            rounded = _quantize_dequantize_int8(weight)
        tensor.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), tensor.name))
    onnx.save(model, str(target))


def initializer_types(path: Path) -> dict[str, int]:
    """``{onnx element type name: number of initializer elements}`` of the graph at ``path``."""
    import onnx

    counts: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        counts[name] = counts.get(name, 0) + int(np.prod(tensor.dims, dtype=np.int64))
    return counts


def io_types(path: Path) -> dict[str, str]:
    """``{input or output name: onnx element type name}`` of the graph at ``path``."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {
        value.name: onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        for value in (*graph.input, *graph.output)
    }


def op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


# onnxruntime 1.32's CPU provider crashes (segmentation fault, while creating the session) on these fp16 graphs in
# its NCHWc layout pass; without that pass they load and run. Every session of an fp16 graph must leave it out.
FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def session(path: Path, variant: str = "fp32", num_threads: int = 0) -> Any:
    """An onnxruntime CPU session on ``path`` (a graph of ``variant``); ``num_threads`` 0: onnxruntime's default."""
    import onnxruntime

    _check_variant(variant)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    disabled = list(FP16_DISABLED_OPTIMIZERS) if variant == "fp16" else []
    return onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )
