"""Pretrained weights: reading PyTorch files safely, converting, loading with a report."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.torch import save_file as save_torch_safetensors

from her2jax import convert, models
from her2jax.models import weights
from test_resnet import randomised, torch_logits


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    net = randomised("resnet18")
    source, converted = str(folder / "resnet18.pth"), str(folder / "resnet18.safetensors")
    torch.save(net.state_dict(), source)
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", source, converted]) == 0
    return net, source, converted


def test_converted_resnet_reproduces_torchvision(resnet_files):
    net, _, converted = resnet_files
    model = models.create("resnet18", num_classes=1000, dropout=0.0, rngs=nnx.Rngs(1))
    report = weights.load_pretrained(model, converted)
    assert not (report.missing or report.unused or report.mismatched), report.summary()
    model.eval()
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(images)), torch_logits(net, images), atol=1e-4)


def test_backbone_loads_new_parts_stay_fresh(resnet_files):
    _, _, converted = resnet_files
    model = models.create("resnet18", num_classes=2, attention="cbam", rngs=nnx.Rngs(1))
    fresh_attention = {k: np.asarray(v) for k, v in
                       nnx.to_flat_state(nnx.state(model, nnx.Param)) if "attention" in k}
    report = weights.load_pretrained(model, converted)
    assert "conv1/kernel" in report.loaded and "layer4/1/bn2/var" in report.loaded
    assert sorted(report.mismatched) == ["fc/bias (1000,)->(2,)", "fc/kernel (512, 1000)->(512, 2)"]
    assert report.missing and all("attention" in key or key.startswith("fc/")
                                  for key in report.missing), report.missing
    assert report.unused == []
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, value in fresh_attention.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value)


def test_triple_head_reports_the_unused_single_head(resnet_files):
    _, _, converted = resnet_files
    model = models.create("resnet18", num_classes=2, head="triple", rngs=nnx.Rngs(1))
    report = weights.load_pretrained(model, converted)
    assert report.unused == ["fc/bias", "fc/kernel"]
    assert any(key.startswith("heads/") for key in report.missing)


def test_a_pth_file_without_torch_installed_is_one_clear_line(resnet_files, monkeypatch,
                                                              capsys):
    """`make setup` installs no torch: converting a .pth file then says what to install."""
    _, source, _ = resnet_files
    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` raises ImportError
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", source,
                         source + ".out"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "needs torch, which `make setup` leaves out: pip install torch (CPU is enough), or "
        "convert a .safetensors file")


def test_wrapped_checkpoint_and_safetensors_read_alike(resnet_files, tmp_path):
    net, source, _ = resnet_files
    plain = weights.read_torch_checkpoint(source)
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    save_torch_safetensors({k: v.contiguous() for k, v in net.state_dict().items()},
                           str(tmp_path / "plain.safetensors"))
    for other in (tmp_path / "wrapped.pth", tmp_path / "plain.safetensors"):
        read = weights.read_torch_checkpoint(str(other))
        assert read.keys() == plain.keys()
        for key in plain:
            np.testing.assert_array_equal(read[key], plain[key])


class _Payload:
    """Unpickling this object would run code: it must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict") as refused:
        weights.read_torch_checkpoint(str(path))
    assert not marker.exists()
    assert "\n" not in str(refused.value) and "weights_only=False" not in str(refused.value)


def _truncated(path) -> bytes:
    from safetensors.numpy import save
    return save({"fc/kernel": np.ones((4, 4), np.float32)})[:40]


@pytest.mark.parametrize("name, content", [
    ("random.safetensors", lambda _: os.urandom(64)),
    ("header.safetensors", lambda _: (500).to_bytes(8, "little") + b"{not json" + b" " * 600),
    ("truncated.safetensors", _truncated),
    ("random.pth", lambda _: os.urandom(64)),
    ("list.pth", None)])
def test_a_file_that_is_not_usable_weights_is_one_line_naming_it(name, content, tmp_path,
                                                                  capsys):
    """Random bytes, a corrupt header, a truncated file, a .pth holding a list: convert and
    the converted-weight reader (config.init.pretrained, predict) end in one line naming the
    file, never suggesting to load code."""
    path = tmp_path / name
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content(path))
    out = str(tmp_path / "out.safetensors")
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", str(path), out]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1, err
    assert "weights_only=False" not in err and not os.path.exists(out)
    if name.endswith(".safetensors"):
        with pytest.raises(ValueError, match=f"^{path}: not a readable converted weight file"):
            weights.read(str(path))


def timm_vit_state(**kwargs) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    return net, {k: v.detach().numpy() for k, v in net.state_dict().items()}


def test_timm_average_pooling_checkpoint_converts(tmp_path):
    net, _ = timm_vit_state(global_pool="avg")
    source, converted = str(tmp_path / "vit.pth"), str(tmp_path / "vit_out.safetensors")
    torch.save(net.state_dict(), source)
    assert convert.main(["--source", "timm", "--arch", "vit_tiny_patch16", source, converted]) == 0
    model = models.create("vit_tiny_patch16", num_classes=1000, pool="avg", rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, converted)
    assert "fc_norm/scale" in report.loaded
    assert not (report.missing or report.unused or report.mismatched), report.summary()


def test_timm_vit_converts_and_pos_embed_resizes(tmp_path):
    net, _ = timm_vit_state()
    source, converted = str(tmp_path / "vit.safetensors"), str(tmp_path / "vit_out.safetensors")
    save_torch_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, source)
    assert convert.main(["--source", "timm", "--arch", "vit_tiny_patch16_224", source,
                         converted]) == 0
    model = models.create("vit_tiny_patch16", num_classes=2, image_size=64, rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, converted)
    assert report.resized == ["pos_embed"]
    assert model.pos_embed[...].shape == (1, 1 + 4 * 4, 192)
    assert "blocks/11/attn/qkv/kernel" in report.loaded
    model.eval()
    assert np.isfinite(np.asarray(model(np.zeros((1, 64, 64, 3), np.float32)))).all()


def test_huggingface_vit_keys_convert_like_timm():
    _, state = timm_vit_state()
    hf = {"vit.embeddings.cls_token": state["cls_token"],
          "vit.embeddings.position_embeddings": state["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
          "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after",
             "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
    for i in range(12):
        prefix = f"vit.encoder.layer.{i}"
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                hf[f"{prefix}.{theirs}.{leaf}"] = state[f"blocks.{i}.{ours}.{leaf}"]
        for leaf in ("weight", "bias"):
            q, k, v = np.split(state[f"blocks.{i}.attn.qkv.{leaf}"], 3, axis=0)
            for name, part in zip(("query", "key", "value"), (q, k, v)):
                hf[f"{prefix}.attention.attention.{name}.{leaf}"] = part
    from_hf = weights.convert("hf", hf)
    from_timm = weights.convert("timm", {k: v for k, v in state.items()
                                         if not k.startswith("head.")})
    assert from_hf.keys() == from_timm.keys()
    for key in from_timm:
        np.testing.assert_array_equal(from_hf[key], from_timm[key])


def test_command_line_errors(resnet_files, tmp_path, capsys):
    _, source, _ = resnet_files
    out = str(tmp_path / "x.safetensors")
    assert convert.main(["--source", "torchvision", "--arch", "resnet7", source, out]) == 1
    assert "unknown architecture 'resnet7'" in capsys.readouterr().err
    assert convert.main(["--source", "timm", "--arch", "vit_tiny_patch16", source, out]) == 1
    assert "no counterpart in this ViT" in capsys.readouterr().err   # a ResNet file as timm
    assert convert.main(["--source", "torchvision", "--arch", "vit_tiny_patch16", source,
                         out]) == 1
    assert "nothing in" in capsys.readouterr().err                  # ResNet keys, ViT model
    assert not os.path.exists(out)
    # ResNet-18 weights for a ResNet-34: half its blocks would stay random
    assert convert.main(["--source", "torchvision", "--arch", "resnet34", source, out]) == 1
    err = capsys.readouterr().err
    assert "does not fit resnet34" in err and "wrong --arch?" in err and not os.path.exists(out)
    assert convert.main(["--source", "torchvision", "--arch", "resnet34", source, out,
                         "--allow_partial"]) == 0
    assert os.path.exists(out)
    from safetensors.numpy import save_file
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a converted her2jax checkpoint"):
        weights.read(str(tmp_path / "plain.safetensors"))


def test_transformers_vit_converts_to_the_same_function():
    """A randomly initialised HuggingFace ViTModel, converted with --source hf, gives the same
    class-token features as transformers itself (our head set to the identity)."""
    import jax.numpy as jnp
    import transformers

    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=16,
                                    layer_norm_eps=1e-6, hidden_act="gelu")
    torch.manual_seed(0)
    hf_model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():   # move the LayerNorms and biases off their trivial initial values
        for name, parameter in hf_model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = models.create("vit_tiny_patch16", num_classes=192, image_size=32, rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, weights.convert("hf", state))
    assert report.missing == ["head/bias", "head/kernel"] and not report.unused, report.summary()
    model.head.kernel[...] = jnp.eye(192)
    model.head.bias[...] = jnp.zeros(192)
    model.eval()
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state[:, 0]
    np.testing.assert_allclose(np.asarray(model(images)), expected.numpy(), atol=1e-4)
