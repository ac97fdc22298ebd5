"""`python -m her2jax.models`: the table of registered models."""
import io

import pytest
from flax import nnx

from her2jax import models
from her2jax.models import __main__ as table


def test_table_lists_each_requested_model_with_its_figures():
    out = io.StringIO()
    table.table(["resnet18", "vit_tiny_patch16"], image_size=32, batch=2, repeats=1, out=out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| resnet18")
            or line.startswith("| vit_tiny_patch16")]
    assert len(rows) == 2
    for row in rows:
        name, parameters, gflops, milliseconds, rate = [c.strip() for c in row.strip("|").split("|")]
        model = models.create(name, num_classes=2, rngs=nnx.Rngs(0),
                              **({"image_size": 32} if name.startswith("vit") else {}))
        assert int(parameters.replace(",", "")) == table.count_parameters(model)
        assert float(gflops) > 0 and float(milliseconds) > 0 and float(rate) > 0


def test_resnet18_flops_match_the_published_count():
    """torchvision's resnet18 is 1.814 GMACs at 224; XLA counts a multiply-add as 2 FLOPs."""
    model = models.create("resnet18", num_classes=1000, dropout=0.0, rngs=nnx.Rngs(0))
    forward, state = table.forward_function(model)
    flops = table.flops_per_image(forward, state, 224)
    assert flops == pytest.approx(2 * 1.814e9, rel=0.10)


def test_unknown_model_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        table.main(["--names", "resnet7"])
    assert "unknown models ['resnet7']" in capsys.readouterr().err


def test_a_model_that_cannot_take_the_size_gets_a_row_saying_why(capsys):
    out = io.StringIO()
    table.table(["vit_tiny_patch32", "vit_tiny_patch4"], image_size=16, batch=1, repeats=1,
                out=out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| vit_")]
    assert rows[0] == "| vit_tiny_patch32 | not at 16 px: image_size 16 is not a multiple of 32 " \
                      "| | | |"
    assert float(rows[1].strip("|").split("|")[2]) > 0
    for bad in (["--image_size", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            table.main(bad)
        assert "must be at least 1" in capsys.readouterr().err
