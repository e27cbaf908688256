"""BasicSR model that trains DMDNet: both branches supervised, GFPGAN-style losses.

The generic dictionaries are parameters (``network_g.trainable_dictionary: true``). Each face
brings its own references, whose identity dictionary is built inside the generator's forward
pass, so the reference encoder trains together with the rest. Losses, all optional in the yml:
L1, a pixel loss on the eye and mouth crops (where the dictionaries act), perceptual + style
(VGG19, BasicSR's local-weights convention), adversarial with a global and optional eye / mouth
discriminators, and an identity loss on a frozen embedding network.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.archs.vgg_arch import VGG_PRETRAIN_PATH
from basicsr.losses import build_loss
from basicsr.metrics import calculate_niqe, calculate_psnr, calculate_ssim
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DistributedDataParallel

from dmdnet_plugin.atomic import atomic_path
from dmdnet_plugin.components import COMPONENT_INDEX, PART_SIZES, crop_resize, sanitize_boxes
from dmdnet_plugin.weights import read_state_dict

from .option_checks import (
    FLAG,
    SECTION,
    TEXT,
    OptionError,
    Rule,
    check_options,
    existing_file,
    list_of,
    mapping,
    number,
    one_of,
)

# discriminator -> the components it judges; also the crop groups of the component loss
COMPONENT_DS = {"d_eye": ("le", "re"), "d_mouth": ("mo",)}
LOSS = Rule("a loss section with a type", lambda v: isinstance(v, dict) and isinstance(v.get("type"), str))
OPTIM_RULES = {
    "type": one_of("Adam", "AdamW", "Adamax", "SGD", "ASGD", "RMSprop", "Rprop"),
    "lr": number(1e-12, 1),
    "betas": list_of(number(0, 1)),
    "weight_decay": number(0),
    "eps": number(0),
    "amsgrad": FLAG,
    "momentum": number(0, 1),
}
SCHEDULER_RULES = {
    "type": one_of("MultiStepLR", "MultiStepRestartLR", "CosineAnnealingRestartLR"),
    "milestones": list_of(number(0, integer=True)),
    "gamma": number(0, 1),
    "restarts": list_of(number(0, integer=True)),
    "restart_weights": list_of(number(0)),
    "periods": list_of(number(1, integer=True)),
    "eta_min": number(0),
}
TRAIN_RULES = {
    "ema_decay": number(0, 1),
    "optim_g": SECTION,
    "optim_d": SECTION,
    "scheduler": SECTION,
    "total_iter": number(1, integer=True),
    "warmup_iter": number(-1, integer=True),
    "pixel_opt": LOSS,
    "component_opt": LOSS,
    "perceptual_opt": LOSS,
    "identity_opt": SECTION,
    "gan_opt": LOSS,
    "autocast": Rule("bf16, or nothing for fp32", lambda v: v in ("bf16", False)),
    "lr_mult": mapping(TEXT, number(1e-6, 1e6)),
}
NETWORK_RULES = {
    "type": one_of("DMDNet"),
    "ngf": number(4, 512, integer=True),
    "banks_num": number(1, 4096, integer=True),
    "trainable_dictionary": FLAG,
}


def check_model_options(opt: dict) -> None:
    """The parts of the yml this model reads: typed, in range, and no unknown (misspelt) keys."""
    check_options("network_g", opt.get("network_g"), NETWORK_RULES)
    for key, value in (opt.get("path") or {}).items():
        if key.startswith("pretrain_network_") and value is not None:
            check_options("path", {key: value}, {key: existing_file()})
    if not opt.get("is_train", True):
        return
    train = opt.get("train")
    check_options("train", train, TRAIN_RULES)
    for name in ("optim_g", "optim_d"):
        if train.get(name) is not None:
            check_options(f"train.{name}", train[name], OPTIM_RULES)
            if "type" not in train[name] or "lr" not in train[name]:
                raise OptionError(f"train.{name}: needs a type and an lr")
    if train.get("scheduler") is not None:
        check_options("train.scheduler", train["scheduler"], SCHEDULER_RULES)
    if train.get("optim_g") is None:
        raise OptionError("train.optim_g: missing; DMDNet needs a generator optimiser (e.g. {type: Adam, lr: 2e-4})")


def lr_groups(net: torch.nn.Module, lr: float, lr_mult: dict[str, float]) -> list[dict]:
    """Parameter groups for ``train.lr_mult`` (``{name part: factor}``, the longest matching part
    wins), so that modules that start far behind, such as the identity branch's reference encoder,
    key/value heads and masks, can learn faster than a converged generic path."""
    parts = sorted(lr_mult, key=len, reverse=True)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    unused = [k for k in parts if not any(k in n for n, _ in named)]
    if unused:
        raise OptionError(f"train.lr_mult: {unused} match no trainable parameter of network_g")
    by_factor: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        factor = next((float(lr_mult[k]) for k in parts if k in name), 1.0)
        by_factor.setdefault(factor, []).append(param)
    return [{"params": ps, "lr": lr * f} for f, ps in by_factor.items()]


class IdentityLoss(torch.nn.Module):
    """L1 between embeddings of a frozen face-recognition net (e.g. an ArcFace) loaded from a file."""

    def __init__(self, network: dict, pretrained: str, loss_weight: float = 1.0, crop: int = 64, size: int = 128):
        super().__init__()
        if not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"identity loss: embedding weights {pretrained} not found "
                "(set train.identity_opt.pretrained, or remove identity_opt)"
            )
        self.net = build_network(network)
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state.get("params", state), strict=True)
        self.net.eval().requires_grad_(False)
        self.loss_weight, self.crop, self.size = loss_weight, crop, size

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop
        x = torch.nn.functional.interpolate(
            x[:, :, c:-c, c:-c], (self.size, self.size), mode="bilinear", align_corners=False
        )
        return self.net(x).flatten(1)

    def forward(self, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * torch.nn.functional.l1_loss(self._embed(out), self._embed(gt).detach())


def _niqe(img: np.ndarray) -> float:
    """NIQE, or NaN where it is undefined (a flat image, e.g. from an untrained net)."""
    try:
        return float(calculate_niqe(img, 0))
    except np.linalg.LinAlgError:
        return float("nan")


@MODEL_REGISTRY.register()
class DMDNetModel(BaseModel):
    def __init__(self, opt: dict) -> None:
        check_model_options(opt)
        super().__init__(opt)
        self.discriminators: dict[str, torch.nn.Module] = {}
        self.net_g = self.model_to_device(build_network(opt["network_g"]))
        self.print_network(self.net_g)
        self._load_pretrained(self.net_g, "g", "params")
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ setup
    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        """BasicSR's, except that CPU processes (gloo) get DDP without CUDA device ids."""
        if self.opt["dist"] and self.device.type == "cpu":
            return DistributedDataParallel(
                net.to(self.device), find_unused_parameters=self.opt.get("find_unused_parameters", False)
            )
        return super().model_to_device(net)

    def _load_pretrained(self, net: torch.nn.Module, label: str, param_key: str) -> None:
        path = self.opt["path"].get(f"pretrain_network_{label}")
        if path is None:
            return
        strict = self.opt["path"].get(f"strict_load_{label}", True)
        explicit_key = f"param_key_{label}" in self.opt["path"]
        # BasicSR reads only its own .pth; ours reads the bundled .safetensors, and for testing any file that
        # `dmdnet restore --weights` takes (the authors' plain DMDNet.pth; a BasicSR checkpoint's params_ema)
        if str(path).endswith(".safetensors") or (not self.is_train and not explicit_key):
            state, _ = read_state_dict(path)
            get_root_logger().info(f"Loading {type(self.get_bare_model(net)).__name__} weights from {path}.")
            self.get_bare_model(net).load_state_dict({k: v.float() for k, v in state.items()}, strict=strict)
            return
        self.load_network(net, path, strict, self.opt["path"].get(f"param_key_{label}", param_key))

    def init_training_settings(self) -> None:
        train_opt = self.opt["train"]
        self.net_g.train()
        self.ema_decay = train_opt.get("ema_decay", 0)
        if self.ema_decay > 0:
            self.net_g_ema = build_network(self.opt["network_g"]).to(self.device).eval()
            if self.opt["path"].get("pretrain_network_g"):
                self._load_pretrained(self.net_g_ema, "g", "params_ema")
            else:
                self.model_ema(0)
        self.cri_pix = build_loss(train_opt["pixel_opt"]).to(self.device) if train_opt.get("pixel_opt") else None
        self.cri_component = (
            build_loss(train_opt["component_opt"]).to(self.device) if train_opt.get("component_opt") else None
        )
        self.cri_perceptual = None
        if train_opt.get("perceptual_opt"):
            if not os.path.exists(VGG_PRETRAIN_PATH):
                raise FileNotFoundError(
                    f"perceptual loss needs the VGG19 weights at {os.path.abspath(VGG_PRETRAIN_PATH)} "
                    "(torchvision's vgg19-dcbb9e9d.pth); put them there or remove train.perceptual_opt"
                )
            self.cri_perceptual = build_loss(train_opt["perceptual_opt"]).to(self.device)
        self.cri_identity = (
            IdentityLoss(**train_opt["identity_opt"]).to(self.device) if train_opt.get("identity_opt") else None
        )
        if train_opt.get("gan_opt"):
            self.cri_gan = build_loss(train_opt["gan_opt"]).to(self.device)
            for label in ("d", *COMPONENT_DS):
                if self.opt.get(f"network_{label}"):
                    net = self.model_to_device(build_network(self.opt[f"network_{label}"]))
                    self._load_pretrained(net, label, "params")
                    setattr(self, f"net_{label}", net.train())
                    self.discriminators[label] = net
        self.setup_optimizers()
        self.setup_schedulers()

    def setup_optimizers(self) -> None:
        train_opt = self.opt["train"]
        opt_g = dict(train_opt["optim_g"])
        groups = lr_groups(self.net_g, opt_g["lr"], train_opt.get("lr_mult") or {})
        self.optimizer_g = self.get_optimizer(opt_g.pop("type"), groups, **opt_g)
        self.optimizers.append(self.optimizer_g)
        if self.discriminators:
            opt_d = dict(train_opt["optim_d"])
            params = [p for d in self.discriminators.values() for p in d.parameters()]
            self.optimizer_d = self.get_optimizer(opt_d.pop("type"), params, **opt_d)
            self.optimizers.append(self.optimizer_d)

    def model_ema(self, decay: float = 0.999) -> None:
        """BasicSR averages parameters only; the spectral-norm vectors u, v are buffers and must
        follow the live net, or the EMA net's sigma = u.(W v) is computed from unrelated vectors."""
        super().model_ema(decay)
        with torch.no_grad():
            for ema_buf, buf in zip(self.net_g_ema.buffers(), self.get_bare_model(self.net_g).buffers()):
                ema_buf.copy_(buf)

    # --------------------------------------------------------------- training
    def feed_data(self, data: dict) -> None:
        cl = torch.channels_last  # about 1.6x faster conv backward on CPU, and the fast layout on GPU
        self.lq = data["lq"].to(self.device, memory_format=cl)
        self.gt = data["gt"].to(self.device, memory_format=cl)
        self.boxes = sanitize_boxes(data["boxes"].to(self.device))
        # A batch of plain faces only (no identity folder) skips the reference encoder altogether.
        with_refs = "refs" in data and bool(data.get("has_refs", torch.ones(1, dtype=torch.bool)).any())
        self.refs = data["refs"].to(self.device) if with_refs else None
        self.ref_boxes = sanitize_boxes(data["ref_boxes"].to(self.device)) if with_refs else None
        self.has_refs = data["has_refs"].to(self.device) if with_refs and "has_refs" in data else None

    @staticmethod
    def _component_crops(img: torch.Tensor, boxes: torch.Tensor, components: tuple[str, ...]) -> torch.Tensor:
        """Crops of same-sized components (both eyes, right ones mirrored to look like left ones;
        or the mouth), batched, at crop pixels."""
        crops = []
        for comp in components:
            crop = crop_resize(img, boxes[:, COMPONENT_INDEX[comp]], 1, PART_SIZES[comp])
            crops.append(crop.flip(3) if comp == "re" else crop)
        return torch.cat(crops)

    @classmethod
    def _component_loss(
        cls, criterion: torch.nn.Module, out: torch.Tensor, gt: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """``criterion`` on the eye crops plus on the mouth crops: 11% of the crop, where the
        dictionaries act, which a loss over the whole crop gives little weight."""
        return sum(
            criterion(cls._component_crops(out, boxes, parts), cls._component_crops(gt, boxes, parts))
            for parts in COMPONENT_DS.values()
        )

    def _judge(self, label: str, img: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        net = self.discriminators[label]
        return net(img if label == "d" else self._component_crops(img, boxes, COMPONENT_DS[label]))

    def _outputs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Branch -> (output, ground truth, boxes); the identity branch only for faces with references."""
        out = self.net_g(self.lq, self.boxes, generic=True, refs=self.refs, ref_boxes=self.ref_boxes)
        outs = {"generic": (out.generic, self.gt, self.boxes)}
        if out.identity is not None:
            keep = self.has_refs if self.has_refs is not None else torch.ones_like(self.gt[:, 0, 0, 0], dtype=bool)
            outs["identity"] = (out.identity[keep], self.gt[keep], self.boxes[keep])
        return outs

    def _autocast(self) -> torch.autocast:
        """``train.autocast: bf16`` runs forward passes and losses in bfloat16 (weights, optimiser
        states and the dictionary softmax stay fp32); bf16 needs no loss scaling."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.opt["train"].get("autocast") == "bf16"
        )

    def _generator_losses(self) -> OrderedDict:
        """Every generator loss term, per branch, named ``<term>_<branch>``."""
        self.outputs = self._outputs()
        losses = OrderedDict()
        for branch, (out, gt, boxes) in self.outputs.items():
            if out.shape[0] == 0:
                continue
            terms = {}
            if self.cri_pix:
                terms["l_pix"] = self.cri_pix(out, gt)
            if self.cri_component:
                terms["l_component"] = self._component_loss(self.cri_component, out, gt, boxes)
            if self.cri_perceptual:
                percep, style = self.cri_perceptual(out, gt)
                terms.update({k: v for k, v in (("l_percep", percep), ("l_style", style)) if v is not None})
            if self.cri_identity:
                terms["l_identity"] = self.cri_identity(out, gt)
            for label in self.discriminators:
                terms[f"l_g_gan_{label}"] = self.cri_gan(self._judge(label, out, boxes), True, is_disc=False)
            losses.update((f"{name}_{branch}", value) for name, value in terms.items())
        return losses

    def _discriminator_losses(self) -> OrderedDict:
        """Real and fake losses of every discriminator on this step's (detached) outputs."""
        fake = torch.cat([out.detach() for out, _, _ in self.outputs.values()])
        fake_boxes = torch.cat([boxes for _, _, boxes in self.outputs.values()])
        losses = OrderedDict()
        for label in self.discriminators:
            losses[f"l_{label}_real"] = self.cri_gan(self._judge(label, self.gt, self.boxes), True, is_disc=True)
            losses[f"l_{label}_fake"] = self.cri_gan(self._judge(label, fake, fake_boxes), False, is_disc=True)
        return losses

    def _step(self, optimizer: torch.optim.Optimizer, compute: Callable[[], OrderedDict]) -> OrderedDict:
        """One optimiser step: losses under autocast, backward outside it (as torch.amp advises)."""
        optimizer.zero_grad()
        with self._autocast():
            losses = compute()
        sum(losses.values()).backward()
        optimizer.step()
        return losses

    def optimize_parameters(self, current_iter: int) -> None:
        for d in self.discriminators.values():
            d.requires_grad_(False)
        losses = self._step(self.optimizer_g, self._generator_losses)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        if self.discriminators:
            for d in self.discriminators.values():
                d.requires_grad_(True)
            losses.update(self._step(self.optimizer_d, self._discriminator_losses))
        self.log_dict = self.reduce_loss_dict(losses)

    # ------------------------------------------------------------- validation
    def validation(self, dataloader, current_iter, tb_logger, save_img=False) -> None:
        if self.opt["rank"] == 0:  # one process validates; the others wait at the next step's sync
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        net = self.net_g_ema if getattr(self, "net_g_ema", None) is not None else self.get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        name = dataloader.dataset.opt["name"]
        sums: dict[str, float] = {}
        count = 0
        for data in dataloader:
            self.feed_data(data)
            with torch.no_grad():
                outputs = net(self.lq, self.boxes, generic=True, refs=self.refs, ref_boxes=self.ref_boxes)
            gt_imgs = tensor2img(list(self.gt), min_max=(-1, 1))
            branches = [branch for branch, out in outputs._asdict().items() if out is not None]
            for i, gt_img in enumerate(gt_imgs if isinstance(gt_imgs, list) else [gt_imgs]):
                panels = [tensor2img(self.lq[i], min_max=(-1, 1))]
                for branch, out in outputs._asdict().items():
                    if out is None:
                        continue
                    img = tensor2img(out[i], min_max=(-1, 1))
                    panels.append(img)
                    for metric, value in (
                        ("psnr", calculate_psnr(img, gt_img, 0)),
                        ("ssim", calculate_ssim(img, gt_img, 0)),
                        ("niqe", _niqe(img)),
                    ):
                        sums[f"{metric}_{branch}"] = sums.get(f"{metric}_{branch}", 0.0) + float(value)
                lq_img = panels[0]
                for metric, value in (
                    ("psnr", calculate_psnr(lq_img, gt_img, 0)),
                    ("ssim", calculate_ssim(lq_img, gt_img, 0)),
                ):
                    sums[f"{metric}_input"] = sums.get(f"{metric}_input", 0.0) + float(value)
                count += 1
                if save_img:
                    stem = data["name"][i] if "name" in data else Path(data["gt_path"][i]).stem
                    # input | generic | identity | ground truth; testing also writes each output alone
                    # (<face>_generic.png, <face>_identity.png) for other metrics tools, as BasicSR's test does
                    alone = {} if self.is_train else dict(zip(branches, panels[1:]))
                    for suffix, img in {str(current_iter): np.hstack(panels + [gt_img]), **alone}.items():
                        path = Path(self.opt["path"]["visualization"]) / name / f"{stem}_{suffix}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(path) as tmp:
                            cv2.imwrite(str(tmp), img)
        net.train(was_training)
        self.metric_results = {k: v / max(count, 1) for k, v in sums.items()}
        logger = get_root_logger()
        logger.info(
            f"Validation {name} @ {current_iter}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.metric_results.items())
        )
        if tb_logger:
            for k, v in self.metric_results.items():
                tb_logger.add_scalar(f"metrics/{name}/{k}", v, current_iter)

    # ------------------------------------------------------------------ saving
    def save(self, epoch: int, current_iter: int) -> None:
        """net_g_<iter>.pth holds params, params_ema and the config, so load_model needs no flags."""
        bare = self.get_bare_model(self.net_g)
        ema = getattr(self, "net_g_ema", None)
        label = "latest" if current_iter == -1 else current_iter
        state = {
            "params": {k: v.cpu() for k, v in bare.state_dict().items()},
            "params_ema": {k: v.cpu() for k, v in (ema or bare).state_dict().items()},
            "config": dict(bare.config),
        }
        path = Path(self.opt["path"]["models"]) / f"net_g_{label}.pth"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for d_label, net in self.discriminators.items():
            self.save_network(net, f"net_{d_label}", current_iter)
        self.save_training_state(epoch, current_iter)
