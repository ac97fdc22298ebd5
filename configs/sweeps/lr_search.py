"""Random search over learning rate, weight decay, dropout and label smoothing for the
dual-attention ResNet-18 from ImageNet weights; the points are drawn from a fixed seed, so the
same runs (and names) come back in every session. The runs load WEIGHTS_DIR/resnet18.safetensors
(`launch.sweep --weights_dir`, default weights/); `--set init.pretrained=` trains from scratch.

    --sweep configs/sweeps/lr_search.py[:POINTS]        (default 24 points, one seed each;
                                                         packs of 8 unless --pack says)
"""
import numpy as np

from launch.spec import Sweep, imagenet, runs_of


def get_sweep(arg=None):
    rng = np.random.default_rng(20251015)
    points = []
    for _ in range(int(arg or 24)):
        points.append({
            "config": "configs/resnet.py:resnet18", "data": "q98",
            "init.pretrained": imagenet("resnet18"),
            "optimizer.learning_rate": float(f"{10 ** rng.uniform(-4.5, -2.5):.2e}"),
            "optimizer.weight_decay": float(f"{10 ** rng.uniform(-4, -0.5):.2e}"),
            "model.kwargs.dropout": round(float(rng.uniform(0.0, 0.6)), 2),
            "loss.label_smoothing": round(float(rng.uniform(0.0, 0.2)), 2)})
    return Sweep("lr_search", runs=runs_of(points),
                 data={"q98": {"normalization": "per_channel_clip_q98"}},
                 description="random search: learning rate, weight decay, dropout, smoothing",
                 pack=8)        # every point differs only in packable keys: packs of 8
