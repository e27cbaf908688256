"""The core network: official layout, parity with the authors' code, batching, precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import DATA
from parity_inputs import load_parity_inputs

from dmdnet_plugin import DMDNet, boxes_from_landmarks
from dmdnet_plugin.layers import SNConv2d, set_sn_folding
from dmdnet_plugin.weights import build_model

MANIFEST = json.loads((DATA / "dmdnet_official_state_dict.json").read_text())["tensors"]


def test_state_dict_has_the_official_names_shapes_and_dtypes():
    net = DMDNet()
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
    assert got == [tuple(t) for t in MANIFEST]
    assert len(got) == 1014


def test_strict_load_of_a_state_dict_built_from_the_manifest():
    state = {name: torch.full(shape, 0.5, dtype=getattr(torch, dtype)) for name, shape, dtype in MANIFEST}
    net = build_model(state)
    assert net.config == {"ngf": 64, "banks_num": 128}
    assert torch.equal(net.state_dict()["up4.4.weight_orig"], state["up4.4.weight_orig"])
    DMDNet().load_state_dict(state, strict=True)


def test_boxes_are_exactly_the_authors_on_every_landmark_file():
    expected = json.loads((DATA / "boxes_expected.json").read_text())
    assert len(expected) == len(list((DATA / "landmarks").rglob("*.txt"))) == 142
    for name, boxes in expected.items():
        landmarks = np.loadtxt(DATA / "landmarks" / name)
        before = landmarks.copy()
        got = boxes_from_landmarks(landmarks)
        assert got.dtype.kind == "i" and got.shape == (4, 4)
        np.testing.assert_array_equal(got, boxes, err_msg=name)
        np.testing.assert_array_equal(landmarks, before)  # the input is not clipped in place


@pytest.fixture(scope="module")
def parity(official_net):
    inputs = load_parity_inputs()
    identity = official_net.encode_identity(inputs["refs"], inputs["ref_boxes"])
    generic = official_net.restore(inputs["lq"], inputs["lq_boxes"])
    specific = official_net.restore(inputs["lq"], inputs["lq_boxes"], identity=identity)
    return inputs, identity, generic, specific


def test_generic_and_reference_outputs_match_the_authors_code(parity):
    _, _, generic, specific = parity
    expected = np.load(DATA / "parity_expected.npz")
    assert not np.allclose(expected["generic"], expected["specific"], atol=1e-4)
    for ours, theirs in ((generic, expected["generic"]), (specific, expected["specific"])):
        diff = np.abs(ours[:, :, 1::4, 1::4].numpy() - theirs)
        assert diff.max() < 1e-3 and diff.mean() < 1e-5, (diff.max(), diff.mean())


def test_a_batch_gives_the_same_faces_as_single_calls(official_net, parity):
    inputs, identity, generic, specific = parity
    assert not torch.equal(inputs["lq_boxes"][0], inputs["lq_boxes"][1])
    for i in range(2):
        single = official_net.restore(inputs["lq"][i : i + 1], inputs["lq_boxes"][i : i + 1], identity=identity)
        assert (single[0] - specific[i]).abs().max() < 1e-4


def test_folded_spectral_norm_gives_the_unfolded_output(small):
    inputs = load_parity_inputs()
    folded = small.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])
    set_sn_folding(small, False)
    try:
        unfolded = small.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])
    finally:
        set_sn_folding(small, True)
    assert (folded - unfolded).abs().max() < 1e-5


def test_training_mode_spectral_norm_follows_torch():
    torch.manual_seed(0)
    ours = SNConv2d(8, 16, 3, padding=1)
    ref = nn.utils.spectral_norm(nn.Conv2d(8, 16, 3, padding=1))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 12, 12)
    for _ in range(3):
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.weight_u, ref.weight_u, atol=1e-6)
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_degenerate_boxes_are_clamped_instead_of_crashing(small):
    lq = load_parity_inputs()["lq"][:1]
    boxes = torch.tensor([[[-40, -40, 600, 30], [500, 500, 520, 520], [10, 10, 10, 10], [0, 0, 512, 512]]])
    out = small.restore(lq, boxes)
    assert out.shape == (1, 3, 512, 512) and torch.isfinite(out).all()


def test_restore_rejects_wrong_shapes(small):
    with pytest.raises(ValueError, match="lq must be"):
        small.restore(torch.zeros(1, 3, 256, 256), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="boxes must be"):
        small.restore(torch.zeros(2, 3, 512, 512), np.zeros((1, 4, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_matches_fp32_without_host_sync(official_net):
    inputs = load_parity_inputs()
    net = official_net.cuda()
    try:
        fp32 = net.restore(inputs["lq"], inputs["lq_boxes"])
        net.restore(inputs["lq"], inputs["lq_boxes"], dtype=torch.float16)  # warm up (weight folding)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with net._inference(torch.float16) as device:
                net(inputs["lq"].to(device), inputs["lq_boxes"].to(device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        fp16 = net.restore(inputs["lq"], inputs["lq_boxes"], dtype=torch.float16)
        assert (fp16 - fp32).abs().mean() < 2e-3
    finally:
        net.cpu()


def test_inference_mode_weights_work(small):
    """ComfyUI loads and runs nodes under torch.inference_mode()."""
    from conftest import small_net

    lq = load_parity_inputs()["lq"][:1]
    boxes = load_parity_inputs()["lq_boxes"][:1]
    expected = small.restore(lq, boxes)
    with torch.inference_mode():
        net = small_net()
        out = net.restore(lq, boxes)
        assert net.fingerprint() == small.fingerprint()
    assert torch.equal(out, expected)


def test_training_forward_with_references_runs_under_bf16_autocast():
    """Per-face reference atoms come out of autocast in bf16; the dictionary read promotes them."""
    torch.manual_seed(0)
    net = DMDNet(ngf=8, banks_num=4, trainable_dictionary=True).train()
    inputs = load_parity_inputs()
    lq, boxes = inputs["lq"][:2], inputs["lq_boxes"][:2]
    refs = inputs["refs"][:2].unsqueeze(1).repeat(1, 2, 1, 1, 1)  # two faces, two references each
    ref_boxes = inputs["ref_boxes"][:2].unsqueeze(1).repeat(1, 2, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(lq, boxes, generic=True, refs=refs, ref_boxes=ref_boxes)
        loss = (out.generic.float() - lq).abs().mean() + (out.identity.float() - lq).abs().mean()
    assert out.generic.dtype == out.identity.dtype == torch.bfloat16
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    unused = {name for name, g in grads.items() if g is None}
    assert all(name.startswith("E_hq.") and "_Q." in name for name in unused)  # the authors' unused heads
    for name in (
        "E_hq.conv1.0.weight_orig",
        "LE_256_KV.Key.0.weight_orig",
        "le_256_mem_key",
        "LE_256_Mask.conv1.0.weight_orig",
    ):
        assert grads[name].abs().sum() > 0, name  # reference encoder, dictionaries and mask all train


def test_bf16_on_cpu_stays_near_fp32(official_net):
    """What ``--precision auto`` picks on CPUs with native bf16: the official-size model on the real
    parity faces, generic and identity, against fp32 (runs wherever torch's CPU bf16 does)."""
    inputs = load_parity_inputs()
    identity = official_net.encode_identity(inputs["refs"], inputs["ref_boxes"])
    for ident in (None, identity):
        fp32 = official_net.restore(inputs["lq"], inputs["lq_boxes"], ident)
        bf16 = official_net.restore(inputs["lq"], inputs["lq_boxes"], ident, dtype=torch.bfloat16)
        error = (bf16 - fp32).abs()
        print(f"bf16 vs fp32 ({'identity' if ident else 'generic'}): mean {error.mean():.2e}, max {error.max():.2e}")
        assert torch.isfinite(bf16).all() and error.mean() < 1.5e-2
