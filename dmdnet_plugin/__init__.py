"""DMDNet face restoration: one core for the CLI, BasicSR, ComfyUI and Gradio."""
from .components import boxes_from_landmarks
from .identity import IdentityDictionary, IdentityError
from .model import DMDNet
from .weights import WeightsError, convert, load_model

__all__ = [
    "DMDNet",
    "IdentityDictionary",
    "IdentityError",
    "WeightsError",
    "boxes_from_landmarks",
    "convert",
    "load_model",
]
__version__ = "0.2.0"
