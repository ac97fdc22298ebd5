"""The study's model settings, by name, without JAX (the run configs import them): keyword
arguments of `her2jax.models.resnet.ResNet`, used by the registered presets and by
`configs/resnet.py`.
"""
from __future__ import annotations

# squeeze-excite (r=16) then CBAM spatial attention on the layer4 map, global average pool,
# dropout 0.5, one linear head
DUAL_ATTENTION = {"attention": "dual", "placement": "last", "head": "single", "dropout": 0.5}
# the same attention in each of three heads on layer2/3/4, their logits averaged
TRIPLE_HEAD = dict(DUAL_ATTENTION, head="triple", head_combine="mean")
