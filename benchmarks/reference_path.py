"""A slow reference path that executes DMDNet the way the authors' code does.

It runs the same modules and weights as the fast path, with the authors' execution
swapped in: per-sample Python loops with integer slicing and ``F.interpolate`` for the
component crops and pastes (boxes copied to the host), the dictionary ``repeat``-ed per
batch item, spectral norms recomputed in every conv, NCHW tensors, and the generic branch
always computed before the whole decoder runs again for the reference-based one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from dmdnet_plugin import model as model_module
from dmdnet_plugin.identity import atoms_on
from dmdnet_plugin.layers import set_sn_folding


def loop_crop_resize(feat: torch.Tensor, box: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    loc = (box // stride).int().cpu().numpy()
    feat = feat.clone()
    return torch.cat(
        [
            F.interpolate(feat[i : i + 1, :, y1:y2, x1:x2], (size, size), mode="bilinear", align_corners=False)
            for i, (x1, y1, x2, y2) in enumerate(loc)
        ]
    )


def loop_paste_resize(feat: torch.Tensor, part: torch.Tensor, box: torch.Tensor, stride: int) -> torch.Tensor:
    loc = (box // stride).int().cpu().numpy()
    out = feat.clone()
    for i, (x1, y1, x2, y2) in enumerate(loc):
        out[i : i + 1, :, y1:y2, x1:x2] = F.interpolate(
            part[i : i + 1].clone(), (y2 - y1, x2 - x1), mode="bilinear", align_corners=False
        )
    return out


def repeat_read_memory(key: torch.Tensor, value: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    sim = F.conv2d(query, key)
    score = F.softmax(sim / math.sqrt(sim.size(1)), dim=1)
    b = score.shape[0]
    v_in = value.reshape(value.shape[0], -1).repeat(b, 1, 1)
    out = torch.bmm(score.view(b, -1).unsqueeze(1), v_in).squeeze(1)
    torch.argmax(score, dim=1)  # the official read also returns the best atom per face
    return out.view(b, *value.shape[1:])


@contextlib.contextmanager
def authors_execution(net: torch.nn.Module) -> Iterator[None]:
    set_sn_folding(net, False)
    try:
        with mock.patch.multiple(
            model_module,
            crop_resize=loop_crop_resize,
            paste_resize=loop_paste_resize,
            read_memory=repeat_read_memory,
        ):
            yield
    finally:
        set_sn_folding(net, True)


def reference_restore(net, lq: torch.Tensor, boxes: torch.Tensor, identity=None) -> torch.Tensor:
    """Same result as ``net.restore`` (fp32), computed the slow way."""
    device = next(net.parameters()).device
    atoms = atoms_on(identity, device) if identity is not None else None
    net.eval()
    with authors_execution(net), torch.no_grad():
        out = net(lq.to(device).contiguous(), boxes.to(device), identity_atoms=atoms, generic=True)
    return out.generic if identity is None else out.identity
