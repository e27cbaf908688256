"""Checkpoints: find them, load them safely, convert them.

Three formats load without flags: the authors' ``DMDNet.pth`` (a plain state dict),
our ``.safetensors`` (configuration in the metadata) and BasicSR ``.pth`` files
(``params_ema`` / ``params``). ``.pth`` files are read with ``weights_only=True``: a
checkpoint from the internet must never run code when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_path
from .identity import IdentityDictionary
from .model import KEY_SCALE, DMDNet
from .runtime import cache_dir, pick_device, pick_precision, tune_cpu_allocator
from .tensorfile import TensorFileError, check_tensors, json_field, read_safetensors

OFFICIAL_URL = "https://github.com/csxmli2016/DMDNet/releases/download/v1/DMDNet.pth"
OFFICIAL_NAME = "DMDNet.pth"
URL_ENV = "DMDNET_WEIGHTS_URL"  # a mirror of the authors' file, for `dmdnet weights download` and ComfyUI
CHECKPOINT_FORMAT = "dmdnet-checkpoint"
CHECKPOINT_VERSION = 1
MAX_HEADER = 8 << 20  # the authors' configuration has about 1,000 tensors: a header of about 150 kB
# The demo checkpoint that ships inside the package (docs/training_demo.md says how it was made).
BUNDLED = Path(__file__).resolve().parent / "data" / "dmdnet_demo.safetensors"
BUNDLED_SHA256 = "be2788331039e4414475564d2e082033208429a0e62a934c29ebb13feb45ef81"
DEMO_NOTE = (
    "using the small bundled demo model (trained on a CPU on a few hundred faces, far below the "
    "authors' weights); run `dmdnet weights download` for the authors' DMDNet.pth"
)


class WeightsError(RuntimeError):
    """A checkpoint is missing or unusable; the message says which file and why."""


@dataclass(frozen=True)
class WeightsSource:
    """Which checkpoint a model came from and why it was chosen, for logs, reports and pages."""

    path: Path
    origin: str  # "--weights", "DMDNET_WEIGHTS", "cache" or "bundled demo"

    @property
    def is_demo(self) -> bool:
        return self.origin == "bundled demo"

    def record(self) -> dict:
        return {"path": str(self.path), "origin": self.origin, "demo": self.is_demo}

    def notice(self) -> str:
        """What every surface tells its user: the file, and for the demo model how to get the real one."""
        text = f"weights: {self.path} ({self.origin})"
        return f"{text}\nnote: {DEMO_NOTE}" if self.is_demo else text


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_weights(explicit: str | Path | WeightsSource | None = None) -> WeightsSource:
    """Resolve the checkpoint: explicit path, ``$DMDNET_WEIGHTS``, the cache, then the bundled demo
    (a source already resolved is kept, with its origin).

    Never touches the network: ``dmdnet weights download`` fetches the authors' file on request.
    """
    if isinstance(explicit, WeightsSource):
        return explicit
    for origin, value in (("--weights", explicit), ("DMDNET_WEIGHTS", os.environ.get("DMDNET_WEIGHTS"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise WeightsError(f"{path}: weights file not found (given by {origin})")
            return WeightsSource(path, origin)
    for path in sorted(cache_dir().glob("*.safetensors")) + [cache_dir() / OFFICIAL_NAME]:
        if path.is_file():
            return WeightsSource(path, "cache")
    if BUNDLED.is_file():
        if sha256_of(BUNDLED) != BUNDLED_SHA256:
            raise WeightsError(
                f"{BUNDLED}: the bundled demo checkpoint is damaged (sha256 differs); reinstall "
                "the package, or pass --weights PATH"
            )
        return WeightsSource(BUNDLED, "bundled demo")
    raise WeightsError(
        f"no DMDNet weights found: run `dmdnet weights download` (fetches {OFFICIAL_NAME} into "
        f"{cache_dir()}), or put it there yourself, or pass --weights PATH, or set DMDNET_WEIGHTS=PATH"
    )


def official_url() -> str:
    """Where the authors' checkpoint is fetched from: ``$DMDNET_WEIGHTS_URL`` (a mirror), else their release."""
    return os.environ.get(URL_ENV) or OFFICIAL_URL


def download_official(
    url: str | None = None, target: Path | None = None, progress: Callable[[int, int | None], None] | None = None
) -> Path:
    """Fetch the authors' checkpoint (from :func:`official_url` by default) into the cache, atomically.

    ``progress(bytes done, bytes in all or None)`` replaces the terminal progress bar (ComfyUI
    shows its own). The integrity check is a strict load (every tensor name and shape of the
    configuration the file claims): a truncated, HTML or foreign file never reaches the target.
    """
    from tqdm import tqdm

    url = url or official_url()
    target = target or cache_dir() / OFFICIAL_NAME
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_path(target) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=progress is not None)
            done = 0
            with open(tmp, "wb") as out, bar:
                while chunk := response.read(1 << 20):
                    done += out.write(chunk)
                    bar.update(len(chunk))
                    if progress:
                        progress(done, total)
            try:
                state, config = read_state_dict(tmp)
                build_model(state, config, source=f"download from {url}")
            except WeightsError as exc:
                raise WeightsError(str(exc).replace(str(tmp), f"download from {url}")) from None
    except OSError as exc:
        raise WeightsError(f"download from {url} failed ({exc})") from None
    return target


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and stored configuration (None when the file has none) of any supported file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state, meta = read_safetensors(path, MAX_HEADER)
            config = json_field(meta, "config") if "config" in meta else None
            return state, config if isinstance(config, dict) else None
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except TensorFileError as exc:
        raise WeightsError(f"{path}: not a readable checkpoint ({exc})") from None
    except Exception as exc:  # torch.load: zip, pickle and weights_only refusals each have their own type
        raise WeightsError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    for key in ("params_ema", "params"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    return state, config


def infer_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The constructor arguments that produce these tensor shapes."""
    try:
        config = {"ngf": state["E_lq.conv1.0.weight_orig"].shape[0], "banks_num": state["le_256_mem_key"].shape[0]}
    except KeyError as exc:
        raise WeightsError(f"not a DMDNet state dict (no {exc})") from None
    except IndexError:
        raise WeightsError("not a DMDNet state dict (scalar where a weight should be)") from None
    if config["ngf"] < KEY_SCALE or config["ngf"] % KEY_SCALE or config["banks_num"] < 1:
        raise WeightsError(f"not a DMDNet state dict (it implies {config})")
    return config


def build_model(state: dict[str, torch.Tensor], config: dict | None = None, source: str = "state dict") -> DMDNet:
    """A DMDNet holding ``state``, loaded strictly with a readable report of any mismatch.

    Shapes are checked on a meta-device net first, so a file can never make us allocate a model
    larger than itself; every tensor must be finite. The stored configuration, when there is one,
    must agree with the shapes.
    """
    try:
        inferred = infer_config(state)
        if config is not None and config != inferred:
            raise WeightsError(f"its stored configuration {config} does not match its tensors {inferred}")
        check_tensors(state)
    except (WeightsError, TensorFileError) as exc:
        raise WeightsError(f"{source}: {exc}") from None
    with torch.device("meta"):
        model = DMDNet(**inferred)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:

        def show(items: list[str]) -> str:
            return f"{len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"

        raise WeightsError(
            f"{source}: does not match DMDNet{model.config}: missing {show(missing)}, "
            f"unexpected {show(unexpected)}, wrong shape {show(wrong)}"
        )
    # fresh, aligned fp32 copies: views into a loaded file can take slower, differently rounding kernels
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, strict=True, assign=True)
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with where its weights came from and the precision it runs in.

    The ``nn.Module`` itself carries neither: it stays a plain DMDNet that training, the
    benchmarks and the tests use as it is. ``source`` is None for a net built in code.
    """

    net: DMDNet
    dtype: torch.dtype = torch.float32  # the compute precision (autocast); the weights stay float32
    source: WeightsSource | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def restore(
        self, lq: torch.Tensor, boxes: torch.Tensor, identity: IdentityDictionary | None = None
    ) -> torch.Tensor:
        """:meth:`DMDNet.restore` in this model's precision."""
        return self.net.restore(lq, boxes, identity, dtype=self.dtype)

    def encode_identity(self, refs: torch.Tensor, ref_boxes: torch.Tensor, **options) -> IdentityDictionary:
        """:meth:`DMDNet.encode_identity` in this model's precision."""
        return self.net.encode_identity(refs, ref_boxes, dtype=self.dtype, **options)

    def notice(self) -> str:
        """What every surface tells its user about the weights."""
        return "weights: built in code" if self.source is None else self.source.notice()

    def record(self) -> dict | None:
        return None if self.source is None else self.source.record()


def load_model(
    path: str | Path | WeightsSource | None = None,
    device: str | torch.device | None = None,
    precision: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a checkpoint (found by :func:`find_weights` when ``path`` is None) for inference.

    ``device`` and ``precision`` (the compute precision of :meth:`DMDNet.restore`, by autocast)
    default to :mod:`runtime`'s rule: CUDA when available; fp16 on CUDA, bf16 or fp32 on CPU. The
    weights stay float32, so fingerprints and identity dictionaries do not depend on the
    precision.
    """
    source = find_weights(path)
    state, config = read_state_dict(source.path)
    net = build_model(state, config, source=str(source.path))
    device = pick_device(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    return LoadedModel(net.to(device).eval(), pick_precision(precision, device), source)


def save_checkpoint(model: DMDNet, path: str | Path, half: bool = False) -> Path:
    """Write ``model`` as ``.safetensors`` with its configuration, atomically."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "config": json.dumps(model.config)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def convert(src: str | Path, dst: str | Path, half: bool = False) -> Path:
    """Any supported checkpoint -> our ``.safetensors`` (checked by a strict load first)."""
    state, config = read_state_dict(src)
    return save_checkpoint(build_model(state, config, source=str(src)), dst, half=half)
