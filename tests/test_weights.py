"""Checkpoint files: every supported format loads strictly, bad files fail clearly, nothing unpickles."""

from __future__ import annotations

import pickle

import pytest
import torch
from parity_inputs import load_parity_inputs

from dmdnet_plugin import WeightsError, convert, load_model
from dmdnet_plugin.weights import find_weights, read_state_dict


@pytest.fixture(scope="module")
def reference_output(small):
    inputs = load_parity_inputs()
    return inputs, small.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])


def _check_same_output(model, reference_output, atol=0.0):
    inputs, expected = reference_output
    out = model.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])
    assert (out - expected).abs().max() <= atol


def test_plain_and_basicsr_pth_and_safetensors_load_to_the_same_model(small, reference_output, tmp_path):
    state = small.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"params": {k: v * 0 for k, v in state.items()}, "params_ema": state}, tmp_path / "basicsr.pth")
    torch.save({"params": state}, tmp_path / "params_only.pth")
    convert(tmp_path / "plain.pth", tmp_path / "ours.safetensors")
    for name in ("plain.pth", "basicsr.pth", "params_only.pth", "ours.safetensors"):
        model = load_model(tmp_path / name, device="cpu").net
        assert model.config == {"ngf": 16, "banks_num": 8}, name
        assert model.fingerprint() == small.fingerprint(), name
        _check_same_output(model, reference_output)


def test_half_precision_safetensors_keep_their_config(small, reference_output, tmp_path):
    convert_path = tmp_path / "half.safetensors"
    from dmdnet_plugin.weights import save_checkpoint

    save_checkpoint(small, convert_path, half=True)
    state, config = read_state_dict(convert_path)
    assert config == {"ngf": 16, "banks_num": 8}
    assert all(v.dtype == torch.float16 for v in state.values())
    _check_same_output(load_model(convert_path, device="cpu").net, reference_output, atol=2e-2)


def test_mismatched_checkpoints_name_what_is_missing_and_unexpected(small, tmp_path):
    state = dict(small.state_dict())
    del state["up4.4.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        WeightsError, match=r"bad.pth: does not match .*missing 1 \(up4.4.bias\).*unexpected 1 \(extra.weight\)"
    ):
        load_model(tmp_path / "bad.pth", device="cpu")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth: not a DMDNet state dict"):
        load_model(tmp_path / "other.pth", device="cpu")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": _Payload()}, f)
    with pytest.raises(WeightsError, match="evil.pth: not a readable checkpoint"):
        load_model(path, device="cpu")
    assert "must never run" not in capsys.readouterr().out


def test_text_and_empty_files_are_refused(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("notes.pth", "empty.safetensors"):
        with pytest.raises(WeightsError, match=f"{name}: not a readable checkpoint"):
            load_model(tmp_path / name, device="cpu")


def test_discovery_order_ends_at_the_bundled_demo_and_never_downloads(small, tmp_path, monkeypatch):
    from dmdnet_plugin import weights
    from dmdnet_plugin.weights import save_checkpoint

    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMDNET_WEIGHTS", raising=False)
    bundled = find_weights()
    assert bundled.path == weights.BUNDLED and bundled.is_demo and "dmdnet weights download" in bundled.notice()
    cached = save_checkpoint(small, tmp_path / "cache" / "mine.safetensors")
    assert find_weights() == weights.WeightsSource(cached, "cache")
    env = save_checkpoint(small, tmp_path / "env.safetensors")
    monkeypatch.setenv("DMDNET_WEIGHTS", str(env))
    assert find_weights().path == env and find_weights().origin == "DMDNET_WEIGHTS"
    assert find_weights(cached).origin == "--weights"
    with pytest.raises(WeightsError, match="nope.pth: weights file not found \\(given by --weights\\)"):
        find_weights(tmp_path / "nope.pth")
    monkeypatch.delenv("DMDNET_WEIGHTS")
    (tmp_path / "cache" / "mine.safetensors").unlink()
    monkeypatch.setattr(weights, "BUNDLED", tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="no DMDNet weights found: run `dmdnet weights download`"):
        find_weights()


def test_a_damaged_bundled_checkpoint_is_refused_by_its_checksum(tmp_path, monkeypatch):
    from dmdnet_plugin import weights

    damaged = tmp_path / "dmdnet_demo.safetensors"
    data = bytearray(weights.BUNDLED.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMDNET_WEIGHTS", raising=False)
    monkeypatch.setattr(weights, "BUNDLED", damaged)
    with pytest.raises(WeightsError, match="bundled demo checkpoint is damaged"):
        load_model(device="cpu")


def test_the_bundled_checksum_is_the_shipped_file():
    from dmdnet_plugin import weights

    assert weights.sha256_of(weights.BUNDLED) == weights.BUNDLED_SHA256
    model = load_model(weights.BUNDLED, device="cpu")
    assert model.source.path == weights.BUNDLED and model.source.origin == "--weights"
    assert weights.BUNDLED.stat().st_size <= 25 * 1024 * 1024


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_weights_download_checks_the_file_before_keeping_it(small, tmp_path, http_folder, capsys):
    from dmdnet_plugin.cli import main

    root, url = http_folder
    torch.save(small.state_dict(), root / "DMDNet.pth")
    (root / "page.html").write_text("<html>rate limited</html>")
    cache = tmp_path / "cache"
    assert main(["weights", "download", "--url", f"{url}/page.html", "--to", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "page.html" in err and "not a readable checkpoint" in err and not (cache / "DMDNet.pth").exists()
    assert main(["weights", "download", "--url", f"{url}/missing.pth", "--to", str(cache)]) == 2
    assert "404" in capsys.readouterr().err and not list(cache.glob("*"))
    assert main(["weights", "download", "--url", f"{url}/DMDNet.pth", "--to", str(cache)]) == 0
    assert (cache / "DMDNet.pth").read_bytes() == (root / "DMDNet.pth").read_bytes()
    assert load_model(cache / "DMDNet.pth", device="cpu").net.fingerprint() == small.fingerprint()
