"""Identity dictionaries (the authors' "specific" dictionary): built once from a person's references, reused forever.

A dictionary is a set of key/value atoms per component and scale, one atom per reference,
saved as ``.safetensors`` with metadata. It only makes sense for the reference encoder that
produced it, so it carries that model's fingerprint and is refused by any other model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .components import DICT_COMPONENTS, FEATURE_STRIDES

FORMAT = "dmdnet-identity"
VERSION = 1


class IdentityError(ValueError):
    """A dictionary file that cannot be used; the message names the file and the problem."""


def dictionary_key(comp: str, scale: int, kind: str) -> str:
    """Tensor name of one component/scale/kind, e.g. ``le256_key``."""
    return f"{comp}{scale}_{kind}"


def expected_keys() -> set[str]:
    return {dictionary_key(c, s, k) for c in DICT_COMPONENTS for s in FEATURE_STRIDES for k in ("key", "value")}


class IdentityDictionary:
    """Specific dictionary of one person.

    ``tensors``: ``dictionary_key`` -> (K, C, h, w) float32 on CPU. ``embeddings``: the
    references' face embeddings (K, D) when known; the file stores their mean and count so
    that matching and extending need no recomputation.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        model_fingerprint: str,
        name: str | None = None,
        embeddings: np.ndarray | None = None,
        embedding_mean: np.ndarray | None = None,
        n_embedded: int = 0,
    ) -> None:
        counts = {t.shape[0] for t in tensors.values()}
        if len(counts) != 1:
            raise IdentityError(f"atom counts differ between tensors: {sorted(counts)}")
        self.tensors = tensors
        self.model_fingerprint = model_fingerprint
        self.name = name
        if embeddings is not None and len(embeddings):
            embeddings = np.asarray(embeddings, dtype=np.float64)
            embedding_mean, n_embedded = embeddings.mean(0), len(embeddings)
        self.embedding = None if embedding_mean is None else np.asarray(embedding_mean, dtype=np.float64)
        self.n_embedded = n_embedded if self.embedding is not None else 0
        self._device_copy: tuple[torch.device, dict[str, torch.Tensor]] | None = None

    @property
    def n_refs(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def check_fits(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise IdentityError(
                f"identity dictionary {self.name or ''!s} was built by model {self.model_fingerprint}, "
                f"not by the loaded model {fingerprint}; rebuild it from its references with this model"
            )

    def tensors_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The atoms on ``device``, copied once and kept for later batches."""
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = (device, {k: v.to(device) for k, v in self.tensors.items()})
        return self._device_copy[1]

    def extend(self, other: "IdentityDictionary") -> "IdentityDictionary":
        """A dictionary with the atoms of both; the existing atoms are not recomputed."""
        other.check_fits(self.model_fingerprint)
        if self.tensors.keys() != other.tensors.keys():
            raise IdentityError("dictionaries have different component sets")
        tensors = {k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()}
        parts = [(d.embedding, d.n_embedded) for d in (self, other) if d.embedding is not None]
        total = sum(n for _, n in parts)
        mean = sum(e * n for e, n in parts) / total if parts else None
        return IdentityDictionary(tensors, self.model_fingerprint, self.name or other.name, None, mean, total)

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata (strings only; the embedding as a JSON list)."""
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "n_refs": str(self.n_refs),
            "model_fingerprint": self.model_fingerprint,
            "n_embedded": str(self.n_embedded),
        }
        if self.name:
            meta["name"] = self.name
        if self.embedding is not None:
            meta["embedding"] = json.dumps([round(float(x), 7) for x in self.embedding])
        return meta

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written dictionary."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "IdentityDictionary":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise IdentityError(f"{path}: no such identity dictionary") from None
        except Exception as exc:  # safetensors reports corruption with several exception types
            raise IdentityError(f"{path}: not a readable identity dictionary ({exc})") from None
        meta = dict(raw)
        if meta.get("format") != FORMAT:
            raise IdentityError(f"{path}: not an identity dictionary (format {meta.get('format')!r})")
        if meta.get("version") != str(VERSION):
            raise IdentityError(f"{path}: unsupported identity dictionary version {meta.get('version')!r}")
        if set(tensors) != expected_keys():
            missing = sorted(expected_keys() - set(tensors))
            raise IdentityError(f"{path}: identity dictionary tensors are wrong (missing {missing or 'none'})")
        try:
            embedding = json.loads(meta["embedding"]) if "embedding" in meta else None
            ident = cls(
                {k: v.float() for k, v in tensors.items()},
                meta["model_fingerprint"],
                name=meta.get("name"),
                embedding_mean=None if embedding is None else np.asarray(embedding),
                n_embedded=int(meta.get("n_embedded", 0)),
            )
            n_refs = int(meta["n_refs"])
        except KeyError as exc:
            raise IdentityError(f"{path}: identity dictionary metadata lacks {exc}") from None
        except IdentityError as exc:
            raise IdentityError(f"{path}: {exc}") from None
        except (ValueError, TypeError) as exc:  # json or int parsing
            raise IdentityError(f"{path}: corrupted metadata ({exc})") from None
        if ident.n_refs != n_refs:
            raise IdentityError(f"{path}: holds {ident.n_refs} atoms but its metadata says {n_refs}")
        return ident
