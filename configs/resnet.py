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

from configs.common import apply_runlocal, base_config, parse_arg
from her2jax.errors import InvalidSetting

DUAL = {"attention": "dual", "placement": "last", "head": "single", "dropout": 0.5}
VARIANTS = {
    "resnet18": ("resnet18", DUAL),
    "resnet34": ("resnet34", DUAL),
    "resnet50": ("resnet50", DUAL),
    "triple18": ("resnet18", dict(DUAL, head="triple", head_combine="mean")),
    "plain18": ("resnet18", {"attention": "none", "placement": "last", "head": "single",
                             "dropout": 0.5}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, flags = parse_arg(arg)
    variant = variant or "resnet18"
    if variant not in VARIANTS:
        raise InvalidSetting(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    config = base_config()
    name, kwargs = VARIANTS[variant]
    config.model.name = name
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    if "runlocal" in flags:
        apply_runlocal(config)
    return config
