"""DMDNet: dual memory dictionaries for blind face restoration (Li et al., TPAMI 2022).

One module serves inference, the benchmarks and BasicSR training. Its state dict has the
names, shapes and dtypes of the authors' release checkpoint. Compared with their code the
forward pass is batched (different boxes per face, no Python loop over the batch), computes
only the requested branch, reads dictionaries without copying them per batch item, and in
eval mode uses spectral norms folded into the conv weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import (
    COMPONENT_INDEX,
    CROP_SIZE,
    DICT_COMPONENTS,
    FEATURE_STRIDES,
    PART_SIZES,
    crop_resize,
    paste_resize,
    sanitize_boxes,
)
from .identity import IdentityDictionary, IdentityError, atoms_on, dictionary_key
from .layers import (
    LRELU_SLOPE,
    DilateResBlock,
    KeyValue,
    MaskAttention,
    MSDilateBlock,
    Query,
    StyledUpBlock,
    UpResBlock,
    attention_block,
    conv_pair,
    sn_conv,
    tensor_key,
)

SCALES = (256, 128, 64)
_WIDTH = {256: 1, 128: 2, 64: 4}  # channel multiplier of ngf at each feature scale
KEY_SCALE = 4  # keys have 1/4 of the value channels


def _prefix(comp: str, scale: int) -> str:
    return f"{comp.upper()}_{scale}"


@dataclass
class Features:
    """Encoder output: full feature maps and per-(component, scale) regions and queries."""

    maps: dict[int, torch.Tensor]
    parts: dict[tuple[str, int], torch.Tensor]
    queries: dict[tuple[str, int], torch.Tensor]


class FeatureExtractor(nn.Module):
    """Encoder shared in shape by the degraded input (E_lq) and the references (E_hq)."""

    def __init__(self, ngf: int = 64) -> None:
        super().__init__()
        self.conv1 = conv_pair(3, ngf, stride=2)
        self.conv2 = conv_pair(ngf, ngf)
        self.res1 = DilateResBlock(ngf, (5, 3))
        self.res2 = DilateResBlock(ngf, (5, 3))
        self.conv3 = conv_pair(ngf, ngf * 2, stride=2)
        self.conv4 = conv_pair(ngf * 2, ngf * 2)
        self.res3 = DilateResBlock(ngf * 2, (3, 1))
        self.res4 = DilateResBlock(ngf * 2, (3, 1))
        self.conv5 = conv_pair(ngf * 2, ngf * 4, stride=2)
        self.conv6 = conv_pair(ngf * 4, ngf * 4)
        self.res5 = DilateResBlock(ngf * 4, (1, 1))
        self.res6 = DilateResBlock(ngf * 4, (1, 1))
        for scale in SCALES:
            for comp in DICT_COMPONENTS:
                dim = ngf * _WIDTH[scale]
                self.add_module(f"{_prefix(comp, scale)}_Q", Query(dim, dim // KEY_SCALE))

    def forward(self, img: torch.Tensor, boxes: torch.Tensor, with_queries: bool = True) -> Features:
        f256 = self.res2(self.conv2(self.res1(self.conv1(img))))
        f128 = self.res4(self.conv4(self.res3(self.conv3(f256))))
        f64 = self.res6(self.conv6(self.res5(self.conv5(f128))))
        maps = {256: f256, 128: f128, 64: f64}
        parts, queries = {}, {}
        for scale in SCALES:
            stride = FEATURE_STRIDES[scale]
            for comp in DICT_COMPONENTS:
                box = boxes[:, COMPONENT_INDEX[comp]]
                part = crop_resize(maps[scale], box, stride, PART_SIZES[comp] // stride)
                parts[comp, scale] = part
                if with_queries:
                    queries[comp, scale] = getattr(self, f"{_prefix(comp, scale)}_Q")(part)
        return Features(maps, parts, queries)


def read_memory(key: torch.Tensor, value: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of dictionary values, in fp32.

    ``key``/``value`` are (N, C, h, w) atoms shared by the batch, or (B, N, C, h, w) per
    sample (training, where each face has its own references). The similarity is the
    official one: a full-size correlation, scaled by 1/sqrt(N). Atoms made under autocast
    (per-sample references in training) arrive in half precision and are promoted here, so
    the softmax over the whole dictionary never runs in bf16/fp16.
    """
    with torch.autocast(query.device.type, enabled=False):
        q = query.float().flatten(1)
        key, value = key.float(), value.float()
        n = key.shape[-4]
        if key.dim() == 4:
            score = F.softmax((q @ key.flatten(1).t()) / math.sqrt(n), dim=1)
            out = score @ value.flatten(1)
        else:
            sim = torch.bmm(key.flatten(2), q.unsqueeze(2)).squeeze(2)
            score = F.softmax(sim / math.sqrt(n), dim=1)
            out = torch.bmm(score.unsqueeze(1), value.flatten(2)).squeeze(1)
        return out.view(q.shape[0], *value.shape[-3:])


class BranchOutputs(NamedTuple):
    """What :meth:`DMDNet.forward` returns: (B, 3, 512, 512) in [-1, 1], or None when not requested."""

    generic: torch.Tensor | None = None  # restored with the generic dictionary (the authors' generic output)
    identity: torch.Tensor | None = None  # restored with a person's identity dictionary (their "specific" output)


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give the dictionary reading the statistics of the degraded feature it replaces."""
    s_mean, s_std = _mean_std(style)
    c_mean, c_std = _mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


class DMDNet(nn.Module):
    """The official DMDNet; ``DMDNet()`` is the released configuration.

    ``ngf`` and ``banks_num`` (generic atoms per component and scale) select smaller
    models; they are recorded in checkpoints saved by :mod:`dmdnet_plugin.weights`.
    ``trainable_dictionary`` makes the generic atoms parameters (as in the authors'
    training) instead of buffers; the state-dict names are the same either way.
    """

    def __init__(self, ngf: int = 64, banks_num: int = 128, trainable_dictionary: bool = False) -> None:
        super().__init__()
        self.config = {"ngf": ngf, "banks_num": banks_num}
        for scale in SCALES:
            stride = FEATURE_STRIDES[scale]
            for kind, div in (("key", KEY_SCALE), ("value", 1)):
                for comp in DICT_COMPONENTS:
                    size = PART_SIZES[comp] // stride
                    atoms = torch.randn(banks_num, ngf * _WIDTH[scale] // div, size, size)
                    name = f"{comp}_{scale}_mem_{kind}"
                    if trainable_dictionary:
                        self.register_parameter(name, nn.Parameter(atoms))
                    else:
                        self.register_buffer(name, atoms)
        self.E_lq = FeatureExtractor(ngf)
        self.E_hq = FeatureExtractor(ngf)
        for scale in SCALES:
            for comp in DICT_COMPONENTS:
                dim = ngf * _WIDTH[scale]
                self.add_module(f"{_prefix(comp, scale)}_KV", KeyValue(dim, dim // KEY_SCALE, dim))
        for suffix, block in (("Attention", attention_block), ("Mask", MaskAttention)):
            for scale in SCALES:
                for comp in DICT_COMPONENTS:
                    self.add_module(f"{_prefix(comp, scale)}_{suffix}", block(ngf * _WIDTH[scale]))
        self.MSDilate = MSDilateBlock(ngf * 4, dilation=(4, 3, 2, 1))
        self.up1 = StyledUpBlock(ngf * 4, ngf * 2)
        self.up2 = StyledUpBlock(ngf * 2, ngf)
        self.up3 = StyledUpBlock(ngf, ngf)
        self.up4 = nn.Sequential(
            sn_conv(ngf, ngf),
            nn.LeakyReLU(LRELU_SLOPE, inplace=True),
            UpResBlock(ngf),
            UpResBlock(ngf),
            sn_conv(ngf, 3),
            nn.Tanh(),
        )
        self._fingerprint: tuple[tuple, str] | None = None

    # ------------------------------------------------------------------ network
    def memorize(self, refs: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Identity-dictionary atoms (one per reference) for every component and scale."""
        feats = self.E_hq(refs, boxes, with_queries=False)
        atoms = {}
        for scale in SCALES:
            for comp in DICT_COMPONENTS:
                kv = getattr(self, f"{_prefix(comp, scale)}_KV")
                key, value = kv(feats.parts[comp, scale])
                atoms[dictionary_key(comp, scale, "key")] = key
                atoms[dictionary_key(comp, scale, "value")] = value
        return atoms

    def _enhanced_parts(
        self, feats: Features, identity_atoms: dict[str, torch.Tensor] | None, generic: bool
    ) -> dict[str, dict[tuple[str, int], torch.Tensor]]:
        """Dictionary-enhanced component features per requested branch: ``generic`` reads the
        generic dictionary alone; ``identity`` blends the person's atoms in with the learned mask."""
        branches = ({"generic": None} if generic else {}) | (
            {"identity": identity_atoms} if identity_atoms is not None else {}
        )
        finals: dict[str, dict] = {name: {} for name in branches}
        for scale in SCALES:
            for comp in DICT_COMPONENTS:
                prefix = _prefix(comp, scale)
                part, query = feats.parts[comp, scale], feats.queries[comp, scale]
                mem_g = read_memory(
                    getattr(self, f"{comp}_{scale}_mem_key"), getattr(self, f"{comp}_{scale}_mem_value"), query
                )
                for name, atoms in branches.items():
                    mem = mem_g
                    if atoms is not None:
                        mem_s = read_memory(
                            atoms[dictionary_key(comp, scale, "key")],
                            atoms[dictionary_key(comp, scale, "value")],
                            query,
                        )
                        mask = getattr(self, f"{prefix}_Mask")(part, mem_s, mem_g)
                        mem = mask * mem_s + (1 - mask) * mem_g
                    norm = adain(mem, part)
                    finals[name][comp, scale] = getattr(self, f"{prefix}_Attention")(norm - part) * norm + part
        return finals

    def _decode(self, feats: Features, boxes: torch.Tensor, finals: dict) -> torch.Tensor:
        up_in = {}
        for scale in SCALES:
            fmap = feats.maps[scale]
            for comp in DICT_COMPONENTS:
                box = boxes[:, COMPONENT_INDEX[comp]]
                fmap = paste_resize(fmap, finals[comp, scale], box, FEATURE_STRIDES[scale])
            up_in[scale] = fmap
        x = self.up1(self.MSDilate(feats.maps[64]), up_in[64])
        x = self.up2(x, up_in[128])
        x = self.up3(x, up_in[256])
        return self.up4(x)

    def forward(
        self,
        lq: torch.Tensor,
        boxes: torch.Tensor,
        identity_atoms: dict[str, torch.Tensor] | None = None,
        generic: bool = True,
        refs: torch.Tensor | None = None,
        ref_boxes: torch.Tensor | None = None,
    ) -> BranchOutputs:
        """The generic and the identity output; each None when not requested.

        ``boxes`` (B, 4, 4) int crop pixels, already sanitised. ``identity_atoms`` maps
        :func:`dictionary_key` names to atoms, shared (N, ...) or per sample (B, N, ...).
        Training passes ``refs`` (B, K, 3, 512, 512) and ``ref_boxes`` (B, K, 4, 4) instead,
        so that each face's own dictionary is built inside the one forward call DDP sees.
        """
        if refs is not None:
            b, k = refs.shape[:2]
            flat = refs.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            atoms = self.memorize(flat, ref_boxes.flatten(0, 1))
            identity_atoms = {name: a.unflatten(0, (b, k)) for name, a in atoms.items()}
        feats = self.E_lq(lq, boxes)
        finals = self._enhanced_parts(feats, identity_atoms, generic)
        return BranchOutputs(**{name: self._decode(feats, boxes, parts) for name, parts in finals.items()})

    # ---------------------------------------------------------------- inference
    @contextlib.contextmanager
    def _inference(self, dtype: torch.dtype | None = None) -> Iterator[torch.device]:
        """Eval mode, no autograd, and autocast to ``dtype`` (None or float32: none)."""
        device = next(self.parameters()).device
        was_training = self.training
        autocast = dtype is not None and dtype != torch.float32
        self.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                yield device
        finally:
            self.train(was_training)

    def restore(
        self,
        lq: torch.Tensor,
        boxes: torch.Tensor | np.ndarray,
        identity: IdentityDictionary | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Restore aligned faces. ``lq`` (B, 3, 512, 512) in [-1, 1]; ``boxes`` (B, 4, 4).

        Without ``identity`` this is the authors' generic output; with one, their
        reference-based ("specific") output. ``dtype``: the compute precision (autocast); the
        weights stay float32. Returns float32 (B, 3, 512, 512) in [-1, 1] on the model's device.
        """
        if lq.dim() != 4 or tuple(lq.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"lq must be (B, 3, {CROP_SIZE}, {CROP_SIZE}), got {tuple(lq.shape)}")
        boxes = torch.as_tensor(boxes)
        if tuple(boxes.shape) != (lq.shape[0], 4, 4):
            raise ValueError(f"boxes must be ({lq.shape[0]}, 4, 4), got {tuple(boxes.shape)}")
        if identity is not None:
            self.check_identity(identity)
        with self._inference(dtype) as device:
            x = lq.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
            atoms = atoms_on(identity, device) if identity is not None else None
            out = self(x, sanitize_boxes(boxes.to(device)), identity_atoms=atoms, generic=identity is None)
        return (out.generic if identity is None else out.identity).float().contiguous()

    def encode_identity(
        self,
        refs: torch.Tensor,
        ref_boxes: torch.Tensor | np.ndarray,
        name: str | None = None,
        embeddings: np.ndarray | None = None,
        batch_size: int = 4,
        damaged_embeddings: np.ndarray | None = None,
        dtype: torch.dtype | None = None,
    ) -> IdentityDictionary:
        """Identity dictionary from K >= 1 aligned high-quality reference crops (K, 3, 512, 512).

        Tensors in, dictionary out; :meth:`Restorer.build_identity` does the same from photos.
        ``embeddings`` and ``damaged_embeddings`` (K, D): the references' face embeddings, clean
        and under :mod:`damage`, kept (as means) for matching faces to this identity.
        """
        ref_boxes = torch.as_tensor(ref_boxes)
        if refs.dim() != 4 or refs.shape[0] < 1 or tuple(refs.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"refs must be (K>=1, 3, {CROP_SIZE}, {CROP_SIZE}), got {tuple(refs.shape)}")
        if tuple(ref_boxes.shape) != (refs.shape[0], 4, 4):
            raise ValueError(f"ref_boxes must be ({refs.shape[0]}, 4, 4), got {tuple(ref_boxes.shape)}")
        chunks: list[dict[str, torch.Tensor]] = []
        with self._inference(dtype) as device:
            for start in range(0, refs.shape[0], batch_size):
                x = refs[start : start + batch_size].to(device, torch.float32)
                b = sanitize_boxes(ref_boxes[start : start + batch_size].to(device))
                atoms = self.memorize(x.contiguous(memory_format=torch.channels_last), b)
                chunks.append({k: v.float().cpu().contiguous() for k, v in atoms.items()})
        tensors = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        return IdentityDictionary.from_references(
            tensors, self.fingerprint(), name=name, embeddings=embeddings, damaged_embeddings=damaged_embeddings
        )

    def check_identity(self, identity: IdentityDictionary) -> None:
        """Refuse a dictionary this model did not build: by fingerprint, then by atom shape, since a
        shared file can carry any fingerprint and wrong shapes would fail deep inside a forward pass."""
        identity.check_fits(self.fingerprint())
        for scale in SCALES:
            for comp in DICT_COMPONENTS:
                for kind in ("key", "value"):
                    want = tuple(getattr(self, f"{comp}_{scale}_mem_{kind}").shape[1:])
                    got = tuple(identity.tensors[dictionary_key(comp, scale, kind)].shape[1:])
                    if got != want:
                        raise IdentityError(
                            f"identity dictionary {identity.name or ''}: atoms "
                            f"{dictionary_key(comp, scale, kind)} are {got}, this model needs {want}"
                        )

    def fingerprint(self) -> str:
        """Hash of the configuration and the reference encoder: what a dictionary depends on."""
        named = [(n, t) for n, t in self.state_dict(keep_vars=True).items() if n.startswith("E_hq.") or "_KV." in n]
        key = tuple(tensor_key(t) for _, t in named)
        if self._fingerprint is None or self._fingerprint[0] != key:
            digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
            for n, t in named:
                digest.update(n.encode())
                digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = (key, digest.hexdigest()[:16])
        return self._fingerprint[1]
