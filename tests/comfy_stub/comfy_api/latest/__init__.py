"""Stand-in for comfy_api.latest: the V3 node schema as far as custom nodes use it.

Checked against the real one (Comfy-Org/ComfyUI 0.3.64, comfy_api/latest/_io.py) for the names,
arguments and behaviour the pack relies on: ``execute`` is a classmethod called with the inputs as
keyword arguments (absent optional inputs are not passed), and it returns ``io.NodeOutput``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import io

__all__ = ["ComfyExtension", "io"]


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called once when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes this extension provides."""
