"""Which identity a face is, or that we cannot tell: the rule behind auto and only-matched modes.

A face is given someone's identity dictionary only when its embedding is near enough to that
person's mean (``threshold``) *and* clearly nearer than to anyone else (``margin``). A face that
lies about as near to two people is left unmatched: restoring a grandmother with her sister's
eyes is worse than restoring her generically. The constants were chosen with
``benchmarks/identity_matching.py`` (README, "Identity dictionaries").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .identity import IdentityDictionary

DEFAULT_THRESHOLD = 0.55  # largest distance to a person's mean embedding that can match
DEFAULT_MARGIN = 0.04  # the nearest must be at least this much nearer than the second-nearest


def decide(distances: Sequence[float], threshold: float, margin: float) -> tuple[int | None, str]:
    """Index of the matched identity (or None) and the reason, from the distances to each one."""
    if not len(distances):
        return None, "no identity to compare with"
    order = np.argsort(distances)
    best = float(distances[order[0]])
    if best > threshold:
        return None, f"too far: the nearest is at {best:.3f}, above the threshold {threshold}"
    if len(order) > 1 and float(distances[order[1]]) - best < margin:
        second = float(distances[order[1]])
        return None, f"unsure: the two nearest are at {best:.3f} and {second:.3f}, closer than the margin {margin}"
    return int(order[0]), "matched"


@dataclass(frozen=True)
class Match:
    """One face's decision: the identity (None: unmatched), the distances it rests on, and why."""

    identity: IdentityDictionary | None
    distance: float | None  # to the nearest identity's mean embedding
    runner_up: float | None  # to the second-nearest (None with fewer than two identities)
    reason: str

    def record(self) -> dict:
        margin = None if self.distance is None or self.runner_up is None else round(self.runner_up - self.distance, 4)
        return {"match_distance": None if self.distance is None else round(self.distance, 4),
                "match_margin": margin, "match_decision": self.reason}


def match(embedding: np.ndarray | None, identities: Sequence[IdentityDictionary], threshold: float = DEFAULT_THRESHOLD,
          margin: float = DEFAULT_MARGIN) -> Match:
    """The rule applied to one face embedding and the identities that carry a mean embedding."""
    known = [i for i in identities if i.embedding is not None]
    if embedding is None or not known:
        reason = "no identity with an embedding" if embedding is not None else "the face could not be embedded"
        return Match(None, None, None, reason if identities else "no identity was given")
    distances = [float(np.linalg.norm(embedding - i.embedding)) for i in known]
    chosen, reason = decide(distances, threshold, margin)
    ranked = sorted(distances)
    return Match(None if chosen is None else known[chosen], ranked[0], ranked[1] if len(ranked) > 1 else None, reason)
