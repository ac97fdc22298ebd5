"""train_and_evaluate end to end on a tiny prepared dataset: logs, checkpoints, resume, SIGTERM,
the NaN guard, the dataset check, the relaunch check and the start-up checks of config values."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import resnet, vit
from conftest import write_cohort
from data_prep import prepare
from her2jax.analysis import evaluation
from her2jax.data import pipeline as input_pipeline
from her2jax.data import resident
from her2jax.training import loop as train
from her2jax.training import inference, steps


def prepared(folder: str, *extra: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.main(["--source", folder, "--data_dir", folder + "_prepared",
                             "--image_size", "16", "--workers", "1", "--quiet", *extra]) == 0
    return out.getvalue().splitlines()[-1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("train") / "cohort")
    write_cohort(folder, patients=12)
    return folder, prepared(folder)


def tiny_config(data_dir: str):
    config = resnet.get_config("resnet18,runlocal")
    config.data_dir = data_dir
    config.batch_size = 4
    config.eval.batch_size = 3          # does not divide the validation split
    return config


def final_params(workdir: str, step: int) -> list[np.ndarray]:
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def preempt_at_call(monkeypatch, call: int = 4, check=lambda kwargs: None):
    """Patches steps.make_train_step so that the step it makes sends this process SIGTERM (a
    preemption notice mid-run) at its `call`-th call; `check` sees the keyword arguments.
    Returns the original, for the resume."""
    make_train_step = steps.make_train_step

    def patched(*args, **kwargs):
        check(kwargs)
        step, calls = make_train_step(*args, **kwargs), {"n": 0}

        def wrapped(*inputs):
            calls["n"] += 1
            outputs = step(*inputs)
            if calls["n"] == call:
                os.kill(os.getpid(), signal.SIGTERM)
            return outputs

        return wrapped

    monkeypatch.setattr(steps, "make_train_step", patched)
    return make_train_step


def test_run_writes_logs_checkpoints_and_reports(dataset, tmp_path, monkeypatch):
    _, data_dir = dataset
    monkeypatch.chdir(tmp_path)          # a relative run folder, as users type it
    report = train.train_and_evaluate(tiny_config(data_dir), "run")
    workdir = str(tmp_path / "run")
    rows = records(workdir)
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    # standard JSON for other tools: no bare NaN (no speed before the second log line: null)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        train_lines = [line for line in handle if '"split": "train"' in line]
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
              for line in train_lines]
    assert strict[0]["images_per_second"] is None and strict[1]["images_per_second"] > 0
    elapsed = [r["elapsed_seconds"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0
    evaluations = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in evaluations] == [3, 6]
    # every validation slice counted once although 3 does not divide the split
    counts = input_pipeline.open_dataset(data_dir).info.splits["validation"].num_examples
    assert evaluations[-1]["slices"] == counts
    assert report["patients"] == evaluations[-1]["patients"] == 2
    for name in ("config.json", "preparation.json", "checkpoints", "best", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.parametrize("augment_on, source", [("host", "tfrecord"), ("device", "tfrecord"),
                                                ("device", "device")])
def test_interrupted_then_resumed_equals_uninterrupted(dataset, tmp_path, monkeypatch, augment_on,
                                                       source):
    """Also with the augmentation in the step (input.augment_on='device': the step gets it), and
    with the data resident on the device (input.source='device': no TFRecord is read after the
    start, neither for training nor for evaluation)."""
    _, data_dir = dataset

    def config():
        tiny = tiny_config(data_dir)
        tiny.input.augment_on, tiny.input.source = augment_on, source
        return tiny

    if source == "device":
        def not_read(*args, **kwargs):
            raise AssertionError("a TFRecord read in the step loop")

        monkeypatch.setattr(input_pipeline, "train_iterator", not_read)
        monkeypatch.setattr(inference.Predictor, "split", not_read)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(config(), straight)

    def augment_where_asked(kwargs):
        assert (kwargs["augment"] is not None) == (augment_on == "device")

    make_train_step = preempt_at_call(monkeypatch, check=augment_where_asked)
    with pytest.raises(train.StopRequested, match="SIGTERM: checkpoint written at step 4") as stop:
        train.train_and_evaluate(config(), resumed)
    assert stop.value.exit_code == 143
    assert "4" in os.listdir(os.path.join(resumed, "checkpoints"))   # SIGTERM's checkpoint
    monkeypatch.setattr(steps, "make_train_step", make_train_step)
    train.train_and_evaluate(config(), resumed)
    for a, b in zip(final_params(straight, 6), final_params(resumed, 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_the_run_naming_the_step(dataset, tmp_path, monkeypatch):
    _, data_dir = dataset
    normalize = steps.normalize_images

    def poisoned_aware(images, dtype=jnp.float32):
        x = normalize(images, dtype)
        poisoned = jnp.all(images == 255)
        return jnp.where(poisoned, jnp.nan, x).astype(x.dtype)

    to_global = input_pipeline.to_global
    calls = {"n": 0}

    def poison_second_batch(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 2 and "label" in batch:
            batch = dict(batch, image=np.full_like(batch["image"], 255))
        return to_global(batch, mesh)

    monkeypatch.setattr(steps, "normalize_images", poisoned_aware)
    monkeypatch.setattr(input_pipeline, "to_global", poison_second_batch)
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 2 \(steps 1\.\.2\)"):
        train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "run"))


def test_resume_refuses_data_prepared_differently(dataset, tmp_path):
    folder, data_dir = dataset
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir)
    config.total_steps, config.eval.every_steps, config.checkpoint.every_steps = 3, 3, 3
    config.warmup_steps = 1
    train.train_and_evaluate(config, workdir)
    other = prepared(folder, "--normalization", "zscore")
    config.data_dir = other
    with pytest.raises(ValueError, match="prepared differently.*normalization"):
        train.train_and_evaluate(config, workdir)


def three_steps(config):
    config.total_steps, config.eval.every_steps, config.checkpoint.every_steps = 3, 3, 3
    config.warmup_steps = 1
    return config


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    """A finished three-step run; tests relaunch in copies of it."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    train.train_and_evaluate(three_steps(tiny_config(dataset[1])), workdir)
    return workdir


def run_copy(finished_run, tmp_path) -> tuple[str, bytes, list[str]]:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    with open(os.path.join(workdir, "config.json"), "rb") as handle:
        return workdir, handle.read(), sorted(os.listdir(workdir))


def assert_untouched(workdir: str, config_bytes: bytes, listing: list[str]) -> None:
    with open(os.path.join(workdir, "config.json"), "rb") as handle:
        assert handle.read() == config_bytes
    assert sorted(os.listdir(workdir)) == listing


def test_relaunch_with_another_model_refuses_and_leaves_the_run_intact(dataset, finished_run,
                                                                       tmp_path):
    _, data_dir = dataset
    workdir, config_bytes, listing = run_copy(finished_run, tmp_path)
    config = three_steps(vit.get_config("tiny4,runlocal"))
    config.data_dir, config.batch_size, config.eval.batch_size = data_dir, 4, 3
    with pytest.raises(ValueError, match="started with a different config") as refused:
        train.train_and_evaluate(config, workdir)
    message = str(refused.value)
    assert 'model.name "resnet18" -> "vit_tiny_patch4"' in message
    assert "optimizer.learning_rate 0.001 -> 0.0003" in message
    assert 'model.kwargs.attention "dual" -> (absent)' in message
    assert "use another --workdir" in message and len(message) < 1500
    assert_untouched(workdir, config_bytes, listing)
    result = evaluation.evaluate_run(workdir, split="validation", samples=20, progress=False)
    assert result["model"] == "resnet18"


def test_relaunch_with_another_learning_rate_refuses(dataset, finished_run, tmp_path):
    _, data_dir = dataset
    workdir, config_bytes, listing = run_copy(finished_run, tmp_path)
    config = three_steps(tiny_config(data_dir))
    config.optimizer.learning_rate, config.model.kwargs.dropout = 0.5, 0.0
    with pytest.raises(ValueError, match=r"model.kwargs.dropout 0.5 -> 0.0; "
                                         r"optimizer.learning_rate 0.001 -> 0.5\)"):
        train.train_and_evaluate(config, workdir)
    assert_untouched(workdir, config_bytes, listing)


def test_relaunch_may_extend_the_run_and_records_the_change(dataset, finished_run, tmp_path):
    _, data_dir = dataset
    workdir, _, _ = run_copy(finished_run, tmp_path)
    config = three_steps(tiny_config(data_dir))
    config.total_steps, config.log_every_steps = 5, 1
    train.train_and_evaluate(config, workdir)
    assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert [r["step"] for r in records(workdir) if r["split"] == "train"][-2:] == [4, 5]
    with open(os.path.join(workdir, "config.json")) as handle:
        assert json.load(handle)["total_steps"] == 5
    with open(os.path.join(workdir, "launches.jsonl")) as handle:
        launches = [json.loads(line) for line in handle]
    assert [(r["step"], r["changed"]) for r in launches] == [
        (0, {}), (3, {"log_every_steps": [2, 1], "total_steps": [3, 5]})]
    # shortening below the last checkpoint would train nothing: refused
    config.total_steps = 4
    with pytest.raises(ValueError, match="checkpoint at step 5, past total_steps 4"):
        train.train_and_evaluate(config, workdir)


def test_runs_from_before_augment_on_relaunch_and_switching_it_is_refused(dataset, finished_run,
                                                                          tmp_path):
    """A config.json written before input.augment_on and input.source existed relaunches with
    their defaults ('host', 'tfrecord': what those runs did) as no change; moving the
    augmentation or the data to the device is another experiment (other random draws):
    refused."""
    _, data_dir = dataset
    workdir, _, _ = run_copy(finished_run, tmp_path)
    path = os.path.join(workdir, "config.json")
    with open(path) as handle:
        recorded = json.load(handle)
    del recorded["input"]["augment_on"], recorded["input"]["source"]
    with open(path, "w") as handle:
        json.dump(recorded, handle)
    config = three_steps(tiny_config(data_dir))
    config.input.augment_on = "device"
    with pytest.raises(ValueError, match=r'input.augment_on \(absent\) -> "device"'):
        train.train_and_evaluate(config, workdir)
    config.input.source = "device"       # the data on the device: other draws too
    with pytest.raises(ValueError, match=r'input.source \(absent\) -> "device"'):
        train.train_and_evaluate(config, workdir)
    config.input.augment_on, config.input.source, config.total_steps = "host", "tfrecord", 4
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "launches.jsonl")) as handle:
        assert json.loads(handle.readlines()[-1])["changed"] == {"total_steps": [3, 4]}


@pytest.mark.parametrize("key, value, valid", [
    ("eval.aggregation", "mediam", "median, mean, max"),
    ("dtype", "bf16", "float32, bfloat16"),
    ("model.name", "resnet19", "resnet18"),
    ("input.balance", "classes", "none, class, patient"),
    ("input.augment_on", "gpu", "host, device"),
    ("input.source", "gpu", "tfrecord, device"),
    ("input.source", "device", "augment_on='device' as well"),
    ("eval_split", "valid", "splits: .*validation"),
    ("model.kwargs.attention", "duel", "choose from .*dual"),
    ("eval.every_steps", 0, "at least 1"),
])
def test_invalid_values_fail_before_anything_is_written(dataset, tmp_path, key, value, valid):
    _, data_dir = dataset
    config = tiny_config(data_dir)
    config.update_from_flattened_dict({key: value})
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=valid):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_data_that_would_not_fit_on_the_device_is_refused_before_anything_is_written(
        dataset, tmp_path, monkeypatch):
    _, data_dir = dataset
    config = tiny_config(data_dir)
    config.input.source = config.input.augment_on = "device"
    needed = resident.split_bytes(data_dir, "train") + resident.split_bytes(data_dir, "validation")
    monkeypatch.setattr(resident, "free_bytes", lambda device: needed)   # only half of it used
    workdir = tmp_path / "run"
    with pytest.raises(resident.DoesNotFit) as refused:
        train.train_and_evaluate(config, str(workdir))
    message = str(refused.value)
    assert f"need {needed} bytes" in message and f"{needed} bytes (0.00 GiB) free" in message
    assert "input.source='tfrecord'" in message and "\n" not in message
    assert not workdir.exists()


TWO_DEVICE_RESUME = """
import sys, jax
from configs import resnet, vit
from her2jax.training import loop as train
assert len(jax.devices()) == 2
config = resnet.get_config("resnet18,runlocal")
config.data_dir, config.batch_size, config.eval.batch_size = sys.argv[1], 4, 3
train.train_and_evaluate(config, sys.argv[2])
print("ok")
"""


def test_checkpoint_restores_onto_two_devices(dataset, tmp_path, monkeypatch):
    """Written by one device at step 4 (SIGTERM), finished by a two-device process."""
    import subprocess
    import sys

    _, data_dir = dataset
    workdir = str(tmp_path / "run")
    preempt_at_call(monkeypatch)
    with pytest.raises(train.StopRequested):
        train.train_and_evaluate(tiny_config(data_dir), workdir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_RESUME, data_dir, workdir],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 4" in result.stderr
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
    last = [r for r in records(workdir) if r["split"] == "train"][-1]
    assert last["step"] == 6 and np.isfinite(last["loss"])


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler during the test, also in a process that started with SIGINT
    ignored (a background job of a non-interactive shell)."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def test_ctrl_c_writes_a_checkpoint_and_a_second_one_stops_at_once(dataset, tmp_path,
                                                                   monkeypatch, python_ctrl_c):
    _, data_dir = dataset
    make_train_step = steps.make_train_step

    def interrupted(at_calls, times=1):
        def make(*args, **kwargs):
            step, calls = make_train_step(*args, **kwargs), {"n": 0}

            def wrapped(*inputs):
                calls["n"] += 1
                outputs = step(*inputs)
                if calls["n"] in at_calls:
                    for _ in range(times):
                        os.kill(os.getpid(), signal.SIGINT)
                return outputs

            return wrapped
        return make

    monkeypatch.setattr(steps, "make_train_step", interrupted({2}))
    workdir = str(tmp_path / "run")
    with pytest.raises(train.StopRequested, match="SIGINT: checkpoint written at step 2") as stop:
        train.train_and_evaluate(tiny_config(data_dir), workdir)
    assert stop.value.exit_code == 130
    assert "2" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # handler given back
    # two Ctrl-C before the step ends: the second one is a plain KeyboardInterrupt
    monkeypatch.setattr(steps, "make_train_step", interrupted({1}, times=2))
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "other"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_outputs_at_an_evaluation_stop_the_run_naming_the_step(dataset, tmp_path,
                                                                   monkeypatch):
    """Parameters can diverge in an update whose loss was still finite: the evaluation's NaN
    outputs then stop the run with the step, not a metric library's complaint."""
    _, data_dir = dataset
    make_eval_step = steps.make_eval_step

    def diverged(*args, **kwargs):
        step = make_eval_step(*args, **kwargs)
        return lambda *inputs: step(*inputs) * float("nan")

    monkeypatch.setattr(steps, "make_eval_step", diverged)
    with pytest.raises(FloatingPointError,
                       match="outputs on validation are NaN/inf at step 3: its parameters"):
        train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "run"))


def test_a_pack_trains_each_member_as_its_run_alone_and_resumes_exactly(
        dataset, tmp_path, monkeypatch):
    """Two members differing in seed, learning rate, label smoothing, dropout, class weights and
    rotation, trained as one pack: each equals its run trained alone (parameters within 1e-5 of
    their global norm, the same validation figures at every evaluation), has an ordinary run
    folder, and a pack stopped by SIGTERM resumes to the same parameters bit for bit.

    A ViT: the batched program rounds differently from the single one (1e-7 in the loss), and
    ResNet-18 on 16-pixel slices in batches of 4 (BatchNorm over 4 values per channel at
    layer4) amplifies that to 1e-1 within four steps, with or without the pack (measured), so
    only a model whose training is not chaotic at this size can show the equality."""
    _, data_dir = dataset

    def member(seed, learning_rate, smoothing, dropout, weighted, degrees):
        config = vit.get_config("tiny4,runlocal")
        config.model.kwargs.dropout = dropout
        config.loss.class_weights, config.input.augment.rotate_degrees = weighted, degrees
        config.data_dir, config.batch_size, config.eval.batch_size = data_dir, 4, 3
        config.input.source = config.input.augment_on = "device"
        config.seed, config.optimizer.learning_rate = seed, learning_rate
        config.loss.label_smoothing = smoothing
        return config

    configs = [member(0, 1e-3, 0.0, 0.1, True, 10.0), member(1, 3e-3, 0.1, 0.4, False, 25.0)]
    packed = [str(tmp_path / "pack" / name) for name in ("a", "b")]
    reports = train.train_pack(configs, packed)
    alone = [str(tmp_path / name) for name in ("a_alone", "b_alone")]
    for config, workdir, report in zip(configs, alone, reports):
        assert train.train_and_evaluate(config, workdir) == pytest.approx(report, nan_ok=True)
    for workdir, single in zip(packed, alone):
        # relative to the parameters' global norm (a bias a few Adam steps from zero can differ
        # by more, relatively, where its gradient is at the rounding level)
        pairs = list(zip(final_params(workdir, 6), final_params(single, 6), strict=True))
        difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs))
        assert difference <= 1e-5 * np.sqrt(sum(np.sum(b ** 2) for _, b in pairs))
        validation = [[(r["step"], r["auc"], r["accuracy"], r["slices"]) for r in records(w)
                       if r["split"] == "validation"] for w in (workdir, single)]
        assert len(validation[0]) == len(validation[1]) == 2
        np.testing.assert_array_equal(*(np.array(v, float) for v in validation))
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
        recorded = json.load(open(os.path.join(workdir, "config.json")))
        assert recorded == json.load(open(os.path.join(single, "config.json")))
    result = evaluation.evaluate_run(packed[1], split="validation", samples=20, progress=False)
    assert result["model"] == "vit_tiny_patch4"

    resumed = [str(tmp_path / "resumed" / name) for name in ("a", "b")]

    def packed_step(kwargs):
        assert kwargs["members"] is True

    make_train_step = preempt_at_call(monkeypatch, check=packed_step)
    with pytest.raises(train.StopRequested, match="checkpoint written at step 4"):
        train.train_pack(configs, resumed)
    monkeypatch.setattr(steps, "make_train_step", make_train_step)
    assert all("4" in os.listdir(os.path.join(w, "checkpoints")) for w in resumed)
    train.train_pack(configs, resumed)
    for workdir, again in zip(packed, resumed):
        for a, b in zip(final_params(workdir, 6), final_params(again, 6), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pack_members_and_what_a_pack_refuses(dataset, tmp_path):
    _, data_dir = dataset
    config = tiny_config(data_dir)
    config.input.source = config.input.augment_on = "device"
    configs, workdirs = train.pack_members(config, str(tmp_path / "p"), [
        "optimizer.learning_rate=0.001,3e-4", "seed=0,1"])
    assert [os.path.basename(w) for w in workdirs] == [
        "learning_rate=0.001-seed=0", "learning_rate=0.001-seed=1",
        "learning_rate=0.0003-seed=0", "learning_rate=0.0003-seed=1"]
    assert [(c.optimizer.learning_rate, c.seed) for c in configs] == [
        (1e-3, 0), (1e-3, 1), (3e-4, 0), (3e-4, 1)]
    weighted, _ = train.pack_members(config, str(tmp_path / "p"), [
        "loss.class_weights=true,False", "input.augment.rotate_degrees=5,20"])
    assert [(c.loss.class_weights, c.input.augment.rotate_degrees) for c in weighted] == [
        (True, 5.0), (True, 20.0), (False, 5.0), (False, 20.0)]
    for specs, message in ((["batch_size=4,8"], "cannot vary inside one compiled program"),
                           (["seed=0,x"], "values of seed must be ints"),
                           (["loss.class_weights=yes"], "class_weights must be bools"),
                           (["seed"], "expected KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            train.pack_members(config, str(tmp_path / "p"), specs)
    other = tiny_config(data_dir)
    other.input.source = other.input.augment_on = "device"
    other.batch_size = 8
    with pytest.raises(ValueError, match=r"batch_size differs between members .*\(4, 8\)"):
        train.train_pack([config, other], workdirs[:2])
    off = tiny_config(data_dir)
    off.input.source = off.input.augment_on = "device"
    off.input.augment.rotate_degrees = 0.0
    with pytest.raises(ValueError, match=r"rotate_degrees is 0 \(the step off\) in one member"):
        train.train_pack([config, off], workdirs[:2])
    plain = tiny_config(data_dir)
    with pytest.raises(ValueError, match="set input.source=device"):
        train.train_pack([plain, plain], workdirs[:2])
    with pytest.raises(ValueError, match="share a run folder"):
        train.train_pack(configs[:2], [workdirs[0]] * 2)
    # --member JSON (what launch.sweep --pack writes): the command's run, then each member's
    listed, folders = train.listed_members(config, "a", [json.dumps(
        {"workdir": "b", "config": {"seed": 3, "model.kwargs.dropout": 0.25}})])
    assert folders == ["a", "b"] and (listed[1].seed, listed[1].model.kwargs.dropout) == (3, 0.25)
    assert (listed[0].seed, listed[1].batch_size) == (config.seed, config.batch_size)
    for member, message in (("{", "not JSON"), ('{"config": {}}', "expected"),
                            ('{"workdir": "b", "config": {"no.such": 1}}', "no setting"),
                            ('{"workdir": "b", "config": {"seed": "x"}}', "b: ")):
        with pytest.raises(ValueError, match=message):
            train.listed_members(config, "a", [member])
    assert not (tmp_path / "p").exists()


def test_the_command_line_trains_a_pack_and_refuses_a_key_that_cannot_vary(dataset, tmp_path):
    import subprocess
    import sys

    _, data_dir = dataset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "her2jax.main", "--config", "configs/vit.py:tiny4,runlocal",
               "--workdir", str(tmp_path / "pack"), f"--config.data_dir={data_dir}",
               "--config.batch_size=4", "--config.eval.batch_size=3", "--config.total_steps=2",
               "--config.warmup_steps=1", "--config.input.source=device",
               "--config.input.augment_on=device"]
    done = subprocess.run(command + ["--pack", "seed=0,1"], cwd=root, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in (0, 1):
        workdir = tmp_path / "pack" / f"seed={seed}"
        assert json.loads((workdir / "config.json").read_text())["seed"] == seed
        assert f"[seed={seed}] step 2/2" in done.stderr
        assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    refused = subprocess.run(command + ["--pack", "batch_size=4,8"], cwd=root, text=True,
                             capture_output=True, timeout=600)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --pack batch_size: cannot")
