"""The README's and docs/cli.md's commands run as written, and docs/cli.md names every option.

Each line of their ``bash`` blocks runs in a folder that holds the files it names (made from the
examples), with the `dmdnet` console script and small test weights. The commands a test cannot run
(the network, servers, the suite itself) are listed with the reason, so a new one cannot hide.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import DATA, small_net

from dmdnet_plugin.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PAGES = ("README.md", "docs/cli.md")
NOT_RUN = {  # the start of a command -> why a test does not run it
    "make demo": "the whole demo: CI runs it, and tests/test_demo_checkpoint.py its model",
    "make test": "this suite",
    "make gradio": "a server that runs until stopped (tests/test_gradio.py starts one)",
    "git clone": "needs the network",
    "pip install": "needs the network",
    "dmdnet weights download": "needs the network (tests/test_downloads.py serves it on 127.0.0.1)",
}


def commands() -> list[str]:
    """Every command line of the pages' bash blocks, in order, without comments."""
    lines = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
            lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("#")]


def workspace(folder: Path) -> None:
    """The files the commands name, from the examples and the test photos."""
    (folder / "photos").mkdir()
    for photo in (EXAMPLES / "photos").glob("*.jpg"):
        shutil.copy(photo, folder / "photos" / photo.name)
    shutil.copy(DATA / "photos" / "family.jpg", folder / "old_scan.jpg")
    for clip in ("wedding.mp4", "clip.mp4"):
        shutil.copy(EXAMPLES / "video" / "obama_jitter.mp4", folder / clip)
    refs = sorted((EXAMPLES / "refs" / "obama").glob("*.jpg"))
    shutil.copytree(EXAMPLES / "refs" / "obama", folder / "grandma")
    shutil.copy(refs[0], folder / "grandma_1990.jpg")
    subprocess.run([sys.executable, "-c", _TO_PNG, str(refs[1]), str(folder / "grandma_wedding.png")], check=True)
    (folder / "family_album").mkdir()
    shutil.copy(EXAMPLES / "photos" / "family.jpg", folder / "family_album" / "family.jpg")
    (folder / "raw_photos").mkdir()
    for photo in (DATA / "lq").glob("*.jpg"):
        shutil.copy(photo, folder / "raw_photos" / photo.name)
    torch.save(small_net().state_dict(), folder / "DMDNet.pth")  # a plain state dict, as the authors' file is


_TO_PNG = "import sys, cv2; cv2.imwrite(sys.argv[2], cv2.imread(sys.argv[1]))"


def test_every_offline_command_of_the_docs_runs_as_written(tmp_path, small_weights):
    work = tmp_path / "work"
    work.mkdir()
    workspace(work)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DMDNET_WEIGHTS": str(small_weights),  # small and fast; the commands are the same
        "DMDNET_CACHE": str(tmp_path / "cache"),
    }
    skipped = set()
    lines = commands()
    assert any(line.startswith("dmdnet restore") for line in lines)
    for line in lines:
        reason = next((why for start, why in NOT_RUN.items() if line.startswith(start)), None)
        if reason:
            skipped.add(next(start for start in NOT_RUN if line.startswith(start)))
            continue
        run = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"{line}\n{run.stderr[-3000:]}"
    assert skipped == set(NOT_RUN), "a command listed as not run is no longer in the docs"
    assert sorted(p.name for p in (work / "restored").iterdir()) == [
        "clip.mp4",
        "family.jpg",
        "obama_lowres.jpg",
        "old_scan.jpg",
        "wedding.mp4",
    ]
    assert (work / "DMDNet.safetensors").is_file() and list((work / "datasets" / "faces").glob("*.png"))


def test_docs_name_every_option_of_every_command():
    """An option in `dmdnet ... --help` that docs/cli.md does not name is an option nobody can find."""
    page = (ROOT / "docs" / "cli.md").read_text()
    missing = []

    def visit(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    visit(child, f"{name} {sub}".strip())
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and f"`{option}" not in page:
                    missing.append(f"{name} {option}")

    visit(build_parser(), "")
    assert not missing, missing
