"""Facial-component boxes and the batched crop / paste of their feature regions.

DMDNet reads its dictionaries for four boxes in the 512x512 crop (left eye, right eye,
nose, mouth; the nose box is computed but, as in the official net, carries no
dictionary). The official code crops and pastes those regions with a Python loop over
the batch and ``F.interpolate`` on integer slices. Here both are expressed as gathers
with the same bilinear taps (``align_corners=False``), so a whole batch with different
boxes runs in a few tensor ops with no host-device synchronisation.
"""

from __future__ import annotations

import numpy as np
import torch

COMPONENTS = ("le", "re", "no", "mo")
DICT_COMPONENTS = ("le", "re", "mo")  # components with dictionaries, in paste order
COMPONENT_INDEX = {name: i for i, name in enumerate(COMPONENTS)}
PART_SIZES = {"le": 80, "re": 80, "no": 50, "mo": 110}  # in 512x512 crop pixels
FEATURE_STRIDES = {256: 2, 128: 4, 64: 8}  # feature-map size -> stride w.r.t. the crop
CROP_SIZE = 512

_BROW_LE = list(range(17, 22)) + list(range(36, 42))
_BROW_RE = list(range(22, 27)) + list(range(42, 48))


def boxes_from_landmarks(landmarks68: np.ndarray) -> np.ndarray:
    """Component boxes ``[x1, y1, x2, y2]`` (rows: le, re, no, mo) from 68 landmarks.

    This is the authors' ``get_component_location`` heuristic, clipping included, so a
    checkpoint trained on their boxes sees the boxes it expects. The input is not modified.
    """
    lm = np.array(landmarks68, dtype=np.float64).reshape(68, 2)
    lm[lm > 504] = 504
    lm[lm < 8] = 8

    def eye(eye_idx: list[int], brow_idx: list[int]) -> np.ndarray:
        mean = lm[eye_idx].mean(0)
        up = (mean[1] - lm[brow_idx, 1].min()) * 1.3
        down = up / 1.9
        half_w = (up + down) / 2
        return np.hstack((mean - [half_w, up] + 1, mean + [half_w, down])).astype(int)

    le = eye(list(range(36, 42)), _BROW_LE)
    re = eye(list(range(42, 48)), _BROW_RE)

    mean_no = lm[29:36].mean(0)
    half_w = max(mean_no[0] - lm[31][0], lm[35][0] - mean_no[0]) * 1.25
    down = (lm[33][1] - mean_no[1]) * 1.1
    no = np.hstack((mean_no - [half_w, half_w * 2 - down] + 1, mean_no + [half_w, down])).astype(int)

    mouth = lm[48:68]
    mean_mo = mouth.mean(0)
    half = max((mouth.max(0) - mouth.min(0)).max() / 2, 16) * 1.1
    mo_end = mean_mo + half
    mo_end[mo_end > 510] = 510
    mo = np.hstack((mean_mo - half + 1, mo_end)).astype(int)
    return np.stack([le, re, no, mo])


def sanitize_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Clamp boxes into the crop and give each at least one pixel at the coarsest scale.

    Boxes from :func:`boxes_from_landmarks` on real faces pass unchanged; degenerate
    ones (which crash the official code) are made usable instead of failing.
    """
    b = boxes.to(torch.long)
    x1 = b[..., 0].clamp(0, CROP_SIZE - 8)
    y1 = b[..., 1].clamp(0, CROP_SIZE - 8)
    x2 = torch.maximum(b[..., 2].clamp(max=CROP_SIZE), x1 + 8)
    y2 = torch.maximum(b[..., 3].clamp(max=CROP_SIZE), y1 + 8)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def _taps(local: torch.Tensor, in_size: torch.Tensor, out_size: torch.Tensor):
    """Bilinear taps of ``F.interpolate(align_corners=False)`` from ``in_size`` to ``out_size``.

    ``local``: output positions (B, N); sizes broadcast against it. Returns the two input
    indices (relative to the region start) and their weights, in float32 like the CPU kernel.
    """
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    src = (scale * (local.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.to(torch.long)
    w1 = src - i0.to(torch.float32)
    i1 = i0 + (i0 < in_size - 1).to(torch.long)
    return i0, i1, 1.0 - w1, w1


def _resize_matrix(length: int, i0, i1, w0, w1) -> torch.Tensor:
    """(B, N, length) matrix whose row n holds the two taps of output position n."""
    mat = torch.zeros(*i0.shape, length, device=i0.device)
    mat.scatter_add_(2, i0.unsqueeze(2), w0.unsqueeze(2))
    return mat.scatter_add_(2, i1.unsqueeze(2), w1.unsqueeze(2))


def _apply_separable(rows: torch.Tensor, cols: torch.Tensor, nhwc: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols^T`` on every channel of an NHWC tensor, as two batched matmuls."""
    b, h, w, c = nhwc.shape
    t = torch.matmul(rows.to(nhwc.dtype), nhwc.reshape(b, h, w * c)).view(b, rows.shape[1], w, c)
    return torch.matmul(cols.to(nhwc.dtype).unsqueeze(1), t)


def crop_resize(feat: torch.Tensor, box: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    """Crop ``box`` (B, 4) crop pixels from ``feat`` at ``stride`` and resize to ``size``.

    The result is channels_last, like the feature maps it is cut from.
    """
    b = torch.div(box, stride, rounding_mode="floor")
    pos = torch.arange(size, device=feat.device).expand(b.shape[0], size)
    out_size = torch.full_like(b[:, :1], size)

    def axis(start, end, length):
        i0, i1, w0, w1 = _taps(pos, (end - start)[:, None], out_size)
        return _resize_matrix(length, i0 + start[:, None], i1 + start[:, None], w0, w1)

    rows = axis(b[:, 1], b[:, 3], feat.shape[2])
    cols = axis(b[:, 0], b[:, 2], feat.shape[3])
    return _apply_separable(rows, cols, feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def paste_resize(feat: torch.Tensor, part: torch.Tensor, box: torch.Tensor, stride: int) -> torch.Tensor:
    """Resize ``part`` to ``box`` at ``stride`` and write it over ``feat`` (a new tensor)."""
    b = torch.div(box, stride, rounding_mode="floor")
    in_size = torch.full_like(b[:, :1], part.shape[-1])

    def axis(start, end, length):
        n = (end - start)[:, None]
        local = torch.arange(length, device=feat.device)[None, :] - start[:, None]
        inside = (local >= 0) & (local < n)
        i0, i1, w0, w1 = _taps(torch.minimum(local.clamp(min=0), n - 1), in_size, n)
        return inside, _resize_matrix(part.shape[-1], i0, i1, w0, w1)

    in_y, rows = axis(b[:, 1], b[:, 3], feat.shape[2])
    in_x, cols = axis(b[:, 0], b[:, 2], feat.shape[3])
    pasted = _apply_separable(rows, cols, part.permute(0, 2, 3, 1))
    inside = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(3)
    return torch.where(inside, pasted, feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
