"""DMDNet as an ONNX face enhancer: one file for onnxruntime (CPU, CUDA, TensorRT, DirectML, CoreML),
OpenVINO, and the enhancer slots of face-swap tools.

The file takes what GFPGAN's and GPEN's ONNX files take: ``input`` (N, 3, 512, 512) float32 RGB in
[-1, 1], a face aligned to the FFHQ 5-point template, and gives ``output`` the same way. The component
boxes are the template's (the pipeline's own fallback for faces without trustworthy landmarks); they
broadcast over the batch, so the exporter folds them, with the crop and paste matrices, into
constants. ``boxes_input=True`` adds a second input ``boxes`` (N, 4, 4) int64, the boxes of
:func:`~dmdnet_plugin.components.boxes_from_landmarks`, for callers that have landmarks. With an
identity dictionary the person's atoms are constants too, and the file restores with them (the
authors' "specific" output).

Exported with torch.export (the TorchScript exporter is deprecated, and its traced shapes keep the
template's matrices from folding), at opset 17: the template file holds convolutions, matrix products,
softmax, resize and elementwise ops, and no data-dependent indexing.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import onnx
import onnx.version_converter
import onnxscript.optimizer
import torch
import torch.nn as nn

from .align import TEMPLATE_BOXES
from .atomic import atomic_path
from .components import CROP_SIZE, sanitize_boxes
from .identity import IdentityDictionary
from .layers import SNConv2d
from .model import DMDNet
from .version import VERSION

OPSET = 17  # DirectML runs opsets up to 17; torch.export's exporter writes 18, converted once folded
FOLD_LIMIT = 1 << 16
INPUT, BOXES, OUTPUT = "input", "boxes", "output"
CONVENTION = "RGB, NCHW float32 in [-1, 1], 512x512 faces aligned to the FFHQ 5-point template"


def plain_convs(net: DMDNet) -> DMDNet:
    """A copy of ``net`` whose spectrally normalised convs are plain convs holding their eval-mode weight,
    so that an exporter sees parameters, not the folding cache (which torch.export cannot trace)."""
    copied = copy.deepcopy(net).eval()
    with torch.no_grad():
        for module in list(copied.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, SNConv2d):
                    conv = nn.Conv2d(
                        child.in_channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        bias=child.bias is not None,
                    )
                    conv.weight.copy_(child.normalised_weight())
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                    setattr(module, name, conv)
    return copied


class Enhancer(nn.Module):
    """Faces in, restored faces out: the generic output, or with ``identity`` the person's.

    ``forward(image)`` uses the template boxes, held as one (1, 4, 4) set that the crops and pastes
    broadcast over the batch; ``forward(image, boxes)`` takes (N, 4, 4) boxes.
    """

    def __init__(self, net: DMDNet, identity: IdentityDictionary | None = None) -> None:
        super().__init__()
        if identity is not None:
            net.check_identity(identity)
        self.net = plain_convs(net)
        self.atoms = nn.Module()
        for key, atoms in (identity.tensors if identity is not None else {}).items():
            self.atoms.register_buffer(key, atoms.to(torch.float32, copy=True))
        self.register_buffer("template", torch.as_tensor(TEMPLATE_BOXES, dtype=torch.long)[None])

    def forward(self, image: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        boxes = sanitize_boxes(self.template if boxes is None else boxes)
        atoms = dict(self.atoms.named_buffers()) or None
        out = self.net(image, boxes, identity_atoms=atoms, generic=atoms is None)
        return out.generic if atoms is None else out.identity


def metadata(net: DMDNet, identity: IdentityDictionary | None, boxes_input: bool) -> dict[str, str]:
    """What the file holds, for whoever finds it in a models folder (onnxruntime's ``custom_metadata_map``)."""
    meta = {
        "dmdnet.input": CONVENTION,
        "dmdnet.boxes": "input 'boxes' (N, 4, 4) int64" if boxes_input else "FFHQ template",
        "dmdnet.config": json.dumps(net.config, sort_keys=True),
        "dmdnet.model_fingerprint": net.fingerprint(),
        "dmdnet.output": "identity" if identity is not None else "generic",
    }
    if identity is not None:
        meta["dmdnet.identity_sha256"] = identity.digest()
        if identity.name:
            meta["dmdnet.identity_name"] = identity.name
    return meta


def _graph(enhancer: Enhancer, boxes_input: bool) -> onnx.ModelProto:
    """The traced graph, with N dynamic, folded, at :data:`OPSET`."""
    batch = torch.export.Dim("N")
    example = (torch.zeros(2, 3, CROP_SIZE, CROP_SIZE),)  # 2: torch.export specialises a dimension of size 1
    if boxes_input:
        example += (enhancer.template.repeat(2, 1, 1),)
    inputs = [INPUT, BOXES][: len(example)]
    with torch.no_grad(), warnings.catch_warnings():
        # the two inputs share N on purpose; torch notes that it keeps one name for it
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            enhancer,
            example,
            dynamo=True,
            opset_version=OPSET + 1,
            input_names=inputs,
            output_names=[OUTPUT],
            dynamic_shapes=tuple({0: batch} for _ in example),
            optimize=False,
            verbose=False,
        )
    # fold the template's crop and paste matrices (up to 1x256x55; the default limit stops at 8192 values)
    onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_LIMIT)
    for node in program.model.graph:
        # ReduceMean-17 has no such attribute and onnx's converter keeps it; 0 is its default
        attribute = node.attributes.get("noop_with_empty_axes")
        if node.op_type == "ReduceMean" and attribute is not None and attribute.as_int() == 0:
            del node.attributes["noop_with_empty_axes"]
    return onnx.version_converter.convert_version(program.model_proto, OPSET)


def export_onnx(
    net: DMDNet, path: str | Path, identity: IdentityDictionary | None = None, boxes_input: bool = False
) -> Path:
    """Write ``net`` (with ``identity`` folded in) as an ONNX face enhancer at ``path``, atomically.

    The batch size N is dynamic. Weights and dictionaries are float32, as :meth:`DMDNet.restore` computes.
    """
    enhancer = Enhancer(net, identity).eval()
    path = Path(path)
    with atomic_path(path) as tmp:  # first: a folder that cannot be written fails before the long export
        model = _graph(enhancer, boxes_input)
        model.producer_name, model.producer_version = "dmdnet-plugin", VERSION
        onnx.helper.set_model_props(model, metadata(net, identity, boxes_input))
        onnx.save(model, str(tmp))
    return path
