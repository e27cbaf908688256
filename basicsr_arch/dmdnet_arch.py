"""BasicSR registration of the networks: the DMDNet core itself and a component discriminator.

``network_g: {type: DMDNet, ...}`` builds :class:`dmdnet_plugin.model.DMDNet`, the very
class the CLI runs, so a trained checkpoint needs no conversion.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from basicsr.utils.registry import ARCH_REGISTRY

from dmdnet_plugin.model import DMDNet

ARCH_REGISTRY.register(DMDNet)


@ARCH_REGISTRY.register()
class DMDNetComponentDiscriminator(nn.Module):
    """Small patch discriminator for eye and mouth crops (GFPGAN's facial-component idea)."""

    def __init__(self, num_feat: int = 64) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        layers, cin = [], 3
        for i, cout in enumerate((num_feat, num_feat * 2, num_feat * 4, num_feat * 4)):
            layers += [sn(nn.Conv2d(cin, cout, 3, 2 if i else 1, 1)), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers, sn(nn.Conv2d(cin, 1, 3, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
