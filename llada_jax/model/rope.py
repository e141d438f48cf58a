"""RoPE inverse frequencies, with the scalings LLaMA checkpoints use, as transformers computes them.

    scaling = RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0, ...}, max_positions)
    inv_freq_h = inv_freq(head_dim=128, theta=500000.0, scaling=scaling)   # float32 [hd / 2]

Types (transformers' modeling_rope_utils.py): "default" (none), "linear" (every inverse
frequency divided by `factor`) and "llama3" (wavelengths longer than original_context /
low_freq_factor divided by `factor`, shorter than original_context / high_freq_factor kept, a
smooth blend in between). The blend rewrites the frequencies themselves, so it changes the
logits at every position, not only past the original context. Computed in float32 NumPy in
transformers' order of operations, once per config (a constant under jit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_TYPES = ("default", "linear", "llama3")
_FIELDS = {"linear": ("factor",),
           "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings")}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One RoPE scaling (frozen, hashable: part of the jit-static ModelConfig)."""
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, rope: dict[str, Any] | None, max_position_embeddings: int,
                where: str = "rope_scaling") -> tuple[RopeScaling, list[str]]:
        """An HF rope dict (`rope_scaling` or `rope_parameters`) -> (scaling, problems)."""
        rope = dict(rope or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_TYPES:
            return cls(), [f"{where}.rope_type={rope_type!r}: only {SUPPORTED_TYPES} RoPE is "
                           f"implemented (yarn, dynamic, longrope, ... are not)"]
        problems = []
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"{where}.partial_rotary_factor={rope['partial_rotary_factor']}: "
                            f"only full rotary embeddings (1.0) are implemented")
        if rope_type == "llama3":  # transformers' default for a missing original context
            rope.setdefault("original_max_position_embeddings", max_position_embeddings)
        needed = _FIELDS.get(rope_type, ())
        problems += [f"{where}.{name} is missing (rope_type {rope_type!r} needs it)"
                     for name in needed if name not in rope]
        if problems:
            return cls(), problems
        values = {name: rope[name] for name in needed}
        if rope_type == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
            problems.append(f"{where}: high_freq_factor={values['high_freq_factor']} must be "
                            f"greater than low_freq_factor={values['low_freq_factor']}")
        return cls(rope_type=rope_type, **values), problems

    def to_hf(self) -> dict[str, Any] | None:
        """The HF dict of this scaling (None for plain RoPE), `rope_theta` not included."""
        if self.rope_type == "default":
            return None
        return {"rope_type": self.rope_type} | {f: getattr(self, f) for f in _FIELDS[self.rope_type]}


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """float32 [head_dim // 2]: the inverse frequencies of the half-split rotation."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base = np.float32(1.0) / (np.float32(theta) ** exponent)
    scaling = scaling or RopeScaling()
    if scaling.rope_type == "linear":
        return base / np.float32(scaling.factor)
    if scaling.rope_type != "llama3":
        return base
    factor = np.float32(scaling.factor)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelen = np.float32(2 * math.pi) / base
    scaled = np.where(wavelen > context / low, base / factor, base).astype(np.float32)
    smooth = ((np.float32(context) / wavelen - np.float32(low)) / np.float32(high - low))
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return np.where(medium, blended, scaled).astype(np.float32)
