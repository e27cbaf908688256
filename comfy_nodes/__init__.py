"""DMDNet custom nodes for ComfyUI (see nodes_dmdnet.py)."""
from .nodes_dmdnet import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
