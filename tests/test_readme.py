"""The README's Python examples run as written (with small test weights)."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import small_net

from dmdnet_plugin.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.setenv("DMDNET_WEIGHTS", str(save_checkpoint(small_net(), tmp_path / "w.safetensors")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["personal"].shape == (2, 3, 512, 512)
    assert (tmp_path / "grandma.safetensors").exists() and (tmp_path / "family_restored.jpg").exists()
    assert len(namespace["result"].faces) == 3
