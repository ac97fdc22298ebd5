"""The study's normalisation benchmark: every 8-bit strategy x {dual-attention ResNet-18,
ViT-S/16} x seeds, each strategy on its own prepared dataset, from ImageNet weights (the study's
premise: 8-bit RGB fed to ImageNet-pretrained networks).

    --sweep configs/sweeps/normalization.py[:SEEDS]     (default 3 seeds)

The runs load WEIGHTS_DIR/resnet18.safetensors and WEIGHTS_DIR/vit_small_patch16.safetensors
(`launch.sweep --weights_dir`, default weights/); `--set init.pretrained=` trains from scratch.
"""
from data_prep import normalization
from launch.spec import Sweep, axis, imagenet, product, seeds, zip_axes


def get_sweep(arg=None):
    strategies = normalization.names()
    data = {name: {"normalization": name} for name in strategies}
    runs = product(
        zip_axes(axis("config", ["configs/resnet.py:resnet18", "configs/vit.py:small16"]),
                 axis("init.pretrained", [imagenet("resnet18"), imagenet("vit_small_patch16")])),
        axis("data", strategies),
        seeds(int(arg or 3)))
    return Sweep("normalization", runs=runs, data=data, pivot=("data", "config"),
                 description="8-bit normalisation strategy x model",
                 pack=8)        # the seeds of a strategy and model train as one pack
