"""DMDNet face restoration: one core for the CLI, BasicSR, ComfyUI and Gradio."""

from .components import boxes_from_landmarks
from .factory import load_restorer
from .identity import IdentityDictionary, IdentityError
from .model import DMDNet
from .pipeline import Mode, Restorer
from .version import VERSION
from .weights import LoadedModel, WeightsError, convert, load_model

__all__ = [
    "DMDNet",
    "IdentityDictionary",
    "IdentityError",
    "LoadedModel",
    "Mode",
    "Restorer",
    "WeightsError",
    "boxes_from_landmarks",
    "convert",
    "load_model",
    "load_restorer",
]
__version__ = VERSION
