"""The crop, a choice the study leaves open: the square sized to the tumour (box plus margin,
every patient its own zoom; the default) against fixed fields of view at native resolution
around the tumour centre (tumour size stays visible), for the dual-attention ResNet-18 from
ImageNet weights, per-channel q0.98, 3 seeds.

    --sweep configs/sweeps/crop.py[:SIZES]     (default 48mm,64mm,96mm; e.g. :64mm,128px)

The runs load WEIGHTS_DIR/resnet18.safetensors (`launch.sweep --weights_dir`, default weights/);
`--set init.pretrained=` trains from scratch.
"""
from launch.spec import Sweep, axis, imagenet, product, seeds


def get_sweep(arg=None):
    sizes = [size.strip() for size in (arg or "48mm,64mm,96mm").split(",") if size.strip()]
    base = {"normalization": "per_channel_clip_q98"}
    data = {"tumour": dict(base)}
    data.update({f"fixed{size}": dict(base, crop="fixed", crop_size=size) for size in sizes})
    runs = product(axis("config", ["configs/resnet.py:resnet18"]), axis("data", list(data)),
                   seeds(3), base={"init.pretrained": imagenet("resnet18")})
    return Sweep("crop", runs=runs, data=data, pivot=("data", "config"),
                 description="crop: sized to the tumour vs fixed fields of view",
                 pack=8)        # the seeds of each crop train as one pack
