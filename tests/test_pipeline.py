"""Restorer.run, the one call under every surface: its modes, and that it changes nothing it is given."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA, small_net

from dmdnet_plugin.align import TEMPLATE_BOXES
from dmdnet_plugin.face_helper import FaceHelper
from dmdnet_plugin.faces import DlibBackend
from dmdnet_plugin.io import Picture
from dmdnet_plugin.pipeline import Mode, Restorer
from dmdnet_plugin.weights import BUNDLED, load_model


@pytest.fixture(scope="module")
def setup():
    """A photo of person 00005 (left) beside person 00022 (right), and 00005's identity."""
    left = cv2.imread(str(DATA / "celebref" / "00005" / "3.jpg"))
    right = cv2.imread(str(DATA / "lq" / "00022_14.jpg"))
    picture = Picture(cv2.cvtColor(np.hstack([left, right]), cv2.COLOR_BGR2RGB))
    restorer = Restorer(small_net(), FaceHelper(DlibBackend("hog")))
    identity, rejected = restorer.build_identity(
        [DATA / "celebref" / "00005" / f"{i}.jpg" for i in (0, 1, 2)], name="p5"
    )
    assert not rejected and identity.n_refs == 3
    return restorer, picture, identity


def _left_right(result):
    return sorted(result.faces, key=lambda f: f.face.box[0])


def test_modes_decide_each_face(setup):
    restorer, picture, identity = setup
    before = picture.pixels.copy()
    detections = restorer.helper.find([picture])
    runs = {mode: restorer.run([picture], mode, [identity], detections=detections)[0] for mode in Mode}
    np.testing.assert_array_equal(picture.pixels, before)  # the input is never written to

    left, right = _left_right(runs[Mode.AUTO])
    assert left.identity is identity and left.distance < restorer.threshold < right.distance
    assert right.identity is None and right.restored is not None  # generic for the stranger
    assert all(f.identity is None and f.distance is None for f in runs[Mode.GENERIC].faces)
    assert all(f.identity is identity for f in runs[Mode.IDENTITY].faces)

    left, right = _left_right(runs[Mode.ONLY_MATCHED])
    assert left.restored is not None and right.restored is None
    record = right.record()
    assert (
        record["left_as_is"].startswith("no identity matched: too far: the nearest is at")
        and "left_as_is" not in left.record()
    )
    assert record["match_decision"].startswith("too far") and record["match_distance"] > restorer.threshold
    x1, y1, x2, y2 = right.face.box.astype(int)
    out = runs[Mode.ONLY_MATCHED].pixels
    np.testing.assert_array_equal(out[y1:y2, x1 + 40 : x2], before[y1:y2, x1 + 40 : x2])  # untouched, to the bit
    np.testing.assert_array_equal(out[:, :400], runs[Mode.AUTO].pixels[:, :400])  # the matched face as in auto
    assert np.abs(runs[Mode.AUTO].pixels[y1:y2, x1:x2].astype(int) - before[y1:y2, x1:x2]).mean() > 1


def test_results_are_frozen_and_detections_can_be_reused(setup):
    restorer, picture, identity = setup
    fresh = restorer.run([picture], identities=[identity])[0]
    detections = restorer.helper.find([picture])
    reused = restorer.run([picture], identities=[identity], detections=detections)[0]
    np.testing.assert_array_equal(fresh.pixels, reused.pixels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fresh.faces[0].identity = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        detections[0].faces[0].matrix = None
    assert restorer.identities == ()  # identities given to one run do not stay


def test_bad_requests_are_refused_clearly(setup):
    restorer, picture, identity = setup
    with pytest.raises(ValueError, match="mode 'identity' needs exactly one identity dictionary, got 2"):
        restorer.run([picture], Mode.IDENTITY, [identity, identity])
    with pytest.raises(ValueError, match="'sideways' is not a valid Mode"):
        restorer.run([picture], "sideways")
    with pytest.raises(ValueError, match="1 detections for 2 pictures"):
        restorer.run([picture, picture], detections=restorer.helper.find([picture]))
    foreign = small_net(seed=5).encode_identity(torch.zeros(1, 3, 512, 512), TEMPLATE_BOXES[None])  # another model's
    with pytest.raises(ValueError, match="rebuild it from its references"):
        restorer.run([picture], identities=[foreign])


def test_restored_faces_keep_the_photos_broad_colours_unless_told_not_to(setup):
    helper, picture = setup[0].helper, setup[1]
    restorer = Restorer(load_model(BUNDLED, device="cpu"), helper)  # real weights: a random net's output clips
    detections = helper.find([picture])
    kept, own = (restorer.run([picture], Mode.GENERIC, detections=detections, keep_colours=c)[0] for c in (True, False))

    def low(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (0, 0), 16)

    for k, m in zip(kept.faces, own.faces):
        drift_kept, drift_own = (float(np.abs(low(f.restored) - low(f.crop)).mean()) for f in (k, m))
        assert drift_kept < 0.005 and drift_kept < drift_own / 3, (
            drift_kept,
            drift_own,
        )  # the photo's, not the model's
        detail = np.abs((k.restored - low(k.restored)) - (m.restored - low(m.restored))).mean()
        assert detail < 0.01, detail  # the fine detail is the model's either way
    assert np.abs(kept.pixels.astype(int) - own.pixels.astype(int)).mean() > 1  # and the pasted photo shows it


def test_faces_are_embedded_only_to_match_identities(setup):
    """The 128-d embedding costs about as much as detection: generic runs skip it."""
    restorer, picture, identity = setup
    for mode, identities, embedded in (("auto", [], False), ("generic", [identity], False), ("auto", [identity], True)):
        result = restorer.run([picture], mode, identities)[0]
        assert len(result.faces) == 2
        assert all((f.face.face.embedding is not None) is embedded for f in result.faces), (mode, identities)
    generic, with_identity = restorer.compare(picture, identities=[identity])
    assert all(f.face.face.embedding is not None for f in generic.faces + with_identity.faces)  # one detection


def test_the_fast_low_pass_is_within_one_level_of_the_full_gaussian():
    """colours.low_pass blurs at a quarter of the size; on real face crops (tests/data and the example
    photos) restored by the demo model, the colour-kept output is within one 8-bit level of what the
    full-size Gaussian gives (the two low-passes' errors at the borders cancel)."""
    from dmdnet_plugin.colours import SIGMA, keep_colours
    from dmdnet_plugin.io import read_image

    helper = FaceHelper(DlibBackend("hog"))
    photos = [DATA / "celebref" / p / f"{i}.jpg" for p in ("00005", "00022") for i in (0, 1)]
    photos += [DATA.parents[1] / "examples" / "photos" / n for n in ("family.jpg", "obama_lowres.jpg")]
    crops = [f.crop for p in photos for f in helper.detect(read_image(p).rgb(), embed=False).faces]
    assert len(crops) >= 8
    model = load_model(BUNDLED, device="cpu")  # real restorations: the demo model drifts in colour
    boxes = torch.from_numpy(np.stack([TEMPLATE_BOXES] * len(crops)))
    restored = [
        c.numpy().transpose(1, 2, 0) / 2 + 0.5
        for c in model.restore(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2 - 1, boxes).clamp(-1, 1)
    ]
    for out, crop in zip(restored, crops):
        out = out.astype(np.float32)
        full = np.clip(out - cv2.GaussianBlur(out, (0, 0), SIGMA) + cv2.GaussianBlur(crop, (0, 0), SIGMA), 0, 1)
        assert np.abs(np.round(full * 255) - np.round(keep_colours(out, crop) * 255)).max() <= 1
