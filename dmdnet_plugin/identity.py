"""Identity dictionaries (the authors' "specific" dictionary): built once from a person's references, reused forever.

A dictionary is a set of key/value atoms per component and scale, one atom per reference,
saved as ``.safetensors`` with metadata. It only makes sense for the reference encoder that
produced it, so it carries that model's fingerprint and is refused by any other model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from .atomic import atomic_path
from .components import DICT_COMPONENTS, FEATURE_STRIDES
from .tensorfile import TensorFileError, check_tensors, json_field, read_safetensors

FORMAT = "dmdnet-identity"
VERSION = 1
MAX_HEADER = 1 << 20  # a real header is a few kB: 36 tensor entries and two 128-d mean embeddings
MAX_EMBEDDING = 4096  # the longest face embedding we accept (dlib's is 128-d)
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")  # the whole name: fullmatch


class IdentityError(ValueError):
    """A dictionary file that cannot be used; the message names the file and the problem."""


def identity_file(folder: str | Path, name: str) -> Path:
    """The file of the dictionary called ``name`` in ``folder``: user-given names (ComfyUI's Save
    node, the MCP tools) can never leave that folder, nor name a link to a file outside it (the
    path is resolved). Names are whole-matched: a trailing newline is refused, not saved."""
    stem = name.removesuffix(".safetensors")
    if not _NAME_OK.fullmatch(stem) or ".." in stem:
        raise IdentityError(f"invalid identity name {name!r}: use letters, digits, space, '_', '-' and '.'")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, stem + ".safetensors"))
    if os.path.dirname(path) != root:
        raise IdentityError(f"identity {stem!r} links to a file outside its folder")
    return Path(path)


def dictionary_key(comp: str, scale: int, kind: str) -> str:
    """Tensor name of one component/scale/kind, e.g. ``le256_key``."""
    return f"{comp}{scale}_{kind}"


def expected_keys() -> set[str]:
    return {dictionary_key(c, s, k) for c in DICT_COMPONENTS for s in FEATURE_STRIDES for k in ("key", "value")}


@dataclass(frozen=True, eq=False)
class IdentityDictionary:
    """Specific dictionary of one person: a value, never changed once made.

    ``tensors``: ``dictionary_key`` -> (K, C, h, w) float32 on CPU (read-only mapping).
    ``embedding``: the mean face embedding of the references (``n_embedded`` of them), and
    ``damaged_embedding`` their mean under fixed damage (:mod:`damage`), kept so that matching
    and extending need no recomputation. Equality and hashing are by identity (``eq=False``), so
    a dictionary can key a cache or a group of faces.
    """

    tensors: Mapping[str, torch.Tensor]
    model_fingerprint: str
    name: str | None = None
    embedding: np.ndarray | None = None
    n_embedded: int = 0
    damaged_embedding: np.ndarray | None = None

    def __post_init__(self) -> None:
        counts = {t.shape[0] for t in self.tensors.values()}
        if len(counts) != 1:
            raise IdentityError(f"atom counts differ between tensors: {sorted(counts)}")
        embedding = _frozen_array(self.embedding)
        # the damaged mean only beside a clean mean of the same references
        damaged = None if embedding is None else _frozen_array(self.damaged_embedding)
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        object.__setattr__(self, "embedding", embedding)
        object.__setattr__(self, "n_embedded", self.n_embedded if embedding is not None else 0)
        object.__setattr__(self, "damaged_embedding", damaged)

    @classmethod
    def from_references(
        cls,
        tensors: Mapping[str, torch.Tensor],
        model_fingerprint: str,
        name: str | None = None,
        embeddings: np.ndarray | None = None,
        damaged_embeddings: np.ndarray | None = None,
    ) -> IdentityDictionary:
        """A dictionary whose means come from the references' own (K, D) embeddings."""
        has = embeddings is not None and len(embeddings)
        has_damaged = damaged_embeddings is not None and len(damaged_embeddings)
        return cls(
            tensors,
            model_fingerprint,
            name,
            np.asarray(embeddings, dtype=np.float64).mean(0) if has else None,
            len(embeddings) if has else 0,
            np.asarray(damaged_embeddings, dtype=np.float64).mean(0) if has_damaged else None,
        )

    @property
    def n_refs(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def check_fits(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise IdentityError(
                f"identity dictionary {self.name or ''!s} was built by model {self.model_fingerprint}, "
                f"not by the loaded model {fingerprint}; rebuild it from its references with this model"
            )

    def extend(self, other: IdentityDictionary) -> IdentityDictionary:
        """A dictionary with the atoms of both; the existing atoms are not recomputed."""
        other.check_fits(self.model_fingerprint)
        if self.tensors.keys() != other.tensors.keys():
            raise IdentityError("dictionaries have different component sets")
        tensors = {k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()}
        embedded = [d for d in (self, other) if d.embedding is not None]
        total = sum(d.n_embedded for d in embedded)
        mean = sum(d.embedding * d.n_embedded for d in embedded) / total if embedded else None
        damaged = None  # kept only when it covers the same references as the clean mean
        if embedded and all(d.damaged_embedding is not None for d in embedded):
            damaged = sum(d.damaged_embedding * d.n_embedded for d in embedded) / total
        return IdentityDictionary(tensors, self.model_fingerprint, self.name or other.name, mean, total, damaged)

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata (strings only; the embeddings as JSON lists)."""
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "n_refs": str(self.n_refs),
            "model_fingerprint": self.model_fingerprint,
            "n_embedded": str(self.n_embedded),
        }
        if self.name:
            meta["name"] = self.name
        for key, value in (("embedding", self.embedding), ("embedding_damaged", self.damaged_embedding)):
            if value is not None:
                meta[key] = json.dumps([round(float(x), 7) for x in value])
        return meta

    def digest(self) -> str:
        """sha256 of the atoms and metadata: what a run's settings hold of it, since a file's name and
        time may change while its content does not, and the other way round."""
        sha = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for key in sorted(self.tensors):
            sha.update(key.encode())
            sha.update(self.tensors[key].contiguous().numpy().tobytes())
        return sha.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written dictionary."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> IdentityDictionary:
        """Read a dictionary someone may have shared: every field is checked before it is used."""
        path = Path(path)
        try:
            return cls._from_file(path)
        except FileNotFoundError:
            raise IdentityError(f"{path}: no such identity dictionary") from None
        except IsADirectoryError:
            raise IdentityError(f"{path}: is a folder, not an identity dictionary") from None
        except (TensorFileError, IdentityError) as exc:
            raise IdentityError(f"{path}: {exc}") from None

    @classmethod
    def _from_file(cls, path: Path) -> IdentityDictionary:
        try:
            tensors, meta = read_safetensors(path, MAX_HEADER)
        except TensorFileError as exc:
            raise IdentityError(f"not a readable identity dictionary ({exc})") from None
        if meta.get("format") != FORMAT:
            raise IdentityError(f"not an identity dictionary (format {meta.get('format')!r})")
        if meta.get("version") != str(VERSION):
            raise IdentityError(f"unsupported identity dictionary version {meta.get('version')!r}")
        if set(tensors) != expected_keys():
            missing, extra = sorted(expected_keys() - set(tensors)), sorted(set(tensors) - expected_keys())
            raise IdentityError(
                f"identity dictionary tensors are wrong (missing {missing or 'none'}, unexpected {extra[:3] or 'none'})"
            )
        check_tensors(tensors)
        for name, t in tensors.items():
            if t.dim() != 4 or 0 in t.shape:
                raise IdentityError(f"tensor {name} has shape {tuple(t.shape)}, expected (atoms, channels, h, w)")
        missing_meta = [k for k in ("n_refs", "model_fingerprint") if k not in meta]
        if missing_meta:
            raise IdentityError(f"identity dictionary metadata lacks {missing_meta}")
        embedding, damaged = _embedding_field(meta, "embedding"), _embedding_field(meta, "embedding_damaged")
        if damaged is not None and (embedding is None or damaged.shape != embedding.shape):
            raise IdentityError("metadata 'embedding_damaged' needs an 'embedding' of the same length")
        try:
            n_refs, n_embedded = int(meta["n_refs"]), int(meta.get("n_embedded", 0))
        except ValueError as exc:
            raise IdentityError(f"corrupted metadata ({exc})") from None
        ident = cls(
            {k: v.float() for k, v in tensors.items()},
            meta["model_fingerprint"],
            meta.get("name"),
            embedding,
            max(n_embedded, 0),
            damaged,
        )
        if ident.n_refs != n_refs:
            raise IdentityError(f"holds {ident.n_refs} atoms but its metadata says {n_refs}")
        return ident


def _frozen_array(values: np.ndarray | None) -> np.ndarray | None:
    """A read-only float64 copy, so a dictionary's means cannot change under it."""
    if values is None:
        return None
    out = np.array(values, dtype=np.float64)
    out.flags.writeable = False
    return out


# Atoms copied to a device, per dictionary, kept outside the (frozen) value; an entry goes with its dictionary.
_ON_DEVICE: weakref.WeakKeyDictionary[IdentityDictionary, tuple[torch.device, dict[str, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def atoms_on(identity: IdentityDictionary, device: torch.device) -> dict[str, torch.Tensor]:
    """The dictionary's atoms on ``device``, copied once and kept for later batches."""
    cached = _ON_DEVICE.get(identity)
    if cached is None or cached[0] != device:
        cached = (device, {k: v.to(device) for k, v in identity.tensors.items()})
        _ON_DEVICE[identity] = cached
    return cached[1]


def _embedding_field(meta: dict[str, str], key: str) -> np.ndarray | None:
    """A mean embedding from the metadata, checked: a list of finite numbers of a sane length."""
    if key not in meta:
        return None
    embedding = np.asarray(json_field(meta, key), dtype=object)
    if (
        embedding.ndim != 1
        or not 0 < len(embedding) <= MAX_EMBEDDING
        or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in embedding)
    ):
        raise IdentityError(f"metadata {key!r} must be a list of 1 to {MAX_EMBEDDING} finite numbers")
    return embedding.astype(np.float64)
