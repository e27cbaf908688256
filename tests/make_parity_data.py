"""Regenerate tests/data/parity_expected.npz and boxes_expected.json with the authors' code.

    python tests/make_parity_data.py /path/to/csxmli2016/DMDNet-checkout

The authors' code is run, never committed: it needs their checkout (and scipy, which
their model file imports). Their ``get_component_location`` lives in ``main_test.py``
beside a face_alignment import, so only that function is taken out with ``ast``.
"""

from __future__ import annotations

import ast
import json
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_inputs import DATA, load_parity_inputs  # noqa: E402
from seeded_weights import seeded_state_dict  # noqa: E402

from dmdnet_plugin import DMDNet  # noqa: E402


def authors_box_function(checkout: Path):
    """Their function alone, written to a module of its own with the imports it uses, and run from there."""
    source = (checkout / "main_test.py").read_text()
    func = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "get_component_location"
    )
    module = Path(tempfile.mkdtemp()) / "authors_boxes.py"
    module.write_text("import numpy as np\nimport torch\n\n\n" + ast.get_source_segment(source, func) + "\n")
    return runpy.run_path(str(module))["get_component_location"]


def main(checkout: Path) -> None:
    sys.path.insert(0, str(checkout))
    from models.DMDNet import DMDNet as AuthorsDMDNet

    get_location = authors_box_function(checkout)
    boxes = {
        str(p.relative_to(DATA / "landmarks")): get_location(str(p), re_read=True).int().tolist()
        for p in sorted((DATA / "landmarks").rglob("*.txt"))
    }
    (DATA / "boxes_expected.json").write_text(json.dumps(boxes, indent=0, sort_keys=True) + "\n")

    inputs = load_parity_inputs()
    theirs = AuthorsDMDNet()
    theirs.load_state_dict(seeded_state_dict(DMDNet()), strict=True)
    theirs.eval()
    with torch.no_grad():
        sp = theirs.generate_specific_dictionary(sp_imgs=inputs["refs"], sp_locs=inputs["ref_boxes"].float())
        generic, specific = theirs(
            lq=inputs["lq"], loc=inputs["lq_boxes"].float(), sp_256=sp[0], sp_128=sp[1], sp_64=sp[2]
        )
    np.savez_compressed(
        DATA / "parity_expected.npz",
        generic=generic[:, :, 1::4, 1::4].numpy(),
        specific=specific[:, :, 1::4, 1::4].numpy(),
    )
    print(f"wrote {len(boxes)} boxes and outputs {tuple(generic.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
