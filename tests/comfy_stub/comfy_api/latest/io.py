"""Stand-in for comfy_api.latest.io: schema records, input/output types and NodeOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Input:
    """An input socket or widget: every keyword is kept, as the real classes keep theirs."""

    def __init__(self, id: str, optional: bool = False, tooltip: str | None = None, **options: Any) -> None:
        self.id, self.optional, self.tooltip, self.options = id, optional, tooltip, options
        self.io_type = type(self).io_type


class Output:
    def __init__(
        self,
        id: str | None = None,
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ) -> None:
        self.id, self.display_name, self.tooltip = id, display_name, tooltip
        self.io_type = type(self).io_type


def _comfy_type(io_type: str, widget: bool) -> type:
    attrs = {"io_type": io_type, "is_widget": widget}
    return type(
        io_type,
        (),
        {"io_type": io_type, "Input": type("Input", (Input,), attrs), "Output": type("Output", (Output,), attrs)},
    )


Image = _comfy_type("IMAGE", False)
Mask = _comfy_type("MASK", False)
Int = _comfy_type("INT", True)
Float = _comfy_type("FLOAT", True)
Boolean = _comfy_type("BOOLEAN", True)
String = _comfy_type("STRING", True)
Combo = _comfy_type("COMBO", True)


def Custom(io_type: str) -> type:
    return _comfy_type(io_type, False)


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False

    def __post_init__(self) -> None:
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs if o.id]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.node_id}: input and output ids must be unique")


class NodeOutput:
    def __init__(self, *args: Any, ui: dict | None = None) -> None:
        self.args, self.ui = args, ui

    @property
    def result(self) -> tuple | None:
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError
