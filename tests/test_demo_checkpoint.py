"""The bundled demo checkpoint: it restores held-out people better than their degraded input,
and `make demo` runs offline with it.

The held-out faces (tests/data/heldout, CelebRef identities 00121 and 00146) were never
trained on. Their degradation is the fixed moderate one of benchmarks/evaluate_heldout.py.
"""

from __future__ import annotations

import sys

import cv2
import pytest
import yaml
from conftest import DATA

pytest.importorskip("basicsr")
sys.path.insert(0, str(DATA.parents[1] / "benchmarks"))
from evaluate_heldout import evaluate  # noqa: E402

from dmdnet_plugin import demo  # noqa: E402
from dmdnet_plugin.weights import BUNDLED  # noqa: E402

OPTIONS = DATA.parents[1] / "options" / "dmdnet_demo.yml"


@pytest.fixture(scope="module")
def heldout_results(tmp_path_factory):
    val_opt = yaml.safe_load(OPTIONS.read_text())["datasets"]["val"]
    val_opt.update(dataroot_gt=str(DATA / "heldout"), landmarks_root=None)
    grid = tmp_path_factory.mktemp("grid") / "heldout.png"
    return evaluate(str(BUNDLED), val_opt, grid=grid), grid


def test_bundled_checkpoint_beats_the_degraded_input_on_heldout_people(heldout_results):
    results, grid = heldout_results
    assert results["input"]["n"] == 8 and results["identity"]["n"] == 8
    for output in ("generic", "identity", "generic, input's colours", "identity, input's colours"):
        assert results[output]["psnr"] > results["input"]["psnr"], results
        assert results[output]["ssim"] > results["input"]["ssim"], results
    # the pipeline keeps the input's colours by default: nearer the truth than this model's own, which drift
    for output in ("generic", "identity"):
        assert results[f"{output}, input's colours"]["psnr"] > results[output]["psnr"], results
    assert cv2.imread(str(grid)).shape == (8 * 256, 4 * 256, 3)


def test_make_demo_restores_the_examples_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMDNET_WEIGHTS", raising=False)
    assert demo.main(str(tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "(bundled demo)" in err
    pictures = sorted((tmp_path / "out").glob("*_before_after.png"))
    assert [p.name for p in pictures] == ["family_before_after.png", "obama_lowres_before_after.png"]
    for stem, faces in (("family", 3), ("obama_lowres", 1)):
        full = cv2.imread(str(tmp_path / "out" / f"{stem}_before_after.png"))[32:]  # labels in the top 32 rows
        close = cv2.imread(str(tmp_path / "out" / f"{stem}_faces.png"))  # a 256 px row per face
        assert close.shape == (faces * 256, 3 * 256, 3), stem
        # share of pixels the generic restoration moved by > 2 levels: the faces are 2.6% of the family photo
        for panels, share in ((full, 0.01), (close, 0.2)):  # input | generic | identity
            third = panels.shape[1] // 3
            inp, generic, with_identity = (panels[:, i * third : (i + 1) * third] for i in range(3))
            assert (cv2.absdiff(inp, generic).max(axis=2) > 2).mean() > share, stem
            if stem == "obama_lowres":  # the one person with references: the identity changes the face
                assert (cv2.absdiff(generic, with_identity).max(axis=2) > 4).mean() > 0.001
            else:  # nobody in the family photo is obama: the identity run leaves every face generic
                assert (generic == with_identity).all()
    assert (tmp_path / "out" / "obama.safetensors").is_file()
    assert "obama_jitter.mp4: 24 frames (track 0: frames 0-23, obama)" in err  # the clip: one person, one identity
    assert (tmp_path / "out" / "obama_jitter.mp4").stat().st_size > 10000
