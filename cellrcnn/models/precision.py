"""Inference precision: bfloat16 where the hardware computes it natively, float32 elsewhere.

On CPUs with AVX512-BF16 or AMX (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN's
bfloat16 convolutions are about 3x faster than float32 ones; elsewhere bfloat16 is emulated and
slower, so ``"auto"`` keeps float32 there. Only the network runs in bfloat16 (autocast): its
outputs, and everything after them, are float32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (a CUDA GPU of compute
    capability 8 or more, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):  # an older or differently built torch: stay exact
        return False


def use_bf16(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether inference in ``precision`` (one of :data:`PRECISIONS`) runs under bfloat16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bfloat16" or (precision == "auto" and native_bf16(device))
