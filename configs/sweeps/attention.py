"""Attention ablation: module x placement x head on ResNet-18/34/50.

    --sweep configs/sweeps/attention.py[:DEPTHS]        e.g. :18 for ResNet-18 only

Every run starts from configs/resnet.py:plain18 (no attention) and sets the attention keys, so
'none' is the baseline of each depth. Without attention the placement changes nothing, so 'none'
runs once per depth, head and seed (placement 'last'), not three times. The pivot table is
attention module x placement. Every run loads the ImageNet weights of its depth,
WEIGHTS_DIR/resnet<depth>.safetensors (`launch.sweep --weights_dir`, default weights/); the
attention modules and the head start fresh. `--set init.pretrained=` trains from scratch.
"""
from launch.spec import Sweep, axis, imagenet, product, seeds, zip_axes

MODULES = ["none", "channel", "spatial", "cbam", "dual", "danet"]
PLACEMENTS = ["last", "stages", "blocks"]
HEADS = ["single", "triple"]


def get_sweep(arg=None):
    depths = [int(d) for d in (arg or "18,34,50").split(",")]
    runs = product(
        axis("config", ["configs/resnet.py:plain18"]),
        zip_axes(axis("model.name", [f"resnet{d}" for d in depths]),
                 axis("init.pretrained", [imagenet(f"resnet{d}") for d in depths])),
        axis("model.kwargs.attention", MODULES),
        axis("model.kwargs.placement", PLACEMENTS),
        axis("model.kwargs.head", HEADS),
        seeds(2),
        base={"data": "q98"})
    runs = [run for run in runs if run.settings["model.kwargs.attention"] != "none"
            or run.settings["model.kwargs.placement"] == "last"]
    return Sweep("attention", runs=runs, data={"q98": {"normalization": "per_channel_clip_q98"}},
                 pivot=("model.kwargs.attention", "model.kwargs.placement"),
                 description="attention module x placement x head x depth")
