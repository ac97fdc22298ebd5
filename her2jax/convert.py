"""Convert ImageNet weights:
`python -m her2jax.convert --source torchvision|timm|hf|hf-cvt|timm-swin --arch NAME IN OUT`.

IN is a torchvision ResNet state dict (`.pth`), a timm ViT checkpoint (`.safetensors` or `.pth`),
a HuggingFace ViT / ViT-MAE checkpoint (`.safetensors` or `.bin`), with `hf-cvt` and
`--arch cvt13` a HuggingFace CvT-13 checkpoint (`CvtForImageClassification`, `.safetensors` or
`.bin`) or, with `timm-swin` and `--arch swin_tiny_patch4_window7`, a timm Swin-T checkpoint
(`swin_tiny_patch4_window7_224`, `.safetensors` or `.pth`). OUT is a converted file that
training loads with one config key (`config.init.pretrained = OUT`). The conversion is checked
against the registered model `NAME` with the checkpoint's own class count, and the report lists
loaded, missing and unused keys; a checkpoint that leaves parameters outside the head missing or
of another shape, or holds parameters outside the head that the model has no place for, is
refused (another architecture), unless `--allow_partial`.
"""
from __future__ import annotations

import argparse
import re
import sys

from her2jax.errors import InvalidSetting, UserError
from her2jax.models import weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m her2jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=weights.SOURCES)
    parser.add_argument("--arch", required=True,
                        help="registered model name (resnet50, vit_small_patch16, cvt13, "
                             "swin_tiny_patch4_window7, ...); timm names such as "
                             "vit_small_patch16_224 are accepted")
    parser.add_argument("input", help="PyTorch checkpoint")
    parser.add_argument("output", help="converted file (.safetensors)")
    parser.add_argument("--allow_partial", action="store_true",
                        help="write the file even when parameters outside the classification "
                             "head are missing from the checkpoint, have another shape or have "
                             "no place in the model")
    return parser.parse_args(argv)


HEAD = ("fc/", "head/")   # the classification head: replaced for the task anyway


def registry_name(arch: str) -> tuple[str, dict]:
    """`vit_small_patch16_384` -> ('vit_small_patch16', {'image_size': 384})."""
    from her2jax import models

    if arch in models.names():
        return arch, {}
    match = re.fullmatch(r"(.+)_(\d+)", arch)
    if match and match.group(1) in models.names():
        return match.group(1), {"image_size": int(match.group(2))}
    raise InvalidSetting(f"unknown architecture {arch!r}; registered: {', '.join(models.names())}")


def head_classes(arrays: dict) -> int:
    for key in ("fc/kernel", "head/kernel"):
        if key in arrays:
            return int(arrays[key].shape[-1])
    return 1000


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from flax import nnx

        from her2jax import models

        name, extra = registry_name(args.arch)
        converted = weights.convert(args.source, weights.read_torch_checkpoint(args.input))
        if "fc_norm/scale" in converted:  # timm's average-pooling ViTs normalise after pooling
            extra["pool"] = "avg"
        model = models.create(name, num_classes=head_classes(converted), rngs=nnx.Rngs(0),
                              **extra)
        report = weights.load_pretrained(model, converted)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    if not report.loaded:
        print(f"error: nothing in {args.input} matches {name}; wrong --source or --arch?",
              file=sys.stderr)
        return 1
    unfit = report.mismatched + [key for key in report.missing + report.unused
                                 if not key.startswith(HEAD)]
    if unfit and not args.allow_partial:
        print(f"error: {args.input} does not fit {name}: {len(unfit)} parameters outside the "
              f"head are missing, of another shape or without a place in the model (first: "
              f"{unfit[0]}); wrong --arch? (--allow_partial writes it anyway)", file=sys.stderr)
        return 1
    weights.save(converted, args.output, source=args.source, arch=args.arch)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
