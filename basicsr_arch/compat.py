"""Fixes for BasicSR 1.4.2 so that training runs everywhere BasicSR is supposed to run.

- ``--auto_resume`` / ``resume_state`` map states to CUDA unconditionally, which crashes on
  CPU: states are mapped to the training device instead (and read with ``weights_only``).
- ``--launcher pytorch`` calls ``torch.cuda.set_device(rank % num_gpus)``, a division by zero
  without GPUs: CPU processes join a gloo process group instead.
(The third fix, DDP without CUDA device ids, is ``DMDNetModel.model_to_device``.)
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.distributed as dist
from basicsr import train as basicsr_train
from basicsr.utils import check_resume, scandir
from basicsr.utils import options as basicsr_options
from basicsr.utils.dist_util import init_dist as basicsr_init_dist


def load_resume_state(opt: dict):
    """BasicSR's resume-state lookup, mapped to the device the run trains on."""
    path = opt["path"].get("resume_state")
    if opt["auto_resume"]:
        state_dir = os.path.join("experiments", opt["name"], "training_states")
        if os.path.isdir(state_dir):
            states = [float(v.split(".state")[0]) for v in scandir(state_dir, suffix="state", recursive=False)]
            if states:
                path = os.path.join(state_dir, f"{max(states):.0f}.state")
                opt["path"]["resume_state"] = path
    if path is None:
        return None
    use_cuda = opt.get("num_gpu", 0) != 0 and torch.cuda.is_available()
    location = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"
    with torch.serialization.safe_globals([Counter]):  # BasicSR's LR schedulers keep a Counter
        state = torch.load(path, map_location=location, weights_only=True)
    check_resume(opt, state["iter"])
    return state


def init_dist(launcher: str, backend: str = "nccl", **kwargs) -> None:
    if launcher == "pytorch" and not torch.cuda.is_available():
        dist.init_process_group(backend="gloo", **kwargs)
    else:
        basicsr_init_dist(launcher, backend, **kwargs)


def apply() -> None:
    basicsr_train.load_resume_state = load_resume_state
    basicsr_options.init_dist = init_dist
