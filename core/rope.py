"""YaRN rotary position embedding parameters (gpt-oss: NTK-by-parts interpolation + attention concentration).

The angle of frequency i at position p is ``p * inv_freq[i]``; cos and sin are multiplied by the
``concentration`` (YaRN's attention temperature, 0.1 ln(factor) + 1), which is equivalent to scaling
both q and k.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def yarn_inv_freq(config: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """(inv_freq (d/2,), concentration) for ``config``; dtype float64 for the float64 oracle."""
    d = config.head_dim
    base, factor = config.rope_theta, config.rope_scaling_factor
    freq = base ** (torch.arange(0, d, 2, dtype=dtype) / d)  # (d/2,) wavelength / 2π of each pair
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    d_half = d / 2
    # Dimensions rotating fewer than rope_ntk_alpha times over the original context are interpolated
    # (divided by factor), those rotating more than rope_ntk_beta times are kept (extrapolated); a
    # linear ramp blends the ones in between.
    low = d_half * math.log(config.initial_context_length / (config.rope_ntk_beta * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(config.initial_context_length / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
    interpolation = 1.0 / (factor * freq)
    extrapolation = 1.0 / freq
    ramp = (torch.arange(d_half, dtype=dtype) - low) / (high - low)
    keep = 1 - ramp.clamp(0, 1)  # 1 → extrapolate (high-frequency dims), 0 → interpolate
    return interpolation * (1 - keep) + extrapolation * keep, concentration
