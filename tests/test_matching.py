"""Identity matching: the decision rule, and no wrong match on a fixed subset of real faces."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

pytest.importorskip("basicsr")  # the benchmark degrades faces with the training dataset's code
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from identity_matching import collect, counts, means_for  # noqa: E402

from dmdnet_plugin.identity import IdentityDictionary  # noqa: E402
from dmdnet_plugin.matching import DAMAGED_SHARE, DEFAULT_MARGIN, DEFAULT_THRESHOLD, decide, decide_face, match  # noqa: E402


def test_the_rule_needs_near_enough_and_clearly_nearest():
    assert decide([0.42, 0.60], 0.5, 0.04) == (0, "matched")
    chosen, reason = decide([0.422, 0.428], 0.5, 0.04)  # the wrong match: won by 0.006
    assert chosen is None and reason.startswith("unsure: the two nearest are at 0.422 and 0.428")
    chosen, reason = decide([0.52, 0.9], 0.5, 0.04)
    assert chosen is None and reason.startswith("too far: the nearest is at 0.520")
    assert decide([0.3], 0.5, 0.04) == (0, "matched")  # one identity: no runner-up to be unsure about
    assert decide([0.422, 0.428], 0.5, 0.0)[0] == 0  # margin 0: the nearest wins, as before


def test_an_undecided_face_is_decided_again_with_the_damaged_references():
    # too far from both clean means, near one damaged mean: matched, under the stricter threshold
    assert decide_face([0.62, 0.75], [0.35, 0.52], 0.52, 0.04) == (0, "matched with the damaged references")
    chosen, reason = decide_face([0.62, 0.75], [0.01 + 0.52 * DAMAGED_SHARE, 0.9], 0.52, 0.04)
    assert chosen is None and reason.startswith(
        "too far: the nearest is at 0.620, above the threshold 0.52; with the damaged references, too far"
    )
    chosen, reason = decide_face([0.62, 0.75], [0.30, 0.32], 0.52, 0.04)  # as near to two damaged means
    assert chosen is None and "with the damaged references, unsure" in reason
    assert decide_face([0.40, 0.60], [0.45, 0.20], 0.52, 0.04) == (0, "matched")  # the clean means decide first
    assert decide_face([0.62, 0.75], None, 0.52, 0.04)[0] is None  # an identity without damaged means


def test_match_reports_distance_margin_and_decision():
    tensors = {"x": np.zeros((1, 1, 1, 1))}
    a = IdentityDictionary(
        {k: __import__("torch").zeros(1, 1, 1, 1) for k in tensors}, "f", "a", embedding=np.zeros(2), n_embedded=1
    )
    b = IdentityDictionary(
        {k: __import__("torch").zeros(1, 1, 1, 1) for k in tensors},
        "f",
        "b",
        embedding=np.array([0.3, 0.0]),
        n_embedded=1,
    )
    got = match(np.array([0.1, 0.0]), [a, b], threshold=0.5, margin=0.04)
    assert got.identity is a and got.record() == {
        "match_distance": 0.1,
        "match_margin": 0.1,
        "match_decision": "matched",
    }
    unsure = match(np.array([0.14, 0.0]), [a, b], threshold=0.5, margin=0.04)
    assert unsure.identity is None and unsure.record()["match_margin"] == 0.02
    assert match(None, [a, b]).reason == "the face could not be embedded"
    a, b = replace(a, damaged_embedding=np.array([1.0, 1.0])), replace(b, damaged_embedding=np.array([0.0, 1.0]))
    damaged = match(np.array([0.9, 0.9]), [a, b], threshold=0.5, margin=0.04)
    assert damaged.identity is a and damaged.record() == {
        "match_distance": 1.0817,
        "match_margin": 0.1911,
        "match_decision": "matched with the damaged references",
        "match_damaged_distance": 0.1414,
        "match_damaged_margin": 0.7641,
    }


def test_no_wrong_match_on_a_fixed_subset_of_real_faces():
    """Leave-one-out over 4 people of tests/data (15 photos) at every degradation level, with the
    default rule and the bundled demo model for restore-then-match; computed here, not stored."""
    folks = {
        p.name: sorted(p.glob("*.jpg"))
        for p in (
            DATA / "celebref" / "00005",
            DATA / "celebref" / "00022",
            DATA / "heldout" / "00121",
            DATA / "heldout" / "00146",
        )
    }
    cases, refs = collect(folks, {}, weights=None)
    assert len(cases) == 3 * 15
    for use in ("raw", "restored"):
        got = counts(cases, refs, use, DEFAULT_THRESHOLD, DEFAULT_MARGIN)
        assert all(outcomes.count("wrong") == 0 for outcomes in got.values()), (use, got)
        assert got["none"].count("right") >= 12, (use, got["none"])
    # the damaged references match severely damaged faces that the clean ones leave generic
    severe = [c for c in cases if c.level == "severe"]
    clean_only = sum(
        decide(
            [float(np.linalg.norm(c.raw - m[0])) for m in means_for(c, refs).values()],
            DEFAULT_THRESHOLD,
            DEFAULT_MARGIN,
        )[0]
        is not None
        for c in severe
    )
    with_damaged = counts(cases, refs, "raw", DEFAULT_THRESHOLD, DEFAULT_MARGIN)["severe"].count("right")
    assert with_damaged > clean_only, (with_damaged, clean_only)
