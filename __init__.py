"""ComfyUI entry point when this repository is cloned into ComfyUI/custom_nodes/ (V3: comfy_entrypoint)."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # dmdnet_plugin importable without pip-installing this folder
    sys.path.insert(0, _here)

try:
    import folder_paths  # noqa: F401  (exists only inside ComfyUI)
except ImportError:  # imported by something else (pytest collecting the checkout): nothing to register
    __all__: list[str] = []
else:
    from .comfy_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
