"""Files from strangers: a few hundred damaged or malicious identity dictionaries and checkpoints.

Cases are made from real files (an identity built by a model, that model's checkpoint) with a fixed
seed. Each must either load to something usable or fail with the loader's own error: one line that
names the file. The CLI must print exactly one ``error:`` line for it and no traceback, no file may
run code, and reading them all must not grow the process by more than a small multiple of a file.
"""

from __future__ import annotations

import json
import pickle
import random
import resource
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_inputs import load_parity_inputs
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dmdnet_plugin import IdentityDictionary, IdentityError, WeightsError, cli
from dmdnet_plugin.weights import load_model, save_checkpoint

SEED = 20261125
CASES_PER_KIND = 160
MARKER = Path("/tmp/dmdnet-hostile-pickle-ran")


class _RunsCode:
    """A pickled object that would create MARKER when unpickled."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _with_meta(blob: bytes, **changes: str | None) -> bytes:
    header, data = _split(blob)
    meta = header.setdefault("__metadata__", {})
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return _join(header, data)


def _with_tensor(blob: bytes, rng: random.Random, change: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    header, _ = _split(blob)
    tensors = st_load(blob)
    name = rng.choice(sorted(tensors))
    tensors[name] = change(tensors[name]).contiguous()
    return st_save(tensors, metadata=header.get("__metadata__"))


def _poison(rng: random.Random) -> Callable[[torch.Tensor], torch.Tensor]:
    value = rng.choice([float("nan"), float("inf"), float("-inf")])

    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = value
        return t

    return change


def _reshape(rng: random.Random) -> Callable[[torch.Tensor], torch.Tensor]:
    options = [
        lambda t: t.flatten(),
        lambda t: t[..., :1],
        lambda t: t[:, : t.shape[1] // 2],
        lambda t: t[:0],
        lambda t: t.unsqueeze(0),
        lambda t: torch.zeros(()),
    ]

    def change(t: torch.Tensor) -> torch.Tensor:
        for option in rng.sample(options, len(options)):
            try:
                out = option(t)
            except IndexError:
                continue
            if out.shape != t.shape:
                return out
        return torch.zeros(())

    return change


def _retype(rng: random.Random) -> Callable[[torch.Tensor], torch.Tensor]:
    dtype = rng.choice([torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64, torch.float64, torch.bfloat16])
    return lambda t: t.to(dtype)


def _byte_damage(blob: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # truncated anywhere
        return blob[: rng.randrange(len(blob))]
    if kind == 1:  # header length wrong: zero, too small, past the end, or absurd
        (n,) = struct.unpack("<Q", blob[:8])
        bad = rng.choice([0, 1, n - 1, n + 8, len(blob), 2**31, 2**40, 2**63 - 1, rng.randrange(2**64)])
        return struct.pack("<Q", bad) + blob[8:]
    if kind == 2:  # bytes flipped inside the header
        (n,) = struct.unpack("<Q", blob[:8])
        raw = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            raw[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(raw)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))  # noise


def _metadata_damage(blob: bytes, rng: random.Random, fields: list[str]) -> bytes:
    field = rng.choice(fields)
    value = rng.choice(
        [
            "not json {",
            "[1, 2",
            "{}",
            '["a"]',
            "[NaN, 1]",
            "[]",
            "1e999",
            "-3",
            "null",
            "x" * (2 << 20),
            json.dumps([0.1] * 300_000),
            None,
        ]
    )
    return _with_meta(blob, **{field: value})


def _pickled(rng: random.Random) -> bytes:
    import io

    payload = rng.choice([_RunsCode(), {"params": _RunsCode()}, [_RunsCode()]])
    buf = io.BytesIO()
    if rng.random() < 0.5:
        torch.save(payload, buf)
    else:
        pickle.dump(payload, buf)
    return buf.getvalue()


def _cases(base: bytes, meta_fields: list[str], rng: random.Random) -> list[tuple[str, bytes]]:
    makers = [
        ("bytes", lambda: _byte_damage(base, rng)),
        ("nan-inf", lambda: _with_tensor(base, rng, _poison(rng))),
        ("shape", lambda: _with_tensor(base, rng, _reshape(rng))),
        ("dtype", lambda: _with_tensor(base, rng, _retype(rng))),
        ("metadata", lambda: _metadata_damage(base, rng, meta_fields)),
        ("pickle", lambda: _pickled(rng)),
    ]
    out = []
    for i in range(CASES_PER_KIND):
        kind, make = makers[i % len(makers)]
        out.append((kind, make()))
    return out


def _check_one(path: Path, load: Callable[[Path], object], error: type, use: Callable[[object], None]) -> str:
    """'refused' or 'usable'; any other exception fails the test with the case named."""
    try:
        obj = load(path)
    except error as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message and "Traceback" not in message, message
        return "refused"
    use(obj)
    return "usable"


def _cli_says_one_error_line(argv: list[str], path: Path, capsys) -> None:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and path.name in err[0], (argv, err)


@pytest.fixture(scope="module")
def identity_blob(small, tmp_path_factory) -> bytes:
    inputs = load_parity_inputs()
    emb = np.random.default_rng(0).normal(size=(2, 128))
    ident = small.encode_identity(
        inputs["refs"][:2], inputs["ref_boxes"][:2], name="someone", embeddings=emb, damaged_embeddings=emb + 0.1
    )
    return ident.save(tmp_path_factory.mktemp("ident") / "base.safetensors").read_bytes()


def test_hostile_identity_dictionaries_are_refused_cleanly(small, identity_blob, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    rng = random.Random(SEED)
    outcomes: dict[str, list[str]] = {}

    def use(ident: IdentityDictionary) -> None:
        try:  # a file that reads well must still fit the model, or be refused with the same error type
            small.check_identity(ident)
        except IdentityError as exc:
            assert "\n" not in str(exc)

    cases = _cases(
        identity_blob,
        ["embedding", "embedding_damaged", "n_refs", "n_embedded", "model_fingerprint", "format", "name"],
        rng,
    )
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, (kind, blob) in enumerate(cases):
        path = tmp_path / f"case{i:03d}-{kind}.safetensors"
        path.write_bytes(blob)
        outcomes.setdefault(kind, []).append(_check_one(path, IdentityDictionary.load, IdentityError, use))
        if outcomes[kind][-1] == "refused" and i % 8 == 0:
            _cli_says_one_error_line(["identity", "show", str(path)], path, capsys)
        path.unlink()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    print(
        f"identity dictionaries: {len(cases)} cases, "
        + ", ".join(f"{k}: {v.count('refused')} refused / {v.count('usable')} usable" for k, v in outcomes.items())
    )
    assert not MARKER.exists(), "a pickled file ran code"
    assert all(v == ["refused"] * len(v) for k, v in outcomes.items() if k in ("nan-inf", "pickle"))
    assert grown_mb < 64, f"peak memory grew by {grown_mb:.0f} MB reading files of {len(identity_blob) >> 10} kB"


def test_hostile_checkpoints_are_refused_cleanly(small, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    rng = random.Random(SEED + 1)
    base = save_checkpoint(small, tmp_path / "base.safetensors", half=True).read_bytes()
    outcomes: dict[str, list[str]] = {}
    cases = _cases(base, ["config", "format"], rng)
    cases += [("config-claims", _with_meta(base, config=json.dumps({"ngf": 4096, "banks_num": 100_000})))]
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, (kind, blob) in enumerate(cases):
        suffix = ".pth" if kind == "pickle" else ".safetensors"
        path = tmp_path / f"case{i:03d}-{kind}{suffix}"
        path.write_bytes(blob)
        outcomes.setdefault(kind, []).append(
            _check_one(path, lambda p: load_model(p, device="cpu"), WeightsError, lambda m: None)
        )
        if outcomes[kind][-1] == "refused" and i % 8 == 0:
            _cli_says_one_error_line(["convert", str(path), str(tmp_path / "out.safetensors")], path, capsys)
        path.unlink()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    print(
        f"checkpoints: {len(cases)} cases, "
        + ", ".join(f"{k}: {v.count('refused')} refused / {v.count('usable')} usable" for k, v in outcomes.items())
    )
    assert not MARKER.exists(), "a pickled checkpoint ran code"
    assert all(
        v == ["refused"] * len(v) for k, v in outcomes.items() if k in ("nan-inf", "pickle", "shape", "config-claims")
    )
    assert grown_mb < 4 * len(base) / 2**20 + 64, f"peak memory grew by {grown_mb:.0f} MB"
