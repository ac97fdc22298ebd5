"""ViT experiments: `--config configs/vit.py:<variant>[,runlocal]`.

Variants: tiny16, small16, base16 (patch 16), small32 (patch 32); class-token pooling, dropout
0.1 on the head input, stochastic depth 0.1; AdamW at a lower peak learning rate than ResNets.
tiny4: ViT-Ti with 4-pixel patches and 6 blocks, for small crops (the synthetic demo at 32 px).
cvt13: CvT-13 (convolutional token embeddings and projections, any image size), dropout 0.1 on
the head input, stochastic depth 0.1 in its last stage, the same optimizer.
swin_tiny: Swin-T (shifted 7x7 windows laid out for 224-pixel images; other multiples of 4 are
taken), dropout 0.1 on the head input, stochastic depth rising to 0.1 over its blocks, the same
optimizer.
"""
from __future__ import annotations

import ml_collections

from configs.common import family_config

VARIANTS = {"tiny16": "vit_tiny_patch16", "small16": "vit_small_patch16",
            "base16": "vit_base_patch16", "small32": "vit_small_patch32",
            "tiny4": "vit_tiny_patch4", "cvt13": "cvt13",
            "swin_tiny": "swin_tiny_patch4_window7"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return family_config(arg, VARIANTS, "small16", set_model)


def set_model(config: ml_collections.ConfigDict, variant: str) -> None:
    config.model.name = VARIANTS[variant]
    config.optimizer.learning_rate = 3e-4
    if variant in ("cvt13", "swin_tiny"):
        config.model.kwargs = ml_collections.ConfigDict({"dropout": 0.1, "drop_path": 0.1})
        return
    # image_size is set from the dataset at run time (position embeddings follow it)
    # attention_kernel: 'auto' (cuDNN's fused attention on NVIDIA GPUs in bfloat16, the written-out
    # 'xla' elsewhere), 'xla' or 'cudnn': the same function, so runs and checkpoints move freely
    # between them
    config.model.kwargs = ml_collections.ConfigDict({"pool": "token", "dropout": 0.1,
                                                     "drop_path": 0.1, "attention_kernel": "auto"})
    if variant == "tiny4":
        config.model.kwargs.depth = 6
