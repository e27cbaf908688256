"""Building blocks of DMDNet, named so that the authors' checkpoint loads strictly.

Every convolution of the official network is spectrally normalised with
``torch.nn.utils.spectral_norm``; its state dict therefore stores ``weight_orig``,
``weight_u`` and ``weight_v``. :class:`SNConv2d` keeps that layout but, in eval mode,
divides the weight by ``sigma = u . (W v)`` once and caches the result, instead of
recomputing it on every call as the hook does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LRELU_SLOPE = 0.2
_SN_EPS = 1e-12


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current values, for caches: storage plus in-place version.

    Tensors made under ``torch.inference_mode()`` (ComfyUI runs every node in it) keep no
    version counter; they cannot be changed in place outside that mode, so storage suffices.
    """
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)


class SNConv2d(nn.Conv2d):
    """Conv2d with spectral norm stored as ``torch.nn.utils.spectral_norm`` stores it.

    Training does one power iteration per call, exactly like torch's hook, so the
    optimiser sees the same function. Eval mode uses the stored ``u`` and ``v`` (the
    eval-mode meaning of a loaded checkpoint) and reuses a folded weight until a tensor
    it depends on changes, or ``fold`` is switched off (the benchmark's reference path).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight = self.weight
        del self.weight
        self.weight_orig = nn.Parameter(weight.detach())
        rows = weight.shape[0]
        cols = weight[0].numel()
        u, v = torch.randn(rows), torch.randn(cols)
        on_meta = weight.device.type == "meta"  # a checkpoint's shape check: no values to normalise
        self.register_buffer("weight_u", u if on_meta else F.normalize(u, dim=0, eps=_SN_EPS))
        self.register_buffer("weight_v", v if on_meta else F.normalize(v, dim=0, eps=_SN_EPS))
        self.fold = True
        self._folded: tuple[tuple, torch.Tensor] | None = None
        if not on_meta:
            with torch.no_grad():
                for _ in range(20):  # start near the true sigma so a fresh net is well scaled
                    self._power_iteration()

    def _power_iteration(self) -> None:
        mat = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        F.normalize(torch.mv(mat.t(), self.weight_u), dim=0, eps=_SN_EPS, out=self.weight_v)
        F.normalize(torch.mv(mat, self.weight_v), dim=0, eps=_SN_EPS, out=self.weight_u)

    def _normalised(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mat = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        return self.weight_orig / torch.dot(u, torch.mv(mat, v))

    def normalised_weight(self) -> torch.Tensor:
        """The weight this layer convolves with in its current mode."""
        if self.training:
            with torch.no_grad():
                self._power_iteration()
            return self._normalised(self.weight_u.clone(), self.weight_v.clone())
        if not self.fold or (torch.is_grad_enabled() and self.weight_orig.requires_grad):
            return self._normalised(self.weight_u, self.weight_v)
        tensors = (self.weight_orig, self.weight_u, self.weight_v)
        key = tuple(tensor_key(t) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                folded = self._normalised(self.weight_u, self.weight_v)
            self._folded = (key, folded.contiguous(memory_format=torch.channels_last))
        return self._folded[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalised_weight(), self.bias)


def sn_conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> SNConv2d:
    """3x3 spectrally normalised conv with 'same' padding for its dilation.

    Args: ``cin``/``cout`` channels; ``stride`` (1; 2 halves the map); ``dilation`` (1).
    """
    return SNConv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


def conv_pair(cin: int, cout: int, stride: int = 1, dilation: tuple[int, int] = (1, 1)) -> nn.Sequential:
    """conv -> LeakyReLU -> conv, the unit the official net repeats (indices 0 and 2).

    Args: ``cin``/``cout`` channels; ``stride`` of the first conv (1); ``dilation`` of each conv ((1, 1)).
    """
    return nn.Sequential(
        sn_conv(cin, cout, stride, dilation[0]),
        nn.LeakyReLU(LRELU_SLOPE, inplace=True),
        sn_conv(cout, cout, dilation=dilation[1]),
    )


class DilateResBlock(nn.Module):
    """Encoder residual block: ``x + conv_pair(x)``, dilated to widen the receptive field cheaply.

    Args: ``dim`` channels (in = out); ``dilation`` of its two convs, e.g. (5, 3) at 256 px.
    """

    def __init__(self, dim: int, dilation: tuple[int, int]) -> None:
        super().__init__()
        self.Res = conv_pair(dim, dim, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.Res(x)


class UpResBlock(nn.Module):
    """Decoder residual block at full resolution: ``x + conv_pair(x)``.

    Args: ``dim`` channels (in = out).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.Model = conv_pair(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.Model(x)


class Query(nn.Module):
    """Query of a degraded component region, compared with the dictionary keys.

    Args: ``indim`` feature channels; ``quedim`` query channels (``indim // 4`` in DMDNet).
    """

    def __init__(self, indim: int, quedim: int) -> None:
        super().__init__()
        self.Query = conv_pair(indim, quedim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Query(x)


class KeyValue(nn.Module):
    """Key and value atoms of a high-quality reference region (an identity dictionary entry).

    Args: ``indim`` feature channels; ``keydim`` key channels (``indim // 4``); ``valdim``
    value channels (``indim``).
    """

    def __init__(self, indim: int, keydim: int, valdim: int) -> None:
        super().__init__()
        self.Key = conv_pair(indim, keydim)
        self.Value = conv_pair(indim, valdim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Key(x), self.Value(x)


class MaskAttention(nn.Module):
    """Per-pixel weight between the identity and the generic dictionary reading.

    Args: ``indim`` channels (divisible by 3). ``forward(x, y, z)`` takes the degraded part,
    the identity reading and the generic reading; it returns the blend weight of the first.
    """

    def __init__(self, indim: int) -> None:
        super().__init__()
        third = indim // 3
        self.conv1 = conv_pair(indim, third)
        self.conv2 = conv_pair(indim, third)
        self.conv3 = conv_pair(indim, third)
        self.convCat = conv_pair(third * 3, indim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.convCat(torch.cat([self.conv1(x), self.conv2(y), self.conv3(z)], dim=1))


class MSDilateBlock(nn.Module):
    """Multi-scale context at the bottleneck: four dilated conv pairs, fused, plus the input.

    Args: ``dim`` channels (in = out); ``dilation``, one per branch ((4, 3, 2, 1) in DMDNet).
    """

    def __init__(self, dim: int, dilation: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = conv_pair(dim, dim, dilation=(dilation[0],) * 2)
        self.conv2 = conv_pair(dim, dim, dilation=(dilation[1],) * 2)
        self.conv3 = conv_pair(dim, dim, dilation=(dilation[2],) * 2)
        self.conv4 = conv_pair(dim, dim, dilation=(dilation[3],) * 2)
        self.convi = sn_conv(dim * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.conv1(x), self.conv2(x), self.conv3(x), self.conv4(x)]
        return self.convi(torch.cat(branches, 1)) + x


class StyledUpBlock(nn.Module):
    """Decoder stage: features modulated by the dictionary-enhanced map, then upsampled x2.

    Args: ``cin`` channels of the input and of the style map; ``cout`` output channels.
    ``forward(x, style)`` scales and shifts ``x`` by convs of ``style`` (SFT), then upsamples.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_pair(cin, cout)
        self.convup = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            sn_conv(cout, cout),
            nn.LeakyReLU(LRELU_SLOPE, inplace=True),
            sn_conv(cout, cout),
        )
        self.lrelu1 = nn.LeakyReLU(LRELU_SLOPE, inplace=True)
        self.ScaleModel1 = conv_pair(cin, cout)
        self.ShiftModel1 = conv_pair(cin, cout)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        out = self.lrelu1(self.conv1(x))
        out = torch.addcmul(self.ShiftModel1(style), out, self.ScaleModel1(style))
        return self.convup(out)


def attention_block(dim: int) -> nn.Sequential:
    """How much of the dictionary correction enters each pixel (a conv pair on ``dim`` channels)."""
    return conv_pair(dim, dim)


def set_sn_folding(module: nn.Module, enabled: bool) -> None:
    """Switch eval-mode weight folding on or off for every SNConv2d under ``module``."""
    for m in module.modules():
        if isinstance(m, SNConv2d):
            m.fold = enabled
