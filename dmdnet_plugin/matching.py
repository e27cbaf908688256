"""Which identity a face is, or that we cannot tell: the rule behind auto and only-matched modes.

A face is given someone's identity dictionary only when its embedding is near enough to that
person's mean (``threshold``) *and* clearly nearer than to anyone else (``margin``). A face that
lies about as near to two people is left unmatched: restoring a grandmother with her sister's
eyes is worse than restoring her generically.

Heavy damage pushes a face's embedding away from its person's clean photos, so a face the clean
means cannot decide is compared again with every person's references under the same kinds of
damage (:mod:`damage`), where the same rule holds with a stricter threshold: damaged faces of
strangers also lie nearer to damaged references. The constants were chosen with
``benchmarks/identity_matching.py`` (docs/identity.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .identity import IdentityDictionary

DEFAULT_THRESHOLD = 0.52  # largest distance to a person's mean embedding that can match
DEFAULT_MARGIN = 0.05  # the nearest must be at least this much nearer than the second-nearest
DAMAGED_SHARE = 0.77  # against damaged references the threshold is this share of ``threshold`` (0.40 at 0.52)


def decide(distances: Sequence[float], threshold: float, margin: float) -> tuple[int | None, str]:
    """Index of the matched identity (or None) and the reason, from the distances to each one."""
    if not len(distances):
        return None, "no identity to compare with"
    order = np.argsort(distances)
    best = float(distances[order[0]])
    if best > threshold:
        return None, f"too far: the nearest is at {best:.3f}, above the threshold {threshold:.3g}"
    if len(order) > 1 and float(distances[order[1]]) - best < margin:
        second = float(distances[order[1]])
        return None, f"unsure: the two nearest are at {best:.3f} and {second:.3f}, closer than the margin {margin:.3g}"
    return int(order[0]), "matched"


def decide_face(
    distances: Sequence[float], damaged: Sequence[float] | None, threshold: float, margin: float
) -> tuple[int | None, str]:
    """:func:`decide` on the distances to each identity's clean mean; undecided, on those to their
    damaged means (``damaged``: one per identity, or None when some identity has none)."""
    chosen, reason = decide(distances, threshold, margin)
    if chosen is not None or damaged is None:
        return chosen, reason
    second, second_reason = decide(damaged, threshold * DAMAGED_SHARE, margin)
    if second is not None:
        return second, "matched with the damaged references"
    return None, f"{reason}; with the damaged references, {second_reason}"


def _two_nearest(distances: Sequence[float] | None) -> tuple[float | None, float | None]:
    ranked = sorted(distances or ())
    return (ranked[0] if ranked else None), (ranked[1] if len(ranked) > 1 else None)


def _margin(nearest: float | None, runner_up: float | None) -> float | None:
    return None if nearest is None or runner_up is None else round(runner_up - nearest, 4)


@dataclass(frozen=True)
class Match:
    """One face's decision: the identity (None: unmatched), the distances it rests on, and why."""

    identity: IdentityDictionary | None
    distance: float | None  # to the nearest identity's mean embedding
    runner_up: float | None  # to the second-nearest (None with fewer than two identities)
    reason: str
    damaged_distance: float | None = None  # the same with the damaged means (None: not every identity has one)
    damaged_runner_up: float | None = None

    def record(self) -> dict:
        entry = {
            "match_distance": None if self.distance is None else round(self.distance, 4),
            "match_margin": _margin(self.distance, self.runner_up),
            "match_decision": self.reason,
        }
        if self.damaged_distance is not None:
            entry["match_damaged_distance"] = round(self.damaged_distance, 4)
            entry["match_damaged_margin"] = _margin(self.damaged_distance, self.damaged_runner_up)
        return entry


def match(
    embedding: np.ndarray | None,
    identities: Sequence[IdentityDictionary],
    threshold: float = DEFAULT_THRESHOLD,
    margin: float = DEFAULT_MARGIN,
) -> Match:
    """The rule applied to one face embedding and the identities that carry a mean embedding."""
    known = [i for i in identities if i.embedding is not None]
    if embedding is None or not known:
        reason = "no identity with an embedding" if embedding is not None else "the face could not be embedded"
        return Match(None, None, None, reason if identities else "no identity was given")
    distances = [float(np.linalg.norm(embedding - i.embedding)) for i in known]
    damaged = None
    if all(i.damaged_embedding is not None for i in known):
        damaged = [float(np.linalg.norm(embedding - i.damaged_embedding)) for i in known]
    chosen, reason = decide_face(distances, damaged, threshold, margin)
    return Match(None if chosen is None else known[chosen], *_two_nearest(distances), reason, *_two_nearest(damaged))
