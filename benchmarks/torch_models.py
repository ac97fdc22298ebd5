"""PyTorch counterparts of the her2jax models, for `benchmarks/torch_compare.py`.

    ResNets  torchvision's ResNet-18/50 with the 'dual' attention on the layer4 output (squeeze-
             excite with average pooling, reduction 16, then the CBAM 7x7 spatial gate), global
             average pool, dropout, linear: her2jax `resnet18/50(attention='dual',
             placement='last', head='single')`.
    ViTs     timm `vit_small_patch16_224` / `vit_base_patch16_224` with 2 classes and the image
             size: her2jax `vit_small_patch16` / `vit_base_patch16`.

Module names follow her2jax's parameter paths (`attention.channel.fc1`, `attention.spatial.conv`),
so `her2jax.models.resnet.from_torchvision` and `her2jax.models.vit.from_timm` convert a state dict
of these models one to one; `jax_arrays` does it for either family.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

RESNETS = {18: (tv_resnet.BasicBlock, (2, 2, 2, 2)), 50: (tv_resnet.Bottleneck, (3, 4, 6, 3))}
TIMM_VITS = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224"}


class ChannelAttention(nn.Module):
    """Squeeze-excite: y = x * sigmoid(fc2(relu(fc1(mean_hw(x))))), hidden max(C // r, 1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (N, C, H, W)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None].to(x.dtype)


class SpatialAttention(nn.Module):
    """CBAM spatial gate: y = x * sigmoid(conv7x7([mean_c(x), max_c(x)])), zero padding 3."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps)).to(x.dtype)


class DualAttention(nn.Module):
    """her2jax attention 'dual': squeeze-excite, then the CBAM spatial gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class DualAttentionResNet(torchvision.models.ResNet):
    """torchvision ResNet -> attention on layer4 -> global average pool -> dropout -> fc."""

    def __init__(self, depth: int, num_classes: int = 2, dropout: float = 0.5,
                 reduction: int = 16):
        block, layers = RESNETS[depth]
        super().__init__(block, list(layers), num_classes=num_classes)
        self.attention = DualAttention(512 * block.expansion, reduction)
        self.dropout = nn.Dropout(dropout)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.attention(x).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def resnet(depth: int, num_classes: int = 2, dropout: float = 0.5) -> DualAttentionResNet:
    return DualAttentionResNet(depth, num_classes=num_classes, dropout=dropout)


def vit(size: str, image_size: int, num_classes: int = 2, depth: int | None = None) -> nn.Module:
    """timm ViT-S/16 or ViT-B/16 for `image_size` inputs (no dropout or drop path, token pool)."""
    import timm

    extra = {} if depth is None else {"depth": depth}
    return timm.create_model(TIMM_VITS[size], pretrained=False, num_classes=num_classes,
                             img_size=image_size, **extra)


def jax_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    """The torch model's parameters and BatchNorm statistics as her2jax parameter paths."""
    from her2jax.models.resnet import from_torchvision
    from her2jax.models.vit import from_timm

    state = {key: value.detach().float().cpu().numpy() for key, value in net.state_dict().items()}
    return from_torchvision(state) if isinstance(net, DualAttentionResNet) else from_timm(state)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
