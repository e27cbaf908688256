"""BasicSR integration: real training runs of `basicsr_arch/train.py` on CPU, resume, DDP, data."""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import DATA
from parity_inputs import read_face

pytest.importorskip("basicsr")

from basicsr_arch.dmdnet_dataset import WARP_LIMITS, DMDNetFaceDataset, flip, warp  # noqa: E402
from dmdnet_plugin import load_model  # noqa: E402
from dmdnet_plugin.align import FFHQ_5, TEMPLATE_BOXES, five_points  # noqa: E402
from dmdnet_plugin.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "options" / "test_dmdnet_tiny.yml"
BIN = Path(sys.executable).parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_name():
    name = f"pytest_{uuid.uuid4().hex[:8]}"
    yield name
    for folder in (ROOT / "experiments" / name, ROOT / "tb_logger" / name):
        shutil.rmtree(folder, ignore_errors=True)


def train(name: str, *extra: str, launcher: list[str] | None = None, opt: Path = TINY) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [
        "basicsr_arch/train.py",
        "-opt",
        str(opt),
        "--force_yml",
        f"name={name}",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1" if launcher else os.environ.get("OMP_NUM_THREADS", "2")},
    )


def log_text(name: str) -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "experiments" / name).glob("train_*.log")))


def test_train_validate_load_and_resume_on_cpu(run_name):
    proc = train(run_name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = ROOT / "experiments" / run_name
    log = log_text(run_name)
    assert "l_pix_generic" in log and "l_pix_identity" in log and "l_g_gan_d_eye_generic" in log
    assert "l_component_generic" in log and "l_component_identity" in log
    assert "Validation celebref_tiny_val @ 2: psnr_generic" in log and "psnr_input" in log
    grids = sorted((exp / "visualization" / "celebref_tiny_val").glob("*_2.png"))
    assert len(grids) == 3
    import cv2

    assert cv2.imread(str(grids[0])).shape == (512, 2048, 3)  # input | generic | identity | ground truth
    assert list((ROOT / "tb_logger" / run_name).glob("events.out.tfevents.*"))

    model = load_model(exp / "models" / "net_g_2.pth", device="cpu").net
    assert model.config == {"ngf": 8, "banks_num": 4}
    out = model.restore(read_face(DATA / "lq" / "00005_17.jpg")[None], torch.from_numpy(TEMPLATE_BOXES)[None])
    assert out.shape == (1, 3, 512, 512) and torch.isfinite(out).all()

    proc = train(run_name, "train:total_iter=3", "--auto_resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = log_text(run_name)
    assert "Resuming training from epoch: 0, iter: 2." in log and "iter:       3," in log
    assert (exp / "models" / "net_g_latest.pth").exists()


def test_a_run_starts_from_a_safetensors_checkpoint(run_name, tmp_path):
    """As docs/training_demo.md says: a run can continue from the bundled .safetensors file."""
    from dmdnet_plugin import DMDNet
    from dmdnet_plugin.weights import save_checkpoint

    start = DMDNet(ngf=8, banks_num=4, trainable_dictionary=True)
    save_checkpoint(start, tmp_path / "start.safetensors", half=True)
    proc = train(run_name, f"path:pretrain_network_g={tmp_path / 'start.safetensors'}", "train:total_iter=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Loading DMDNet weights from {tmp_path / 'start.safetensors'}" in log_text(run_name)
    trained = load_model(ROOT / "experiments" / run_name / "models" / "net_g_latest.pth", device="cpu").net
    key = "E_lq.conv1.0.weight_orig"
    first = start.state_dict()[key].half().float()
    assert (trained.state_dict()[key] - first).abs().max() < 0.01  # one small step from the file's weights


def test_bf16_autocast_training_on_cpu(run_name):
    proc = train(run_name, "train:autocast=bf16", "train:total_iter=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = re.findall(r"(l_pix_\w+): (\S+)", log_text(run_name))
    assert {name for name, _ in losses} == {"l_pix_generic", "l_pix_identity"}
    assert all(math.isfinite(float(value)) for _, value in losses)
    proc = train(run_name + "_fp8", "train:autocast=fp8", "train:total_iter=1")
    for folder in ("experiments", "tb_logger"):  # BasicSR makes both before the option check stops the run
        shutil.rmtree(ROOT / folder / (run_name + "_fp8"), ignore_errors=True)
    assert (
        proc.returncode != 0
        and "error: train.autocast: got 'fp8' (str), expected bf16, or nothing for fp32" in proc.stderr
    )


def test_two_process_ddp_on_gloo(run_name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "--master_addr=127.0.0.1"]
    proc = train(run_name, "train:total_iter=1", "val:val_freq=100", "--launcher", "pytorch", launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = log_text(run_name)
    assert "World size (gpu number): 2" in log and "iter:       1," in log
    assert (ROOT / "experiments" / run_name / "models" / "net_g_latest.pth").exists()


def test_missing_vgg_weights_stop_with_a_clear_message(run_name, tmp_path):
    opt = yaml.safe_load(TINY.read_text())
    opt["train"]["perceptual_opt"] = {
        "type": "PerceptualLoss",
        "layer_weights": {"conv5_4": 1.0},
        "vgg_type": "vgg19",
        "perceptual_weight": 1.0,
        "style_weight": 50,
    }
    path = tmp_path / "percep.yml"
    path.write_text(yaml.safe_dump(opt))
    assert not (ROOT / "experiments" / "pretrained_models" / "vgg19-dcbb9e9d.pth").exists()
    proc = train(run_name, opt=path)
    assert proc.returncode != 0
    assert "perceptual loss needs the VGG19 weights at" in proc.stderr and "remove train.perceptual_opt" in proc.stderr


def test_dataset_references_flips_and_layouts(tmp_path):
    base = {
        "name": "t",
        "num_refs": 2,
        "use_hflip": False,
        "downsample_range": [2, 3],
        "noise_range": [0, 5],
        "jpeg_range": [80, 90],
        "phase": "train",
    }
    ds = DMDNetFaceDataset({**base, "dataroot_gt": str(DATA / "celebref")})
    assert len(ds) == 7 and ds.num_refs == 2
    for i in range(len(ds)):
        item = ds[i]
        assert item["has_refs"] and item["refs"].shape == (2, 3, 512, 512)
        target = item["gt_path"]
        ident = Path(target).parent
        # references come from the same person and never include the target itself
        same = [read_face(p) for p in sorted(ident.glob("*.jpg")) if str(p) != target]
        for ref in item["refs"]:
            assert min(float((ref - s).abs().max()) for s in same) < 1e-6
        assert item["lq"].shape == item["gt"].shape == (3, 512, 512)
        assert -1 <= item["lq"].min() and item["lq"].max() <= 1
    # authors' landmark files give the authors' boxes
    assert (
        ds[0]["boxes"].tolist()
        == __import__("json").loads((DATA / "boxes_expected.json").read_text())["celebref_00005/0.png.txt"]
    )

    plain = tmp_path / "ffhq"
    plain.mkdir()
    shutil.copy(DATA / "lq" / "00005_17.jpg", plain / "a.jpg")
    flat = DMDNetFaceDataset({**base, "dataroot_gt": str(plain)})
    assert flat.num_refs == 0 and "refs" not in flat[0]
    assert flat[0]["boxes"].tolist() == TEMPLATE_BOXES.tolist()  # no landmarks: template boxes

    held_out = DMDNetFaceDataset({**base, "dataroot_gt": str(DATA / "celebref"), "exclude_identities": ["00022"]})
    assert len(held_out) == 4


def test_flip_mirrors_boxes_and_keeps_the_left_eye_first():
    img = np.zeros((512, 512, 3), np.float32)
    img[100:120, 50:70] = 1  # a mark inside the left-eye box
    boxes = np.array([[40, 90, 80, 130], [300, 90, 360, 130], [200, 200, 260, 260], [180, 300, 330, 400]])
    flipped_img, flipped = flip(img, boxes)
    assert flipped[1].tolist() == [432, 90, 472, 130]  # the old left eye is now on the right
    assert flipped[0].tolist() == [152, 90, 212, 130]
    x1, y1, x2, y2 = flipped[1]
    assert flipped_img[y1:y2, x1:x2].sum() == img[90:130, 40:80].sum() > 0


def test_warp_moves_the_boxes_with_the_face():
    """Marks at each box's centre stay at the centre of the warped boxes, which scale with the face."""
    boxes = np.array([[140, 200, 220, 260], [300, 200, 380, 260], [220, 260, 290, 330], [180, 340, 330, 420]])
    img = np.zeros((512, 512, 3), np.float32)
    for x1, y1, x2, y2 in boxes:
        img[(y1 + y2) // 2 - 3 : (y1 + y2) // 2 + 3, (x1 + x2) // 2 - 3 : (x1 + x2) // 2 + 3] = 1
    moved_any = False
    for seed in range(5):
        random.seed(seed)
        out, moved = warp(img, boxes)
        assert out.shape == img.shape and img.max() == 1 and img.sum() == 4 * 36 * 3  # input untouched
        for (x1, y1, x2, y2), old in zip(moved, boxes):
            ys, xs = np.nonzero(out[y1:y2, x1:x2, 0] > 0.5)
            assert abs(xs.mean() - (x2 - x1) / 2) < 2 and abs(ys.mean() - (y2 - y1) / 2) < 2
            ratio = (x2 - x1) / (old[2] - old[0])
            assert 1 - WARP_LIMITS[1] - 0.05 < ratio < 1 + WARP_LIMITS[1] + 0.05
        moved_any |= bool(np.abs(moved - boxes).max() >= 2)
    assert moved_any


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean difference of two faces at 8 px: small for a warped copy (at most 0.09 in 56 draws on
    these faces), large for another photo of the person (at least 0.16: light, background, pose)."""
    small = [torch.nn.functional.interpolate(x[None], size=8, mode="area") for x in (a, b)]
    return float((small[0] - small[1]).abs().mean())


def test_self_references_are_the_target_moved_a_little(tmp_path):
    base = {
        "name": "t",
        "num_refs": 2,
        "use_hflip": False,
        "downsample_range": [2, 3],
        "noise_range": [0, 5],
        "jpeg_range": [80, 90],
        "phase": "train",
    }
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(DATA / "celebref" / "00022" / "10.jpg", plain / "a.jpg")
    roots = [str(DATA / "celebref"), {"path": str(plain), "layout": "plain"}]
    ds = DMDNetFaceDataset({**base, "dataroots": roots, "self_ref_prob": 1.0})
    for i in range(len(ds)):
        item = ds[i]
        target = read_face(Path(item["gt_path"]))
        diff = [_difference(ref, target) for ref in item["refs"]]
        if Path(item["gt_path"]).parent == plain:  # no other photo of this person: every reference is it
            assert item["has_refs"] and max(diff) < 0.13
            assert float((item["refs"][0] - item["refs"][1]).abs().mean()) > 0.01  # each warped its own way
        else:  # one is the target, the other another photo of the person
            assert diff[0] < 0.13 < diff[1] and float((item["refs"][0] - target).abs().mean()) > 0.01
    without = DMDNetFaceDataset({**base, "dataroots": roots})
    assert not without[len(without) - 1]["has_refs"]  # the plain face has no references by default


def test_landmarks_command_caches_files_the_dataset_reads(tmp_path):
    folder = tmp_path / "person"
    shutil.copytree(DATA / "celebref" / "00022", folder, ignore=shutil.ignore_patterns("*.txt"))
    assert cli(["landmarks", str(folder)]) == 0
    for img in sorted(folder.glob("*.jpg")):
        ours = np.loadtxt(img.with_name(img.name + ".txt"))
        authors = np.loadtxt(DATA / "celebref" / "00022" / (img.name + ".txt"))
        assert ours.shape == (68, 2) and np.linalg.norm(ours - authors, axis=1).mean() < 12
    ds = DMDNetFaceDataset({"name": "t", "dataroot_gt": str(tmp_path), "num_refs": 1, "phase": "train"})
    assert ds[0]["boxes"].tolist() != TEMPLATE_BOXES.tolist()


def test_crops_align_photos_into_training_folders_and_leave_out_small_faces(tmp_path, capsys):
    face = cv2.imread(str(DATA / "celebref" / "00005" / "0.jpg"))
    turn = cv2.getRotationMatrix2D((256, 256), 12, 0.9)
    turn[:, 2] += (150, 60)
    person = tmp_path / "raw" / "person"
    person.mkdir(parents=True)
    cv2.imwrite(str(person / "face.jpg"), face)
    cv2.imwrite(str(person / "turned.png"), cv2.warpAffine(face, turn, (760, 640), borderMode=cv2.BORDER_REFLECT))
    (person / "family.jpg").write_bytes((DATA / "photos" / "family.jpg").read_bytes())
    (tmp_path / "raw" / "broken.jpg").write_bytes(b"not an image")
    before = {p: sha256(p) for p in (tmp_path / "raw").rglob("*.*")}

    assert cli(["crops", str(tmp_path / "raw"), "-o", str(tmp_path / "crops")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'raw' / 'broken.jpg'}: " in err
    assert re.search(rf"{re.escape(str(person / 'family.jpg'))}: face left out, it would be enlarged \d", err)
    assert "2 crops written, 1 faces too small, 1 images failed" in err
    crops = {p.name: cv2.imread(str(p)).astype(float) for p in (tmp_path / "crops" / "person").glob("*.png")}
    assert sorted(crops) == ["face.png", "turned.png"]
    assert 10 * np.log10(255**2 / ((crops["face.png"] - crops["turned.png"]) ** 2).mean()) > 24  # turn undone
    landmarks = np.loadtxt(tmp_path / "crops" / "person" / "turned.png.txt")
    assert np.linalg.norm(five_points(landmarks) - FFHQ_5, axis=1).mean() < 6
    assert {p: sha256(p) for p in before} == before
    ds = DMDNetFaceDataset(
        {
            "name": "t",
            "dataroots": [{"path": str(tmp_path / "crops"), "layout": "identities"}],
            "num_refs": 1,
            "phase": "train",
        }
    )
    assert len(ds) == 2 and len(ds.by_identity) == 1
    assert ds[0]["boxes"].tolist() != TEMPLATE_BOXES.tolist()

    assert cli(["crops", str(person / "turned.png"), "-o", str(person)]) == 1
    assert "would overwrite the input" in capsys.readouterr().err


def test_identity_loss_uses_a_frozen_embedding_network_from_a_file(tmp_path):
    from basicsr_arch.dmdnet_arch import DMDNetComponentDiscriminator
    from basicsr_arch.dmdnet_model import IdentityLoss

    net = {"type": "DMDNetComponentDiscriminator", "num_feat": 4}
    with pytest.raises(FileNotFoundError, match="identity loss: embedding weights .* not found"):
        IdentityLoss(net, str(tmp_path / "missing.pth"))
    torch.manual_seed(0)
    torch.save({"params": DMDNetComponentDiscriminator(num_feat=4).state_dict()}, tmp_path / "emb.pth")
    loss = IdentityLoss(net, str(tmp_path / "emb.pth"), loss_weight=2.0)
    gt = read_face(DATA / "celebref" / "00005" / "0.jpg")[None]
    out = read_face(DATA / "lq" / "00005_17.jpg")[None].requires_grad_()
    value = loss(out, gt)
    value.backward()
    assert value.item() > 0 and out.grad.abs().sum() > 0
    assert loss(gt, gt).item() == 0
    assert not any(p.requires_grad for p in loss.net.parameters())


def test_component_loss_sees_the_eyes_and_mouth_and_nothing_else():
    from basicsr.losses import build_loss

    from basicsr_arch.dmdnet_model import DMDNetModel
    from dmdnet_plugin.components import sanitize_boxes

    gt = read_face(DATA / "celebref" / "00005" / "0.jpg")[None]
    boxes = sanitize_boxes(torch.from_numpy(TEMPLATE_BOXES)[None])  # as feed_data gives them
    l1 = build_loss({"type": "L1Loss", "loss_weight": 1.0})

    def loss(out: torch.Tensor) -> float:
        return DMDNetModel._component_loss(l1, out, gt, boxes).item()

    def changed(x0: int, y0: int) -> torch.Tensor:
        out = gt.clone()
        out[..., y0 : y0 + 20, x0 : x0 + 20] = 1.0
        return out

    assert loss(gt) == 0
    nose = TEMPLATE_BOXES[2]  # le, re, no, mo
    assert loss(changed(0, 0)) == 0 and loss(changed(int(nose[0]) + 10, int(nose[1]) + 10)) == 0
    for x0, y0, x1, y1 in TEMPLATE_BOXES[[0, 1, 3]]:
        assert loss(changed(int(x0 + x1) // 2 - 10, int(y0 + y1) // 2 - 10)) > 0.01


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"dataroots": "/data/faces"},
            r"datasets.train.dataroots: got '/data/faces' \(str\), expected a list of folders",
        ),
        ({"num_ref": 2}, r"datasets.train.num_ref: unknown option; did you mean 'num_refs'\?"),
        (
            {"dataroots": [{"path": "tests/data/celebref", "layuot": "plain"}]},
            r"datasets.train.dataroots\[0\].layuot: unknown option; did you mean 'layout'\?",
        ),
        (
            {"dataroots": ["/no/such/folder"]},
            r"datasets.train.dataroots\[0\]: got '/no/such/folder', expected an existing folder",
        ),
        (
            {"jpeg_range": [90, 60]},
            r"datasets.train.jpeg_range: got \[90, 60\] \(list\), "
            r"expected a \[low, high\] pair with 1 <= low <= high <= 100",
        ),
        ({"num_refs": "2"}, r"datasets.train.num_refs: got '2' \(str\), expected an integer in \[0, 64\]"),
        ({"kernel_prob": [1.0]}, r"datasets.train.kernel_prob: got 1 probabilities for 2 kernels"),
        ({"self_ref_prob": 1.5}, r"datasets.train.self_ref_prob: got 1.5 \(float\), expected a number in \[0, 1\]"),
    ],
)
def test_dataset_options_say_which_option_is_wrong(change, message):
    opt = {**yaml.safe_load(TINY.read_text())["datasets"]["train"], "phase": "train", **change}
    if "dataroots" in change:
        del opt["dataroot_gt"]
    from basicsr_arch.option_checks import OptionError

    with pytest.raises(OptionError, match=message):
        DMDNetFaceDataset(opt)


def test_model_options_say_which_option_is_wrong_before_any_work(run_name):
    from basicsr_arch.dmdnet_model import check_model_options
    from basicsr_arch.option_checks import OptionError

    opt = yaml.safe_load(TINY.read_text())
    check_model_options(opt)
    for path, value, message in [
        (("train", "optim_g", "lr"), "2e-4", r"train.optim_g.lr: got '2e-4' \(str\), expected a number"),
        (("train", "ema_decy"), 0.9, r"train.ema_decy: unknown option; did you mean 'ema_decay'\?"),
        (("network_g", "ngf"), 3, r"network_g.ngf: got 3 \(int\), expected an integer in \[4, 512\]"),
        (("path", "pretrain_network_g"), "nowhere.pth", r"path.pretrain_network_g: got 'nowhere.pth' .*existing file"),
    ]:
        bad = yaml.safe_load(TINY.read_text())
        section = bad
        for key in path[:-1]:
            section = section.setdefault(key, {})
        section[path[-1]] = value
        with pytest.raises(OptionError, match=message):
            check_model_options(bad)
    # the issue's example, end to end: one line naming the option, no traceback
    proc = train(run_name, "datasets:train:dataroots=/data/faces")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: datasets.train.dataroots: got '/data/faces'")


@pytest.mark.parametrize("path", sorted((ROOT / "options").glob("*.yml")), ids=lambda p: p.name)
def test_every_option_file_passes_the_model_checks(path, monkeypatch):
    from basicsr_arch.dmdnet_model import check_model_options

    monkeypatch.chdir(ROOT)
    opt = yaml.safe_load(path.read_text())
    opt.setdefault("is_train", "train" in opt)  # BasicSR sets it by script; a file without train is for test.py
    pretrain = (opt.get("path") or {}).get("pretrain_network_g")
    if pretrain and pretrain.startswith("experiments/"):  # an earlier stage's output, made by its run
        opt["path"]["pretrain_network_g"] = None
    check_model_options(opt)


def test_lr_mult_gives_the_identity_modules_their_own_learning_rate():
    from basicsr_arch.dmdnet_model import lr_groups
    from basicsr_arch.option_checks import OptionError
    from dmdnet_plugin import DMDNet

    net = DMDNet(ngf=8, banks_num=4, trainable_dictionary=True)
    groups = lr_groups(net, 2e-4, {"E_hq": 5, "_KV": 5, "_Mask": 5})
    fast = {id(p) for g in groups if g["lr"] == pytest.approx(1e-3) for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in fast) == (name.startswith("E_hq.") or "_KV." in name or "_Mask." in name), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(OptionError, match=r"train.lr_mult: \['E_hgq'\] match no trainable parameter"):
        lr_groups(net, 2e-4, {"E_hgq": 5})


def test_test_py_evaluates_a_checkpoint_on_a_paired_set(tmp_path):
    """basicsr_arch/test.py on a paired set made from tests/data (two people, their other photos as
    references): BasicSR's test_pipeline logs PSNR/SSIM/NIQE for both outputs and saves the images."""
    from basicsr.metrics import calculate_psnr
    from conftest import small_net

    from dmdnet_plugin.weights import save_checkpoint

    rng = np.random.default_rng(0)
    for person in ("00005", "00022"):
        for name in ("0", "1"):
            gt = cv2.imread(str(DATA / "celebref" / person / f"{name}.jpg"))
            small = cv2.resize(cv2.GaussianBlur(gt, (0, 0), 2), (128, 128), interpolation=cv2.INTER_AREA)
            noisy = np.clip(small + rng.normal(0, 5, small.shape), 0, 255).astype(np.uint8)
            lq = cv2.resize(cv2.imdecode(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], 1), (512, 512))
            for folder, img in (("lq", lq), ("gt", gt)):
                (tmp_path / folder / person).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(tmp_path / folder / person / f"{name}.png"), img)
            shutil.copy(DATA / "celebref" / person / f"{name}.jpg.txt", tmp_path / "lq" / person / f"{name}.png.txt")
    from basicsr_arch.dmdnet_dataset import DMDNetPairedDataset
    from basicsr_arch.option_checks import OptionError

    pairs = {"name": "t", "phase": "test", "dataroot_lq": str(tmp_path / "lq"), "dataroot_gt": str(tmp_path / "gt")}
    data = DMDNetPairedDataset({**pairs, "dataroot_refs": str(DATA / "celebref"), "num_refs": 2})
    assert [r.name for r in data.pairs[0][3]] == ["1.jpg", "2.jpg"]  # 00005/0: its own photo is not a reference
    assert data[0]["refs"].shape == (2, 3, 512, 512) and data[0]["name"] == "00005_0"
    (tmp_path / "lq" / "00005" / "9.png").write_bytes((tmp_path / "lq" / "00005" / "0.png").read_bytes())
    with pytest.raises(OptionError, match=r"datasets.test: no ground truth in .* for 1 faces \(\['00005/9'\]\)"):
        DMDNetPairedDataset(pairs)
    (tmp_path / "lq" / "00005" / "9.png").unlink()
    weights = save_checkpoint(small_net(), tmp_path / "small.safetensors")
    name = f"pytest_test_{uuid.uuid4().hex[:8]}"
    opt = yaml.safe_load((ROOT / "options" / "test_dmdnet.yml").read_text())
    opt["name"] = name
    opt["datasets"]["test_1"].update(
        name="tiny_pairs",
        dataroot_lq=str(tmp_path / "lq"),
        dataroot_gt=str(tmp_path / "gt"),
        dataroot_refs=str(DATA / "celebref"),
        num_refs=2,
    )
    opt["network_g"].update(ngf=16, banks_num=8)  # small_net's
    opt["path"]["pretrain_network_g"] = str(weights)
    (tmp_path / "test.yml").write_text(yaml.safe_dump(opt))
    try:
        proc = subprocess.run(
            [sys.executable, "basicsr_arch/test.py", "-opt", str(tmp_path / "test.yml")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        results = ROOT / "results" / name
        log = "".join(p.read_text() for p in results.glob("test_*.log"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = re.search(rf"Validation tiny_pairs @ {name}: (.*)", log).group(1)
        metrics = {k: float(v) for k, v in (item.split(" ") for item in line.split(", "))}
        assert set(metrics) == {f"{m}_{b}" for m in ("psnr", "ssim", "niqe") for b in ("generic", "identity")} | {
            "psnr_input",
            "ssim_input",
        }
        shown = results / "visualization" / "tiny_pairs"
        faces = [f"{p}_{n}" for p in ("00005", "00022") for n in ("0", "1")]
        assert sorted(p.name for p in shown.iterdir()) == sorted(
            f"{f}_{s}.png" for f in faces for s in (name, "generic", "identity")
        )
        for branch in ("generic", "identity"):  # the logged PSNR is the mean over the saved images
            psnr = [
                calculate_psnr(
                    cv2.imread(str(shown / f"{f}_{branch}.png")),
                    cv2.imread(str(tmp_path / "gt" / f[:5] / f"{f[6:]}.png")),
                    0,
                )
                for f in faces
            ]
            assert abs(np.mean(psnr) - metrics[f"psnr_{branch}"]) < 1e-3, (psnr, metrics)
        assert all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("niqe"))
        assert "Number of test images in tiny_pairs: 4" in log
    finally:
        shutil.rmtree(ROOT / "results" / name, ignore_errors=True)


def fresh_clone(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them: tracked and new ones, nothing git ignores
    (no datasets/, results/ or experiments/), so a run there needs only what the repository ships."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split(b"\0")):
        src = ROOT / os.fsdecode(name)
        if src.is_file():  # a tracked file being deleted is not there
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    return dest


def test_readme_test_command_runs_on_a_fresh_clone(tmp_path):
    """README's `python basicsr_arch/test.py -opt options/test_dmdnet.yml`, as written, from the root of a
    fresh clone (in a copy, so that BasicSR's results/test_DMDNet, or its archiving of an earlier one,
    never touches the checkout): the bundled demo model on the shipped held-out pairs."""
    clone = fresh_clone(tmp_path / "clone")
    assert not (clone / "datasets").exists() and not (clone / "results").exists()
    proc = subprocess.run(
        [sys.executable, "basicsr_arch/test.py", "-opt", "options/test_dmdnet.yml"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = clone / "results" / "test_DMDNet"
    log = "".join(p.read_text() for p in results.glob("test_test_DMDNet_*.log"))
    assert "Loading DMDNet weights from dmdnet_plugin/data/dmdnet_demo.safetensors" in log
    assert "Number of test images in heldout_pairs: 2" in log
    line = re.search(r"Validation heldout_pairs @ test_DMDNet: (.*)", log).group(1)
    metrics = {k: float(v) for k, v in (item.split(" ") for item in line.split(", "))}
    for branch in ("generic", "identity"):  # people the demo model never saw: both outputs beat the input
        assert metrics[f"psnr_{branch}"] > metrics["psnr_input"] and metrics[f"ssim_{branch}"] > metrics["ssim_input"]
    shown = results / "visualization" / "heldout_pairs"
    faces = ("00121_2", "00146_0")
    assert sorted(p.name for p in shown.iterdir()) == sorted(
        f"{f}_{s}.png" for f in faces for s in ("test_DMDNet", "generic", "identity")
    )
    for face in faces:
        grid = cv2.imread(str(shown / f"{face}_test_DMDNet.png"))
        assert grid.shape == (512, 2048, 3)  # input | generic | identity | ground truth
        truth = cv2.imread(str(DATA / "heldout" / face[:5] / f"{face[6:]}.jpg"))
        assert np.array_equal(grid[:, 1536:], truth)
        generic, identity = (cv2.imread(str(shown / f"{face}_{b}.png")).astype(int) for b in ("generic", "identity"))
        assert np.abs(generic - identity).mean() > 0.1  # the identity branch read the person's references


def test_the_shipped_pairs_are_what_make_pairs_writes(tmp_path):
    """tests/data/heldout_lq is the project's own seeded degradation of tests/data/heldout, as its
    SOURCES.md says: the command there writes the same pixels and landmarks again."""
    shipped = DATA / "heldout_lq"
    cmd = [sys.executable, "basicsr_arch/make_pairs.py", "tests/data/heldout", str(tmp_path / "lq")]
    proc = subprocess.run([*cmd, "--faces", "00121/2", "00146/0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 low-quality faces written to" in proc.stdout

    def files(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    faces = ["00121/2.png", "00121/2.png.txt", "00146/0.png", "00146/0.png.txt"]
    assert files(shipped) == [*faces, "SOURCES.md"] and files(tmp_path / "lq") == faces
    for name in ("00121/2", "00146/0"):
        ours, theirs = (cv2.imread(str(root / f"{name}.png")).astype(int) for root in (tmp_path / "lq", shipped))
        # 0 here; the same face with seeds 1-3 instead differs by 4.9 levels on average
        assert np.abs(ours - theirs).mean() < 0.25, name
        marks = np.loadtxt(shipped / f"{name}.png.txt")
        assert np.allclose(np.loadtxt(tmp_path / "lq" / f"{name}.png.txt"), marks)
        assert np.abs(marks - np.loadtxt(DATA / "heldout" / f"{name}.jpg.txt")).max() <= 0.005

    def refused(*args: str) -> list[str]:
        proc = subprocess.run([*cmd[:2], *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        return proc.stderr.strip().splitlines()

    assert refused("tests/data/heldout", str(tmp_path / "x"), "--faces", "00121/9") == [
        "error: tests/data/heldout: no face 00121/9"
    ]
    assert refused("tests/data/heldout", "tests/data/heldout/lq") == [
        "error: tests/data/heldout/lq: inside tests/data/heldout, where the copies would be read as faces"
    ]
    assert not (DATA / "heldout" / "lq").exists() and not (tmp_path / "x").exists()
