"""Stand-in for comfy.model_management: a CPU device, and records of what nodes asked for."""

import torch

calls: list[tuple] = []
interrupted = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def module_size(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def free_memory(memory_required: int, device: torch.device) -> None:
    calls.append(("free_memory", memory_required, device))


def soft_empty_cache(force: bool = False) -> None:
    calls.append(("soft_empty_cache",))


def throw_exception_if_processing_interrupted() -> None:
    global interrupted
    if interrupted:
        interrupted = False
        raise InterruptProcessingException()
