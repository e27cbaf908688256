"""Training data for DMDNet: aligned HQ faces degraded on the fly, with boxes and references.

Two layouts are read, and can be mixed in one list of roots (``dataroots``):
- identity folders, ``root/<identity>/*.png`` (CelebRef-HQ): each sample also gets
  ``num_refs`` other photos of the same identity, so the identity branch trains;
- plain folders, ``root/*.png`` (FFHQ): generic samples without references.

Component boxes come from 68-point landmarks: ``NAME.png.txt`` beside each image (written by
``dmdnet landmarks``) or in ``landmarks_root`` mirroring the data (the authors' layout). Faces
without landmarks use the template boxes.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from basicsr.data import degradations
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from dmdnet_plugin.align import TEMPLATE_BOXES, matrix_scale, transform_points
from dmdnet_plugin.components import CROP_SIZE, boxes_from_landmarks
from dmdnet_plugin.faces import landmark_path, read_landmarks
from dmdnet_plugin.io import IMAGE_EXTENSIONS

from .option_checks import (
    FLAG,
    TEXT,
    OptionError,
    Rule,
    check_options,
    existing_folder,
    list_of,
    number,
    one_of,
    value_range,
)

EYE_SWAP = [1, 0, 2, 3]  # a mirrored face's left eye is the original's right eye
KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
LAYOUTS = ("auto", "identities", "plain", "person")
ROOT_RULES = {"path": existing_folder(), "landmarks_root": existing_folder(), "layout": one_of(*LAYOUTS)}
OPTION_RULES = {
    # BasicSR's own dataset and data-loader keys
    "name": TEXT,
    "type": TEXT,
    "phase": TEXT,
    "scale": number(1, 16, integer=True),
    "num_worker_per_gpu": number(0, 64, integer=True),
    "batch_size_per_gpu": number(1, 4096, integer=True),
    "dataset_enlarge_ratio": number(1, integer=True),
    "prefetch_mode": one_of("cpu", "cuda"),
    "pin_memory": FLAG,
    "persistent_workers": FLAG,
    "num_prefetch_queue": number(1, integer=True),
    "use_shuffle": FLAG,
    # this dataset's
    "dataroot_gt": existing_folder(),
    "landmarks_root": existing_folder(),
    "dataroots": Rule(
        "a list of folders or of {path, landmarks_root, layout} entries",
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, (str, dict)) for x in v),
    ),
    "num_refs": number(0, 64, integer=True),
    "use_hflip": FLAG,
    "deterministic": FLAG,
    "include_identities": list_of(TEXT),
    "exclude_identities": list_of(TEXT),
    "blur_kernel_size": Rule(
        "an odd integer from 3 to 101", lambda v: number(3, 101, integer=True).accepts(v) and v % 2 == 1
    ),
    "kernel_list": list_of(one_of(*KERNELS)),
    "kernel_prob": list_of(number(0, 1)),
    "blur_sigma": value_range(0, 100),
    "downsample_range": value_range(0.25, 64),
    "noise_range": value_range(0, 255),
    "jpeg_range": value_range(1, 100),
    "color_jitter_prob": number(0, 1),
    "color_jitter_shift": number(0, 255),
    "gray_prob": number(0, 1),
    "warp_prob": number(0, 1),
    "self_ref_prob": number(0, 1),
}
# Largest random similarity warp: shift in px, scale change, rotation in degrees. Real crops are
# never aligned exactly; a few hundred faces seen at slightly different places, sizes and angles
# teach the model less of each face by heart (it restored training people 1.3 dB above their
# input and held-out people only 0.7 dB above, docs/training_demo.md).
WARP_LIMITS = (12.0, 0.05, 5.0)


def check_dataset_options(opt: dict) -> None:
    """Every key known, typed and in range, every folder present: a bad yml fails at once, by name."""
    where = f"datasets.{opt.get('phase', '?')}"
    check_options(where, opt, OPTION_RULES)
    if not opt.get("dataroots") and not opt.get("dataroot_gt"):
        raise OptionError(f"{where}: set dataroots (a list of folders) or dataroot_gt (one folder)")
    for i, entry in enumerate(opt.get("dataroots") or []):
        if isinstance(entry, str):
            if not existing_folder().accepts(entry):
                raise OptionError(f"{where}.dataroots[{i}]: got {entry!r}, expected an existing folder")
            continue
        check_options(f"{where}.dataroots[{i}]", entry, ROOT_RULES)
        if "path" not in entry:
            raise OptionError(f"{where}.dataroots[{i}]: needs a path")
    kernels, probs = opt.get("kernel_list"), opt.get("kernel_prob")
    if kernels is not None and probs is not None and len(kernels) != len(probs):
        raise OptionError(
            f"{where}.kernel_prob: got {len(probs)} probabilities for {len(kernels)} kernels in kernel_list"
        )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 in [0, 1] -> 3xHxW in [-1, 1], as the network takes it."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) * 2 - 1


def load_face(path: Path, *landmark_files: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float32 RGB face at 512x512 in [0, 1] and its component boxes, from the first landmark file
    that exists (68 points in the image's pixels), else the template's."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"{path}: cannot read image")
    h, w = bgr.shape[:2]
    if (h, w) != (CROP_SIZE, CROP_SIZE):
        bgr = cv2.resize(bgr, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    found = next((f for f in landmark_files if f.is_file()), None)
    if found is None:
        return img, TEMPLATE_BOXES.copy()
    return img, boxes_from_landmarks(read_landmarks(found) * [CROP_SIZE / w, CROP_SIZE / h])


def flip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a face and its boxes; the eye boxes swap so that row 0 stays the left eye."""
    w = img.shape[1]
    flipped = boxes[EYE_SWAP].copy()
    flipped[:, [0, 2]] = w - boxes[EYE_SWAP][:, [2, 0]]
    return np.ascontiguousarray(img[:, ::-1]), flipped


def chance(p: float) -> bool:
    """True with probability ``p``; draws nothing at 0, so validation's seeded draws stay as they were."""
    return p > 0 and random.random() < p


def warp(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random similarity warp within ``WARP_LIMITS``; each box keeps its centre on the same
    feature and scales with the face (its corners are not rotated: the boxes stay upright)."""
    shift, scale, degrees = WARP_LIMITS
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), random.uniform(-degrees, degrees), 1 + random.uniform(-scale, scale))
    m[:, 2] += [random.uniform(-shift, shift), random.uniform(-shift, shift)]
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * matrix_scale(m)
    moved = transform_points(centres, m)
    return out, np.round(np.hstack((moved - half, moved + half))).astype(boxes.dtype)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of a float RGB image (BasicSR's helper hands OpenCV float pixels and a
    float quality, which OpenCV 4.x rejects)."""
    bgr = cv2.cvtColor(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    _, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


@DATASET_REGISTRY.register()
class DMDNetFaceDataset(data.Dataset):
    """Options (all degradation ranges live in the yml; defaults are GFPGAN's):

    dataroot_gt (one folder; BasicSR expands it) and landmarks_root (optional), or dataroots: a list
    of folders or of {path, landmarks_root, layout: auto | identities | plain | person}; num_refs (3), use_hflip (true),
    include_identities / exclude_identities (lists of folder names), blur_kernel_size (41),
    kernel_list, kernel_prob, blur_sigma, downsample_range, noise_range, jpeg_range,
    color_jitter_prob, color_jitter_shift, gray_prob, deterministic (false; true for validation),
    warp_prob (0: each face and reference gets a small random warp, ``WARP_LIMITS``),
    self_ref_prob (0: one reference, or all of them for a face without a person folder, is the
    target itself, warped, so the identity branch learns to read its references: otherwise it
    can follow the generic branch and lose nothing).
    """

    def __init__(self, opt: dict) -> None:
        super().__init__()
        check_dataset_options(opt)
        self.opt = opt
        roots = opt.get("dataroots") or [{"path": opt["dataroot_gt"], "landmarks_root": opt.get("landmarks_root")}]
        include, exclude = opt.get("include_identities"), set(opt.get("exclude_identities") or [])
        self.samples: list[tuple[Path, str | None, Path]] = []  # (image, identity, landmark file)
        self.by_identity: dict[str, list[int]] = {}
        for entry in roots:
            entry = {"path": entry} if isinstance(entry, str) else entry
            root = Path(entry["path"]).expanduser()
            lm_root = Path(entry["landmarks_root"]).expanduser() if entry.get("landmarks_root") else None
            layout = entry.get("layout", "auto")
            subdirs = sorted(d for d in root.iterdir() if d.is_dir())
            if layout == "person":  # the folder itself is one identity
                groups = [(root.name, _images(root))]
            elif layout == "identities" or (layout == "auto" and subdirs):
                groups = [(d.name, _images(d)) for d in subdirs]
            else:
                groups = [(None, _images(root))]
            for ident, images in groups:
                if ident is not None and (ident in exclude or (include is not None and ident not in include)):
                    continue
                key = None if ident is None else f"{root}/{ident}"
                for img in images:
                    if key is not None:
                        self.by_identity.setdefault(key, []).append(len(self.samples))
                    self.samples.append((img, key, landmark_path(img, root, lm_root)))
        if not self.samples:
            raise ValueError(f"no training images found in {roots}")
        self.num_refs = int(opt.get("num_refs", 3)) if self.by_identity else 0

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, _, lm_path = self.samples[index]
        return load_face(path, lm_path)

    def _augment(self, img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if chance(self.opt.get("warp_prob", 0.0)):
            img, boxes = warp(img, boxes)
        if self.opt.get("use_hflip", True) and random.random() < 0.5:
            return flip(img, boxes)
        return img, boxes

    def _references(self, index: int, gt: np.ndarray, boxes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``num_refs`` other photos of the target's person (none for a plain face), one of them
        (or all, for a plain face) replaced by the target under a warp at ``self_ref_prob``."""
        ident = self.samples[index][1]
        others = [i for i in self.by_identity.get(ident, []) if i != index] if ident else []
        chosen = (
            (
                random.sample(others, self.num_refs)
                if len(others) >= self.num_refs
                else random.choices(others, k=self.num_refs)
            )
            if others
            else []
        )
        refs = [self._augment(*self._load(i)) for i in chosen]
        if chance(self.opt.get("self_ref_prob", 0.0)):
            own = [warp(gt, boxes) for _ in range(1 if refs else self.num_refs)]
            refs = own + refs[len(own) :]
        return refs

    def degrade(self, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GFPGAN's blind degradation: blur, downsample, noise, JPEG, colour jitter, gray."""
        opt = self.opt
        kernel = degradations.random_mixed_kernels(
            opt.get("kernel_list", ["iso", "aniso"]),
            opt.get("kernel_prob", [0.5, 0.5]),
            opt.get("blur_kernel_size", 41),
            opt.get("blur_sigma", [0.1, 10]),
            opt.get("blur_sigma", [0.1, 10]),
            [-math.pi, math.pi],
            noise_range=None,
        )
        lq = cv2.filter2D(gt, -1, kernel)
        scale = np.random.uniform(*opt.get("downsample_range", [0.8, 8]))
        lq = cv2.resize(lq, (int(CROP_SIZE // scale), int(CROP_SIZE // scale)), interpolation=cv2.INTER_LINEAR)
        if opt.get("noise_range") is not None:
            lq = degradations.random_add_gaussian_noise(lq, opt["noise_range"])
        if opt.get("jpeg_range") is not None:
            lq = jpeg(lq, int(np.random.uniform(*opt["jpeg_range"])))
        lq = cv2.resize(lq, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
        if np.random.uniform() < opt.get("color_jitter_prob", 0.0):
            shift = opt.get("color_jitter_shift", 20) / 255.0
            lq = lq + np.random.uniform(-shift, shift, 3).astype(np.float32)
        if np.random.uniform() < opt.get("gray_prob", 0.0):  # both, so the net learns to keep gray gray
            lq = np.repeat(cv2.cvtColor(lq, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
            gt = np.repeat(cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        return np.clip(np.round(lq * 255) / 255, 0, 1).astype(np.float32), gt

    def __getitem__(self, index: int) -> dict:
        if self.opt.get("deterministic"):  # validation: the same degradation and references every time
            random.seed(index)
            np.random.seed(index)
        gt, boxes = self._augment(*self._load(index))
        lq, gt = self.degrade(gt)
        path = self.samples[index][0]
        item = {
            "lq": _tensor(lq),
            "gt": _tensor(gt),
            "boxes": torch.from_numpy(boxes).long(),
            "gt_path": str(path),
        }
        if self.num_refs:
            refs = self._references(index, gt, boxes)
            item["has_refs"] = torch.tensor(bool(refs))
            item["refs"] = (
                torch.stack([_tensor(r) for r, _ in refs])
                if refs
                else torch.zeros(self.num_refs, 3, CROP_SIZE, CROP_SIZE)
            )
            item["ref_boxes"] = (
                torch.from_numpy(np.stack([b for _, b in refs])).long()
                if refs
                else torch.from_numpy(np.stack([TEMPLATE_BOXES] * self.num_refs)).long()
            )
        return item


PAIRED_RULES = {
    **{
        k: OPTION_RULES[k]
        for k in (
            "name",
            "type",
            "phase",
            "scale",
            "num_worker_per_gpu",
            "batch_size_per_gpu",
            "prefetch_mode",
            "pin_memory",
            "landmarks_root",
            "num_refs",
        )
    },
    "io_backend": Rule("a mapping such as {type: disk}", lambda v: isinstance(v, dict)),  # BasicSR's; disk only
    "dataroot_lq": existing_folder(),
    "dataroot_gt": existing_folder(),
    "dataroot_refs": existing_folder(),
}


@DATASET_REGISTRY.register()
class DMDNetPairedDataset(data.Dataset):
    """A paired test set for ``basicsr_arch/test.py``: aligned low-quality faces, their ground truth
    and, optionally, references of each person.

    dataroot_lq and dataroot_gt hold the same relative paths (any image extension each);
    landmarks (68 points, ``NAME.ext.txt``) are read beside the low-quality face, under
    landmarks_root mirroring dataroot_lq, or beside the ground truth, else the template boxes are
    used. dataroot_refs (optional) holds a folder per person: ``<refs>/<lq's subfolder>/`` for a
    face in a subfolder, ``<refs>/<lq's stem>/`` for a face at the top; the first ``num_refs``
    (default 4) of its images in name order, never one named as the ground truth (a copy of it).
    """

    def __init__(self, opt: dict) -> None:
        super().__init__()
        where = f"datasets.{opt.get('phase', '?')}"
        check_options(where, opt, PAIRED_RULES)
        for key in ("dataroot_lq", "dataroot_gt"):
            if not opt.get(key):
                raise OptionError(
                    f"{where}.{key}: missing; a paired test set needs low-quality and ground-truth folders"
                )
        self.opt = opt
        self.lq_root, self.gt_root = Path(opt["dataroot_lq"]).expanduser(), Path(opt["dataroot_gt"]).expanduser()
        lm_root = Path(opt["landmarks_root"]).expanduser() if opt.get("landmarks_root") else None
        gts = {p.relative_to(self.gt_root).with_suffix(""): p for p in _images_under(self.gt_root)}
        self.pairs = []  # (lq, gt, landmark files, references)
        missing = []
        for lq in _images_under(self.lq_root):
            key = lq.relative_to(self.lq_root).with_suffix("")
            if key not in gts:
                missing.append(str(key))
                continue
            gt = gts[key]
            marks = (landmark_path(lq, self.lq_root, lm_root), landmark_path(gt, self.gt_root))
            self.pairs.append((lq, gt, marks, self._references(key, gt)))
        if missing:
            raise OptionError(f"{where}: no ground truth in {self.gt_root} for {len(missing)} faces ({missing[:3]})")
        if not self.pairs:
            raise OptionError(f"{where}: no images in {self.lq_root}")

    def _references(self, key: Path, gt: Path) -> list[Path]:
        if not self.opt.get("dataroot_refs"):
            return []
        person = Path(self.opt["dataroot_refs"]).expanduser() / (key.parts[0] if len(key.parts) > 1 else key.name)
        found = _images(person) if person.is_dir() else []
        return [p for p in found if p.stem != gt.stem][: int(self.opt.get("num_refs", 4))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lq_path, gt_path, marks, refs = self.pairs[index]
        lq, boxes = load_face(lq_path, *marks)
        gt, _ = load_face(gt_path)
        name = "_".join(lq_path.relative_to(self.lq_root).with_suffix("").parts)  # unique across subfolders
        item = {
            "lq": _tensor(lq),
            "gt": _tensor(gt),
            "boxes": torch.from_numpy(boxes).long(),
            "gt_path": str(gt_path),
            "name": name,
        }
        if refs:
            loaded = [load_face(r, landmark_path(r)) for r in refs]
            item["has_refs"] = torch.tensor(True)
            item["refs"] = torch.stack([_tensor(r) for r, _ in loaded])
            item["ref_boxes"] = torch.from_numpy(np.stack([b for _, b in loaded])).long()
        return item


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
