"""Accelerators the cost estimates know: their dense bf16 peaks, the one table both dry runs (reinforce and train)
and the GPU check divide by."""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets, which quote the sparse
# figure (2x): H100 SXM 1,979 (https://www.nvidia.com/en-us/data-center/h100/), H200 SXM 1,979
# (https://www.nvidia.com/en-us/data-center/h200/), A100 312 dense (https://www.nvidia.com/content/dam/en-zz/
# Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), L4 242
# (https://www.nvidia.com/en-us/data-center/l4/).
PEAK_TFLOPS: dict[str, float] = {"h100-sxm": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0}


class AcceleratorError(ValueError):
    """A device no peak is known for."""


def peak_flops(device: str) -> float:
    """A device's dense bf16 peak in FLOP/s."""
    try:
        return PEAK_TFLOPS[device.lower()] * 1e12
    except KeyError:
        raise AcceleratorError(f"unknown device {device!r}; peaks are known for: {', '.join(PEAK_TFLOPS)}") from None


def device_of(name: str) -> str:
    """The `PEAK_TFLOPS` key of a CUDA device name (``torch.cuda.get_device_name``), e.g. "NVIDIA H200" -> h200."""
    lowered = name.lower()
    for key in ("h200", "h100", "a100", "l4"):
        if key in lowered:
            return "h100-sxm" if key == "h100" else key
    raise AcceleratorError(f"no peak is known for device {name!r}; known: {', '.join(PEAK_TFLOPS)}")
