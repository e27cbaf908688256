"""ComfyUI entry point when this repository is cloned into ComfyUI/custom_nodes/."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # dmdnet_plugin importable without pip-installing this folder
    sys.path.insert(0, _here)

try:
    import folder_paths  # noqa: F401  (exists only inside ComfyUI)
except ImportError:  # imported by something else (pytest collecting the checkout): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
