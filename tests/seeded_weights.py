"""Deterministic DMDNet weights for parity tests, regenerable from a seed.

Expected outputs of the authors' code are committed for these weights (their code is not),
so the weights must come out identical anywhere: they are drawn with numpy's PCG64 stream,
not torch's initialisers. Each spectral norm gets ``u = W v / |W v|``, so sigma is the
conv's typical gain rather than its largest one; activations then keep their scale through
the deep net and both dictionary branches visibly change the output.
"""

from __future__ import annotations

import numpy as np
import torch

from dmdnet_plugin import DMDNet

GAIN = 0.3  # typical gain of every conv: 0.4 and up saturate the tanh (or overflow), 0.2 hides the dictionaries


def seeded_state_dict(net: DMDNet, seed: int = 0, gain: float = GAIN) -> dict[str, torch.Tensor]:
    """Weights for ``net``'s configuration (only its tensor names and shapes are used)."""
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.endswith("weight_u"):
            continue  # derived from weight_orig and weight_v below
        if name.endswith("weight_v"):
            v = rng.standard_normal(shape).astype(np.float32)
            v /= np.linalg.norm(v)
            prefix = name[: -len("weight_v")]
            w = state[prefix + "weight_orig"].reshape(shapes[prefix + "weight_orig"][0], -1)
            u = w.astype(np.float64) @ v.astype(np.float64)
            state[name] = v
            state[prefix + "weight_u"] = (u / (gain * np.linalg.norm(u))).astype(np.float32)
        elif name.endswith("bias"):
            state[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = rng.standard_normal(shape, dtype=np.float32)
    return {k: torch.from_numpy(state[k]) for k in shapes}
