"""benchmarks/torch_compare.py: the dry run reports both frameworks for each model, and the
PyTorch models it times compute the her2jax models' function for the same weights."""
from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from her2jax import models
from her2jax.models.weights import load_pretrained

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import torch_compare  # noqa: E402
import torch_models  # noqa: E402


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def torch_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def load_exactly(model: nnx.Module, net: torch.nn.Module) -> None:
    report = load_pretrained(model, torch_models.jax_arrays(net))
    assert not (report.missing or report.unused or report.mismatched), report


def test_dry_run_reports_both_frameworks(tmp_path):
    out = tmp_path / "compare.json"
    returned = torch_compare.main(["--dry_run", "--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(returned["results"]))
    assert [r["model"] for r in written["results"]] == ["resnet18_dual", "vit_small16"]
    assert written["environment"]["versions"]["jax"] and written["arguments"]["image_size"] == 32
    for result in written["results"]:
        jax_rate = result["her2jax"]["images_per_s"]
        torch_rate = result["torch_eager"]["images_per_s"]
        assert jax_rate > 0 and torch_rate > 0
        assert result["ratio_vs_torch_eager"] == pytest.approx(jax_rate / torch_rate)
        assert result["her2jax"]["parameters"] == result["torch_parameters"]
        assert result["her2jax"]["compile_s"] > 0 and result["her2jax"]["flops_per_step"] > 0
        assert result["model"] in written["table"]
    # Same weights, same batch, no dropout in the ViT: the first training losses agree.
    vit = written["results"][1]
    assert vit["her2jax"]["first_loss"] == pytest.approx(vit["torch_eager"]["first_loss"],
                                                         rel=1e-4)


def test_resnet_dual_attention_logits_match_for_the_same_weights():
    torch.manual_seed(0)
    net = torch_models.resnet(18, num_classes=2, dropout=0.0)
    for module in net.modules():  # non-trivial BatchNorm statistics and attention biases
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.0)
            module.bias.data.uniform_(-0.2, 0.2)
    net.attention.spatial.conv.bias.data.fill_(0.3)
    net.attention.channel.fc2.bias.data.uniform_(-1.0, 1.0)
    model = models.create("resnet18", num_classes=2, attention="dual", placement="last",
                          head="single", dropout=0.0, rngs=nnx.Rngs(1))
    load_exactly(model, net)
    x = images(64)  # at 32 pixels layer4 is 1x1: BatchNorm over 2 values is ill-conditioned
    for torch_mode, jax_mode in ((net.eval, model.eval), (net.train, model.train)):
        torch_mode()
        jax_mode()
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), torch_logits(net, x),
                                   atol=1e-4, rtol=1e-4)


def test_vit_logits_match_timm_for_the_same_weights():
    torch.manual_seed(0)
    net = torch_models.vit("small", 32, num_classes=2, depth=1).eval()
    model = models.create("vit_small_patch16", num_classes=2, image_size=32, depth=1,
                          rngs=nnx.Rngs(1))
    load_exactly(model, net)
    model.eval()
    x = images(32)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), torch_logits(net, x),
                               atol=1e-4, rtol=1e-4)


def test_a_failing_framework_is_recorded_and_the_rest_still_measured(tmp_path, monkeypatch):
    """One-off GPU runs must keep what they measured: a framework that raises is reported as
    failed, the others' figures stay, and the JSON is on disk after each model."""
    out = tmp_path / "compare.json"
    seen_after_first = []
    real_run_model, real_torch_run = torch_compare.run_model, torch_compare.torch_run

    def run_model(name, args, on_update=None):
        if out.exists():   # written after the previous model, before this one starts
            seen_after_first.append(json.loads(out.read_text()))
        return real_run_model(name, args, on_update)

    def torch_run(net, spec, images, labels, args, compiled):
        if spec["family"] == "vit":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_torch_run(net, spec, images, labels, args, compiled)

    monkeypatch.setattr(torch_compare, "run_model", run_model)
    monkeypatch.setattr(torch_compare, "torch_run", torch_run)
    returned = torch_compare.main(["--dry_run", "--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["complete"] is True and not os.path.exists(str(out) + ".partial")
    assert written["failures"] == ["vit_small16 torch_eager: RuntimeError: CUDA out of memory "
                                   "(simulated)"] == returned["failures"]
    resnet, vit = written["results"]
    assert resnet["ratio_vs_torch_eager"] > 0 and "error" not in resnet["torch_eager"]
    assert vit["her2jax"]["images_per_s"] > 0 and vit["gflops_per_image"] > 0
    assert "ratio_vs_torch_eager" not in vit
    row = next(line for line in written["table"].splitlines() if line.startswith("| vit_small16"))
    assert "| failed |" in row and "| n/a |" in row
    assert "FAILED vit_small16 torch_eager" in written["table"]
    # After the first model the file already held it, marked incomplete.
    assert len(seen_after_first) == 1
    assert [r["model"] for r in seen_after_first[0]["results"]] == ["resnet18_dual"]
    assert seen_after_first[0]["complete"] is False


def test_torch_compile_run_starts_from_the_same_weights(tmp_path):
    """--compile times a torch.compile'd fresh copy (here with the aot_eager backend, which traces
    forward and backward like inductor without generating code): its figures, ratio and compile
    time are reported, and its first loss is the eager run's (same weights, same batch)."""
    out = tmp_path / "compare.json"
    torch_compare.main(["--dry_run", "--device", "cpu", "--models", "vit_small16", "--compile",
                        "--compile_backend", "aot_eager", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["environment"]["torch_compile_backend"] == "aot_eager"
    (vit,) = written["results"]
    compiled, eager = vit["torch_compile"], vit["torch_eager"]
    assert compiled["images_per_s"] > 0 and compiled["compile_s"] == compiled["first_step_s"] > 0
    assert vit["ratio_vs_torch_compile"] == pytest.approx(vit["her2jax"]["images_per_s"]
                                                          / compiled["images_per_s"])
    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-5)
    assert "torch.compile img/s" in written["table"] and not written["failures"]


def test_a_run_cut_off_mid_model_keeps_the_frameworks_it_finished(tmp_path, monkeypatch):
    """gpu.sh kills a model's process at its time limit (say during a long torch.compile): the
    JSON on disk at that moment already holds her2jax's and eager PyTorch's figures for it."""
    out = tmp_path / "compare.json"
    on_disk = []
    real_torch_run = torch_compare.torch_run

    def torch_run(net, spec, images, labels, args, compiled):
        if compiled:   # what a kill from here on would leave behind
            on_disk.append(json.loads(out.read_text()))
            raise KeyboardInterrupt
        return real_torch_run(net, spec, images, labels, args, compiled)

    monkeypatch.setattr(torch_compare, "torch_run", torch_run)
    with pytest.raises(KeyboardInterrupt):
        torch_compare.main(["--dry_run", "--device", "cpu", "--models", "resnet18_dual",
                            "--compile", "--json", str(out)])
    (written,) = on_disk
    assert written["complete"] is False and not written["failures"]
    (resnet,) = written["results"]
    assert resnet["her2jax"]["images_per_s"] > 0 and resnet["torch_eager"]["images_per_s"] > 0
    assert resnet["ratio_vs_torch_eager"] > 0 and resnet["gflops_per_image"] > 0
    assert "torch_compile" not in resnet
    row = next(line for line in written["table"].splitlines() if line.startswith("| resnet18"))
    assert "| not run |" in row


@pytest.mark.parametrize("kernel", ["cudnn", "auto"])
def test_flops_of_a_cudnn_attention_vit_are_counted_on_the_written_out_model(monkeypatch, kernel):
    """On a GPU the step's FLOPs come from a CPU compilation, where a cuDNN attention call cannot
    be compiled: the count uses the same ViT with attention written out."""
    from her2jax.models import vit

    args = torch_compare.parse(["--dry_run", "--models", "vit_small16", "--vit_attention",
                                kernel])
    spec = torch_compare.MODELS["vit_small16"]
    torch.manual_seed(0)
    arrays = torch_models.jax_arrays(torch_compare.torch_model(spec, args))
    # as on a GPU
    monkeypatch.setattr(vit, "cudnn_attention_usable", lambda dtype, warn=True: True)
    dtype = jnp.bfloat16
    graph, params, rest, optimizer = torch_compare.jax_setup(spec, args, arrays, dtype)
    batch = {"image": jnp.zeros((2, 32, 32, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(Exception, match="(?i)cudnn"):
        torch_compare.step_flops(graph, params, rest, optimizer, batch, dtype)
    counted = torch_compare.counting_graph(spec, args, arrays, dtype, graph)
    flops = torch_compare.step_flops(counted, params, rest, optimizer, batch, dtype)
    args.vit_attention = "xla"
    written = torch_compare.jax_setup(spec, args, arrays, dtype)[0]
    assert torch_compare.counting_graph(spec, args, arrays, dtype, written) is written
    assert flops == torch_compare.step_flops(written, params, rest, optimizer, batch, dtype) > 0


def test_her2jax_alone_with_augmentation_on_the_device(tmp_path):
    """--her2jax_only times her2jax alone; --her2jax_augment adds the on-device augmentation to
    its step (another first loss: the images changed) and needs --her2jax_only."""
    common = ["--dry_run", "--device", "cpu", "--models", "resnet18_dual", "--her2jax_only",
              "--no_flops"]
    plain = torch_compare.main(common)["results"][0]
    augmented = torch_compare.main(common + ["--her2jax_augment"])["results"][0]
    for result in (plain, augmented):
        assert "torch_eager" not in result and result["her2jax"]["images_per_s"] > 0
        assert result["her2jax"]["flops_per_step"] is None
    assert augmented["her2jax"]["first_loss"] != plain["her2jax"]["first_loss"]
    with pytest.raises(SystemExit):
        torch_compare.parse(["--dry_run", "--her2jax_augment"])
