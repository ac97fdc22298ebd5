"""Architectures: ResNet depths against the transformers the study compared (ViT sizes, CvT-13,
Swin-T), ImageNet-pretrained against from scratch.

    --sweep configs/sweeps/architectures.py[:WEIGHTS_DIR]   (default: --weights_dir, weights/)

Pretrained runs read converted weights WEIGHTS_DIR/<model>.safetensors; convert them first,
e.g. `python -m her2jax.convert --source torchvision --arch resnet34 resnet34.pth
weights/resnet34.safetensors`; CvT-13 from HuggingFace (`--source hf-cvt --arch cvt13`), Swin-T
from timm (`--source timm-swin --arch swin_tiny_patch4_window7`). The launcher refuses to start
while a file is missing.
"""
from launch import spec
from launch.spec import Sweep, runs_of

MODELS = [("configs/resnet.py:resnet18", "resnet18"), ("configs/resnet.py:resnet34", "resnet34"),
          ("configs/resnet.py:resnet50", "resnet50"), ("configs/vit.py:tiny16", "vit_tiny_patch16"),
          ("configs/vit.py:small16", "vit_small_patch16"),
          ("configs/vit.py:base16", "vit_base_patch16"), ("configs/vit.py:cvt13", "cvt13"),
          ("configs/vit.py:swin_tiny", "swin_tiny_patch4_window7")]


def get_sweep(arg=None):
    points = []
    for config, model in MODELS:
        weights = f"{arg.rstrip('/')}/{model}.safetensors" if arg else spec.imagenet(model)
        for pretrained in ("", weights):
            points.append({"config": config, "init.pretrained": pretrained, "data": "q98"})
    runs = runs_of([dict(point, seed=seed) for point in points for seed in range(2)])
    return Sweep("architectures", runs=runs,
                 data={"q98": {"normalization": "per_channel_clip_q98"}},
                 pivot=("config", "init.pretrained"),
                 description="ResNet depths vs ViT sizes, CvT-13 and Swin-T, pretrained vs scratch")
