"""DMDNet custom nodes for ComfyUI, on the V3 schema (see nodes_dmdnet.py)."""

from .nodes_dmdnet import NODES, comfy_entrypoint

__all__ = ["NODES", "comfy_entrypoint"]
