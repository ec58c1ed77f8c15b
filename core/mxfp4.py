"""MXFP4 (OCP Microscaling FP4): provisional dequantize; the full spec module replaces this."""
from __future__ import annotations
import torch

VALUES_PER_BLOCK = 32  # E2M1 values sharing one E8M0 scale
BYTES_PER_BLOCK = 16  # 32 FP4 values, two per byte, low nibble first
SCALE_BIAS = 127  # E8M0 exponent bias
SCALE_NAN = 0xFF  # E8M0 encoding of NaN

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # (..., nb, 32)
    exp = scales.to(torch.int32) - SCALE_BIAS
    out = torch.ldexp(vals, exp.unsqueeze(-1).float())
    out = torch.where((scales == SCALE_NAN).unsqueeze(-1), torch.full_like(out, float("nan")), out)
    return out.flatten(-2).to(dtype)
