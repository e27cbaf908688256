"""Checkpoint files: every supported format loads strictly, bad files fail clearly, nothing unpickles."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from parity_inputs import load_parity_inputs

from dmdnet_plugin import WeightsError, convert, load_model
from dmdnet_plugin.text import printable
from dmdnet_plugin.weights import find_weights, read_state_dict, save_checkpoint


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


@pytest.fixture(scope="module")
def bad_checkpoints(small, tmp_path_factory) -> dict[Path, str]:
    """Files that are not checkpoints, each with the problem its one-line error must name."""
    folder = tmp_path_factory.mktemp("bad")
    torch.save(small.state_dict(), folder / "whole.pth")
    pth = (folder / "whole.pth").read_bytes()
    ours = save_checkpoint(small, folder / "whole.safetensors").read_bytes()
    page = b"<!DOCTYPE html>\n<html><head><title>DMDNet.pth</title></head><body>Sign in</body></html>"
    files = {
        "empty.pth": (b"", r"empty file"),
        "empty.safetensors": (b"", r"empty file"),
        "bad\nname.pth": (b"", r"empty file"),  # a control character in the name stays escaped
        "cut.pth": (pth[: len(pth) // 2], r"truncated or corrupt: a zip archive"),
        "cut.safetensors": (ours[: len(ours) // 2], r"truncated or corrupt safetensors"),
        "saved-page.pth": (page, r"an HTML page, not a checkpoint"),
        "saved-page.safetensors": (b"\xef\xbb\xbf " + page, r"an HTML page, not a checkpoint"),
        "notes.pth": (b"hello", r"KeyError: 101"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {folder / name: problem for name, (_, problem) in files.items()}


def test_empty_cut_and_html_files_are_refused_in_one_line(bad_checkpoints):
    for path, problem in bad_checkpoints.items():
        with pytest.raises(WeightsError) as err:
            load_model(path, device="cpu")
        message = str(err.value)
        assert re.fullmatch(f"{re.escape(printable(path))}: not a readable checkpoint \\({problem}.*\\)", message)
        assert "\n" not in message


def test_the_cli_says_one_error_line_for_a_bad_weights_file(bad_checkpoints, tmp_path, capsys):
    from dmdnet_plugin.cli import main

    photo = str(Path(__file__).parent / "data" / "photos" / "family.jpg")
    for path, problem in bad_checkpoints.items():
        assert main(["restore", photo, "-o", str(tmp_path / "out"), "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {printable(path)}: not a readable checkpoint (")
        assert re.search(problem, errors[0]) and "Traceback" not in err


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
    assert "page.html: not a readable checkpoint (an HTML page, not a checkpoint" in err
    assert not (cache / "DMDNet.pth").exists()
    assert main(["weights", "download", "--url", f"{url}/missing.pth", "--to", str(cache)]) == 2
    assert "404" in capsys.readouterr().err and not list(cache.glob("*"))
    assert main(["weights", "download", "--url", f"{url}/DMDNet.pth", "--to", str(cache)]) == 0
    assert (cache / "DMDNet.pth").read_bytes() == (root / "DMDNet.pth").read_bytes()
    assert load_model(cache / "DMDNet.pth", device="cpu").net.fingerprint() == small.fingerprint()
