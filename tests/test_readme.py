"""The Python examples of the README and of docs/python_api.md run as written (with small test weights)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from conftest import small_net

from dmdnet_plugin.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    pages = "\n".join((ROOT / page).read_text() for page in ("README.md", "docs/python_api.md"))
    blocks = re.findall(r"```python\n(.*?)```", pages, flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.setenv("DMDNET_WEIGHTS", str(save_checkpoint(small_net(), tmp_path / "w.safetensors")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = tmp_path / "readme_examples.py"  # run as a file, in order, as a reader would paste them
    script.write_text("\n".join(blocks))
    namespace = runpy.run_path(str(script))
    assert namespace["personal"].shape == (2, 3, 512, 512)
    assert (tmp_path / "grandma.safetensors").exists() and (tmp_path / "family_restored.jpg").exists()
    assert len(namespace["result"].faces) == 3
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["family.jpg", "obama_lowres.jpg"]
