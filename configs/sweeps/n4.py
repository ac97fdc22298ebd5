"""N4 bias-field correction on and off, with the study's best normalisation, for the
dual-attention ResNet-18 from ImageNet weights.

    --sweep configs/sweeps/n4.py[:SEEDS]                (default 3 seeds)

The runs load WEIGHTS_DIR/resnet18.safetensors (`launch.sweep --weights_dir`, default weights/);
`--set init.pretrained=` trains from scratch.
"""
from launch.spec import Sweep, axis, imagenet, product, seeds


def get_sweep(arg=None):
    data = {"q98": {"normalization": "per_channel_clip_q98"},
            "q98_n4": {"normalization": "per_channel_clip_q98", "n4": True}}
    runs = product(axis("config", ["configs/resnet.py:resnet18"]),
                   axis("data", ["q98", "q98_n4"]), seeds(int(arg or 3)),
                   base={"init.pretrained": imagenet("resnet18")})
    return Sweep("n4", runs=runs, data=data, description="N4 off / on (per-channel q98)",
                 pack=8)        # the seeds of each variant train as one pack
