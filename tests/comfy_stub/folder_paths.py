"""Stand-in for ComfyUI's folder_paths (only what custom nodes use): models under $COMFY_STUB_MODELS."""

import os

models_dir = os.environ.get("COMFY_STUB_MODELS", os.path.join(os.getcwd(), "models"))
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def get_input_directory() -> str:
    return os.environ.get("COMFY_STUB_INPUT", os.path.join(os.path.dirname(models_dir), "input"))


def get_folder_paths(name: str) -> list[str]:
    return folder_names_and_paths[name][0]


def get_filename_list(name: str) -> list[str]:
    folders, exts = folder_names_and_paths[name]
    return sorted(f for d in folders if os.path.isdir(d) for f in os.listdir(d) if os.path.splitext(f)[1] in exts)


def get_full_path(name: str, filename: str) -> str | None:
    for folder in folder_names_and_paths[name][0]:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def add_model_folder_path(name: str, path: str, is_default: bool = False) -> None:
    """As ComfyUI's: a new name gets an empty extension set; a default path moves to the front."""
    folders = folder_names_and_paths.setdefault(name, ([], set()))[0]
    if path in folders and is_default:
        folders.remove(path)
        folders.insert(0, path)
    elif path not in folders:
        folders.insert(0, path) if is_default else folders.append(path)
