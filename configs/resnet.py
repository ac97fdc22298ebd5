"""ResNet experiments: `--config configs/resnet.py:<variant>[,runlocal]`.

Variants (each a registered model plus options):
    resnet18         ResNet-18, 'dual' attention (squeeze-excite then CBAM spatial) after layer4
    resnet34         the same on ResNet-34 (the third-party reading of the study)
    resnet50         the same on ResNet-50
    triple18         ResNet-18 with the triple head, each head with 'dual' attention
    plain18          ResNet-18 without attention (the ablation baseline; lists placement and
                     head so that the attention sweep can set them)
"""
from __future__ import annotations

import ml_collections

from configs.common import family_config
from her2jax.models.presets import DUAL_ATTENTION, TRIPLE_HEAD

VARIANTS = {
    "resnet18": ("resnet18", DUAL_ATTENTION),
    "resnet34": ("resnet34", DUAL_ATTENTION),
    "resnet50": ("resnet50", DUAL_ATTENTION),
    "triple18": ("resnet18", TRIPLE_HEAD),
    "plain18": ("resnet18", dict(DUAL_ATTENTION, attention="none")),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return family_config(arg, VARIANTS, "resnet18", set_model)


def set_model(config: ml_collections.ConfigDict, variant: str) -> None:
    name, kwargs = VARIANTS[variant]
    config.model.name = name
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
