"""Training and evaluation, one function read top to bottom: `train_and_evaluate(config, workdir)`.

Sections: set up (config checks, mesh, relaunch check) | model and optimiser | steps | checkpoints
(run folder, dataset check, resume) | evaluation | train loop. Data parallel: parameters replicated,
batches sharded over a ('data',) mesh of every device of every process. Several processes
(`her2jax.distributed`) each read their share of the data; evaluation gathers every process's slices
before the patient-level metrics, so every process holds the same report (and agrees on the best
checkpoint); only process 0 writes logs, every process writes its checkpoint shards.

`RunFolder(workdir).restore(checkpoint)` (run_folder.py) loads a trained model back.
"""
from __future__ import annotations

import json
import math
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from her2jax import distributed, files, models
from her2jax.analysis import metrics
from her2jax.data import pipeline as input_pipeline
from her2jax.data import records, resident
from her2jax.data.augment_options import AUGMENT_ON, Augment
from her2jax.data.sampling import BALANCE_MODES
from her2jax.errors import BadInput, InvalidSetting, TrainingDiverged
from her2jax.models import weights
from her2jax.models.layers import dropout_rates
from her2jax.run_folder import RunFolder
from her2jax.training import inference, optim, steps
from her2jax.training.losses import class_weights_from_counts
from her2jax.training.optim import learning_rate_schedule
from her2jax.training.pack_keys import PACK_KEYS, augment_steps_on
from her2jax.training.run_log import RunLog

DTYPES = ("float32", "bfloat16")
# Keys a relaunch in the same run folder may change: how long to train (extending a run; the
# learning-rate schedule follows the new length from the checkpoint on, see README "Training"),
# how often to log, evaluate and checkpoint, how evaluation is batched, where the dataset is (its
# preparation is checked apart), ViT's attention kernel and a pack's member layout and device
# layout (the same function, computed another way). Any other
# difference makes another experiment, refused by `check_relaunch`.
RELAUNCH_KEYS = frozenset({
    "total_steps", "warmup_steps", "warmup_fraction", "log_every_steps", "eval.every_steps",
    "eval.batch_size",
    "checkpoint.every_steps", "checkpoint.keep", "data_dir", "model.kwargs.attention_kernel",
    "pack_layout", "pack_devices"})
# Keys added after runs may have started, with the value that does what those runs did: absent
# from a run's config.json and at this value, a key is no difference.
ADDED_KEYS = {"input.augment_on": "host", "input.source": "tfrecord", "pack_layout": "auto",
              "pack_devices": "auto", "warmup_fraction": 0.05}
PACK_DEVICES = ("auto", "data", "members")


class ConfigChanged(InvalidSetting):
    """A relaunch with a config that differs outside RELAUNCH_KEYS; `changes` lists each
    refused difference as 'key old -> new'."""

    def __init__(self, workdir: Any, changes: list[str], recorded: Any):
        self.changes = changes
        super().__init__(f"{workdir} was started with a different config ({'; '.join(changes)});"
                         f" use another --workdir, or relaunch with the config recorded in "
                         f"{recorded}")


class StopRequested(Exception):
    """Raised inside the loop after SIGTERM (or a first Ctrl-C), once a checkpoint is safely
    written; `exit_code` is the shell's code for that signal (143, 130)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses values that would otherwise fail only after training steps and checkpoints."""
    flat = _flat(config.to_dict())
    choices = {"model.name": models.names(), "dtype": DTYPES,
               "eval.aggregation": metrics.AGGREGATIONS, "input.balance": BALANCE_MODES,
               "input.augment_on": AUGMENT_ON, "pack_layout": steps.MEMBER_LAYOUTS,
               "pack_devices": PACK_DEVICES}
    for key, valid in choices.items():
        value = flat.get(key, ADDED_KEYS.get(key))
        if value not in valid:
            raise InvalidSetting(f"config.{key} {value!r} is not one of: {', '.join(valid)}")
    for key in ("batch_size", "total_steps", "log_every_steps", "eval.every_steps",
                "eval.batch_size", "checkpoint.every_steps", "checkpoint.keep",
                "optimizer.accumulation_steps"):
        if flat[key] < 1:
            raise InvalidSetting(f"config.{key} must be at least 1, got {flat[key]}")
    resident.check_source(config.input.source, config.input.augment_on)
    if config.warmup_steps >= 0 and not config.warmup_steps < config.total_steps:
        raise InvalidSetting(f"config.warmup_steps ({config.warmup_steps}) must be in "
                             f"[0, total_steps ({config.total_steps})), or -1 for "
                             f"warmup_fraction of the run")
    if config.warmup_steps < -1 or not 0 <= config.get("warmup_fraction", 0.05) < 1:
        raise InvalidSetting(f"config.warmup_steps ({config.warmup_steps}) must be -1 (warm up "
                             f"for warmup_fraction of the run) or a number of steps, and "
                             f"warmup_fraction ({config.get('warmup_fraction')}) in [0, 1)")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_relaunch(run: RunFolder, config: ml_collections.ConfigDict
                   ) -> dict[str, list[Any]]:
    """Compares `config` with the run folder's config.json (written by an earlier launch):
    refuses a difference outside RELAUNCH_KEYS, returns the allowed ones {key: [old, new]}.
    Reads only: nothing is written before this check."""
    path = run.config_file
    if not path.exists():
        return {}
    old = _flat(json.loads(path.read_text(encoding="utf-8")))
    new = _flat(json.loads(config.to_json()))   # tuples as JSON lists, as recorded
    for key, value in ADDED_KEYS.items():
        if key not in old and new.get(key) == value:
            old[key] = value
    changed = {k: [old.get(k, _ABSENT), new.get(k, _ABSENT)] for k in sorted(set(old) | set(new))
               if old.get(k, _ABSENT) != new.get(k, _ABSENT)}
    refused = [k for k in changed if k not in RELAUNCH_KEYS]
    if refused:
        raise ConfigChanged(run.path, [_change(k, *changed[k]) for k in refused], path)
    return {k: [None if v is _ABSENT else v for v in pair] for k, pair in changed.items()}


_ABSENT = object()


def _change(key: str, old: Any, new: Any) -> str:
    def show(value: Any) -> str:
        return "(absent)" if value is _ABSENT else json.dumps(value)

    return f"{key} {show(old)} -> {show(new)}"


def check_dataset(run: RunFolder, metadata: dict[str, Any]) -> None:
    """Records the dataset's preparation in the run folder; refuses a different one on resume."""
    path = run.preparation_file
    preparation = metadata.get("preparation", {})

    def compare() -> None:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != preparation:
            changed = sorted(k for k in set(recorded) | set(preparation)
                             if recorded.get(k) != preparation.get(k))
            raise BadInput(f"{run.path} was started on data prepared differently ({changed}); "
                           f"use another --workdir or the original dataset")

    if jax.process_index() == 0:
        if path.exists():
            compare()
        else:
            files.write_json(path, preparation, indent=2, sort_keys=True)
    if jax.process_count() > 1:  # the others read what process 0 found or wrote
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("her2jax: preparation recorded")
        if jax.process_index() != 0:
            compare()


def evaluate(predictor: inference.Predictor, config: ml_collections.ConfigDict, split: str,
             step: int | None = None, on_device: resident.EvalSplit | None = None
             ) -> dict[str, Any]:
    """Patient-level metrics on `split`: every slice exactly once (the last batch is padded),
    read from the TFRecords or, with `on_device`, from the split resident on the devices.
    NaN/inf outputs (diverged parameters, though the loss logged was finite) stop the run."""
    if on_device is not None:
        rows = on_device.probabilities(predictor)
    else:
        rows = predictor.split(config.data_dir, split, batch_size=config.eval.batch_size)
    if not np.isfinite(rows["probability"]).all():
        raise TrainingDiverged(
            f"the model's outputs on {split} are NaN/inf"
            + (f" at step {step}" if step is not None else "")
            + ": its parameters diverged; lower the learning rate, check the data, or resume "
              "from an earlier checkpoint")
    return metrics.patient_report(rows["patient_id"], rows["probability"], rows["label"],
                                  method=config.eval.aggregation)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the last
    validation report."""
    return train_pack([config], [workdir])[0]


def check_pack(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> None:
    """Refuses members that differ outside PACK_KEYS (naming the first such key), the TFRecord
    source, and two members in one run folder."""
    if len({str(RunFolder(w).path) for w in workdirs}) < len(workdirs):
        raise InvalidSetting("two members of the pack share a run folder")
    if configs[0].input.source != "device":
        raise InvalidSetting("a pack draws its members' batches on the device: set "
                             "input.source=device and input.augment_on=device")
    first = _flat(json.loads(configs[0].to_json()))
    for config in configs[1:]:
        other = _flat(json.loads(config.to_json()))
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key) and key not in PACK_KEYS:
                raise InvalidSetting(
                    f"{key} differs between members of the pack ({first.get(key)!r}, "
                    f"{other.get(key)!r}): it cannot vary inside one compiled program; only "
                    f"{', '.join(PACK_KEYS)} can")
        for (key, on), (_, other_on) in zip(augment_steps_on(first), augment_steps_on(other)):
            if on != other_on:
                raise InvalidSetting(
                    f"{key} is 0 (the step off) in one member of the pack and "
                    f"{first[key] or other[key]!r} in another: an augmentation step on in one "
                    f"member is on in all of them (the magnitudes may differ)")


def spread_members(choice: str, members: int, devices: int) -> bool:
    """Whether a pack of `members` spreads them over the `devices` (a ('member', 'data') mesh)
    rather than splitting each member's batch over all of them: `pack_devices` "members" or
    "auto", which spreads where one process holds several devices and the counts share a
    divisor, since a small member's batch split over many devices leaves each a few images and
    every step all-reduces every member's gradients."""
    if members < 2 or devices < 2 or choice == "data":
        return False
    if jax.process_count() > 1:
        if choice == "members":
            raise InvalidSetting("pack_devices=members spreads a pack over the devices of one "
                                 "process; with several processes use pack_devices=data")
        return False
    return choice == "members" or math.gcd(members, devices) > 1


def pack_members(config: ml_collections.ConfigDict, workdir: str, specs: list[str]
                 ) -> tuple[list[ml_collections.ConfigDict], list[str]]:
    """The members of `--pack KEY=V1,V2,...` (each flag one key; members are the product of the
    flags, in order): their configs and run folders WORKDIR/<key>=<value>-... (the last part of
    each key, e.g. learning_rate=0.001-seed=1)."""
    import copy
    import itertools

    axes = []
    for spec in specs:
        key, equals, values = spec.partition("=")
        key = key.strip().removeprefix("config.")
        if not equals or not values.strip():
            raise InvalidSetting(f"--pack {spec!r}: expected KEY=VALUE,VALUE,...")
        if key not in PACK_KEYS:
            raise InvalidSetting(f"--pack {key}: cannot vary inside one compiled program; "
                                 f"one of {', '.join(PACK_KEYS)}")
        kind = type(_flat(config.to_dict()).get(key, 0.0))
        try:
            axes.append((key, [_parse(kind, value.strip()) for value in values.split(",")]))
        except ValueError:
            raise InvalidSetting(f"--pack {spec!r}: values of {key} must be {kind.__name__}s")\
                from None
    if len({key for key, _ in axes}) < len(axes):
        raise InvalidSetting("--pack: a key given twice")
    configs, workdirs = [], []
    for values in itertools.product(*[values for _, values in axes]):
        member = copy.deepcopy(config)
        member.update_from_flattened_dict(dict(zip([key for key, _ in axes], values)))
        configs.append(member)
        name = "-".join(f"{key.rpartition('.')[2]}={value:g}" if isinstance(value, float)
                        else f"{key.rpartition('.')[2]}={value}"
                        for (key, _), value in zip(axes, values))
        workdirs.append(str(RunFolder(workdir).path / name))
    return configs, workdirs


def _parse(kind: type, text: str) -> Any:
    """A --pack value as the config's type; booleans from true/false (1/0)."""
    if kind is bool:
        words = {"true": True, "1": True, "false": False, "0": False}
        if text.lower() not in words:
            raise ValueError(text)
        return words[text.lower()]
    return kind(text)


def listed_members(config: ml_collections.ConfigDict, workdir: str, members: list[str]
                   ) -> tuple[list[ml_collections.ConfigDict], list[str]]:
    """The members of `--member JSON ...`: `config` in `workdir` first, then one member per JSON
    object {"workdir": RUN, "config": {KEY: VALUE, ...}}, `config` with those keys changed."""
    import copy

    configs, workdirs = [config], [workdir]
    for text in members:
        try:
            member = json.loads(text)
        except ValueError as error:
            raise InvalidSetting(f"--member {text!r}: not JSON ({error})") from None
        if not isinstance(member, dict) or not isinstance(member.get("workdir"), str) or \
                not isinstance(member.get("config", {}), dict) or \
                set(member) - {"workdir", "config"}:
            raise InvalidSetting(f"--member {text!r}: expected {{\"workdir\": RUN, \"config\": "
                                 f"{{KEY: VALUE, ...}}}}")
        changed = copy.deepcopy(config)
        flat = _flat(config.to_dict())
        for key, value in member.get("config", {}).items():
            if key not in flat:
                raise InvalidSetting(f"--member {member['workdir']}: no setting {key!r}")
        try:
            changed.update_from_flattened_dict(member.get("config", {}))
        except (TypeError, ValueError) as error:
            raise InvalidSetting(f"--member {member['workdir']}: {error}") from None
        configs.append(changed)
        workdirs.append(member["workdir"])
    return configs, workdirs


def train_pack(configs: list[ml_collections.ConfigDict], workdirs: list[str]
               ) -> list[dict[str, Any]]:
    """Trains K runs, `configs[k]` in `workdirs[k]`, and returns each one's last validation
    report. K = 1 is one run; K > 1 a pack: one compiled step trains every member (parameters,
    optimiser states and hyper-parameters stacked on a member axis), members differing only in
    PACK_KEYS (`check_pack`). Every member has an ordinary run folder and resumes from it."""
    # ------------------------------------------------------------------ set up
    # every check comes before the first write: a refused launch leaves the run folder as it was
    for config in configs:
        check_config(config)
    for workdir in workdirs:
        files.check_folder(workdir, "--workdir")
    packed = len(configs) > 1
    if packed:
        check_pack(configs, workdirs)
    config = configs[0]          # the settings every member shares
    runs = [RunFolder(workdir) for workdir in workdirs]
    mesh = steps.data_mesh()
    # the train step's mesh: members spread over the devices, or each member over all of them
    spread = spread_members(config.get("pack_devices", "auto"), len(configs), mesh.size)
    step_mesh = steps.member_mesh(len(configs)) if spread else mesh
    if config.batch_size % mesh.size:
        raise InvalidSetting(f"batch_size {config.batch_size} does not split over {mesh.size} "
                             "devices")
    metadata = input_pipeline.preparation_metadata(config.data_dir)
    builder = input_pipeline.open_dataset(config.data_dir)
    for key in ("train_split", "eval_split"):
        input_pipeline.require_split(builder, config[key], f"config.{key}")
    changes = [check_relaunch(run, member) for run, member in zip(runs, configs)]
    layout = None
    if config.input.source == "device":    # refused here, before anything is read or written
        layout = resident.choose_layout(
            resident.split_bytes(config.data_dir, config.train_split),
            resident.split_bytes(config.data_dir, config.eval_split), mesh.size,
            min(resident.free_bytes(device) for device in mesh.local_devices))

    # ------------------------------------------------------------------ models and optimiser
    states, pretrained, rates = [], [], []
    for member in configs:
        model = models.from_config(member, metadata["preparation"]["image_size"])  # checks kwargs
        pretrained.append(weights.load_pretrained(model, member.init.pretrained)
                          if member.init.pretrained else None)
        rates.append(dropout_rates(model))
        train_graph, eval_graph, params, rest = steps.split_model(model)
        states.append({"params": params, "rest": rest})
    # the learning rate, weight decay, betas, label smoothing and dropout rate are arguments of
    # the compiled step: runs that differ only in them (a learning-rate sweep, a pack) share one
    # executable
    hypers = [{key: np.float32(value) for key, value in optim.hyperparameters(member).items()}
              for member in configs]
    if all(len(rate) == 1 for rate in rates):
        for hyper, (rate,) in zip(hypers, rates):
            hyper["dropout_keep"] = np.float32(1.0 - rate)     # as nnx.Dropout rounds it
    elif packed and len({frozenset(rate) for rate in rates}) > 1:
        raise InvalidSetting("model.kwargs.dropout differs between members of the pack, but the "
                             "model has dropout modules of several rates: it cannot vary")
    optimizer = optim.factory(config, states[0]["params"])
    for state, hyper in zip(states, hypers):
        state["opt_state"] = optimizer(hyper).init(state["params"])
    schedules = [learning_rate_schedule(member.optimizer.learning_rate, optim.warmup_of(member),
                                        member.total_steps) for member in configs]
    class_weights = None
    if any(member.loss.class_weights for member in configs):
        # from what the sampler draws, not from the split: balancing never counts twice
        counts = records.sampled_class_counts(config.data_dir, config.train_split,
                                              config.input.balance)
        class_weights = jnp.asarray(class_weights_from_counts(counts))
    if packed:
        # a pack's members differ in their class weights (ones: unweighted, the same loss bit
        # for bit) and augmentation magnitudes: arguments of the step, like the hyper-parameters
        for member, hyper in zip(configs, hypers):
            if class_weights is not None:
                hyper["class_weights"] = (np.asarray(class_weights) if member.loss.class_weights
                                          else np.ones(class_weights.shape, np.float32))
            if member.input.augment_on == "device":
                magnitudes = Augment.from_mapping(member.input.augment.to_dict()).magnitudes()
                hyper.update({f"augment_{key}": np.float32(value)
                              for key, value in magnitudes.items()})
        class_weights = None

    # ------------------------------------------------------------------ steps
    dtype = jnp.dtype(config.dtype)
    on_device = config.input.augment_on == "device"
    train_step = steps.make_train_step(
        train_graph, optimizer, step_mesh, dtype=dtype, class_weights=class_weights,
        augment=Augment.from_mapping(config.input.augment.to_dict()) if on_device else None,
        members=packed, member_layout=config.pack_layout)
    predictor = inference.Predictor(steps.make_eval_step(eval_graph, mesh, dtype=dtype),
                                    None, None, mesh)

    # ------------------------------------------------------------------ data on the devices
    streams, on_device_eval = [], None
    if layout is not None:
        train_split = resident.read_split(config.data_dir, config.train_split)
        streams = [resident.train_stream(train_split, mesh, global_batch_size=config.batch_size,
                                         seed=member.seed, balance=config.input.balance,
                                         layout=layout) for member in configs]
        on_device_eval = resident.eval_split(
            resident.read_split(config.data_dir, config.eval_split), mesh,
            inference.padded_batch_size(config.eval.batch_size, mesh.size))

    # ------------------------------------------------------------------ checkpoints
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    managers, logs, start_steps = [], [], []
    for run in runs:
        run.path.mkdir(parents=True, exist_ok=True)
        check_dataset(run, metadata)
        managers.append(run.managers(config.checkpoint.keep))
        start_steps.append(managers[-1][0].latest_step() or 0)
    if len(set(start_steps)) > 1:
        raise InvalidSetting(
            "the members of the pack stopped at different steps (" + ", ".join(
                f"{run.path}: {step}" for run, step in zip(runs, start_steps))
            + "); resume each alone to the same step, or start the pack in new run folders")
    start_step = start_steps[0]
    if start_step > config.total_steps:
        raise InvalidSetting(f"{runs[0].path} has a checkpoint at step {start_step}, past "
                             f"total_steps {config.total_steps}; set "
                             f"--config.total_steps={start_step} or more")
    for run, member, member_changes, member_pretrained in zip(runs, configs, changes, pretrained):
        log = RunLog(run.path, config.total_steps, enabled=jax.process_index() == 0,
                     label=f"[{run.path.name}] " if packed else "")
        logs.append(log)
        log.write_config(member)
        log.launch(start_step, member_changes)
        if member_pretrained:
            log.message(f"pretrained {member.init.pretrained}: {member_pretrained.summary()}")
    if layout is not None:
        logs[0].message(f"data on the devices ({layout}): the train and {config.eval_split} "
                        "splits" + (f", {len(configs)} runs in one step" if packed else ""))
    if jax.process_count() > 1:
        logs[0].message(f"data parallel over {jax.device_count()} devices in "
                        f"{jax.process_count()} processes")
    states = [distributed.replicate(state, mesh) for state in states]
    if start_step:
        # restored onto this run's mesh, whatever number of devices wrote it
        for k, (latest, _) in enumerate(managers):
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=replicated), states[k])
            states[k] = latest.restore(start_step, args=ocp.args.StandardRestore(target))
            logs[k].message(f"resumed from step {start_step}")
    member_batches = jax.sharding.NamedSharding(
        step_mesh, jax.sharding.PartitionSpec("member", "data")) if spread else None
    if packed:
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        hyper = distributed.replicate(jax.tree.map(lambda *xs: np.stack(xs), *hypers), mesh)
        if spread:
            on_rows = jax.sharding.NamedSharding(step_mesh, jax.sharding.PartitionSpec("member"))
            state, hyper = jax.device_put((state, hyper), on_rows)
            logs[0].message(f"members spread over the devices: {step_mesh.shape['member']} "
                            f"rows of {step_mesh.shape['data']} (pack_devices=members)")
    else:
        state, hyper = states[0], distributed.replicate(hypers[0], mesh)

    def member_state(k: int) -> dict[str, Any]:
        return jax.tree.map(lambda x: x[k], state) if packed else state

    def save(step: int) -> None:
        for k, (latest, _) in enumerate(managers):
            latest.save(step, args=ocp.args.StandardSave(member_state(k)), force=True)

    stop: dict[str, Any] = {"requested": None}     # the signal that asked to stop
    several = jax.process_count() > 1
    if several:
        # jax.distributed's preemption notifier owns SIGTERM; all processes stop at one step
        from jax.experimental.multihost_utils import reached_preemption_sync_point
    else:
        def request_stop(signum, frame):
            if stop["requested"] == signal.SIGINT and signum == signal.SIGINT:
                raise KeyboardInterrupt      # a second Ctrl-C: stop now, without a checkpoint
            stop["requested"] = signum

        previous_handlers = {signum: signal.signal(signum, request_stop)
                             for signum in (signal.SIGTERM, signal.SIGINT)}

    # ------------------------------------------------------------------ train loop
    iterator = None if streams else input_pipeline.train_iterator(
        config.data_dir, split=config.train_split, global_batch_size=config.batch_size,
        seed=config.seed, augment=config.input.augment.to_dict(), balance=config.input.balance,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step, augment_on=config.input.augment_on)

    def next_batch(step: int) -> dict[str, jax.Array]:
        if not streams:
            return input_pipeline.to_global(next(iterator), mesh)
        if not packed:
            return streams[0].batch(step - 1)
        batches = [stream.batch(step - 1) for stream in streams]
        batch = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        return jax.device_put(batch, member_batches) if spread else batch

    reports: list[dict[str, Any]] = [{} for _ in configs]
    pending: list[dict[str, jax.Array]] = []
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            params, rest, opt_state, step_metrics = train_step(
                state["params"], state["rest"], state["opt_state"], next_batch(step), hyper)
            state = {"params": params, "rest": rest, "opt_state": opt_state}
            pending.append(step_metrics)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                fetched = jax.device_get(pending)
                for k, log in enumerate(logs):
                    mine = [jax.tree.map(lambda x: x[k], m) for m in fetched] if packed \
                        else fetched
                    with _member_named(runs[k] if packed else None):
                        log.train(step, mine, float(schedules[k](step - 1)), config.batch_size)
                pending = []
            if step % config.eval.every_steps == 0 or step == config.total_steps:
                for k, (log, (_, best)) in enumerate(zip(logs, managers)):
                    mine = member_state(k)
                    with _member_named(runs[k] if packed else None):
                        reports[k] = evaluate(predictor.with_state(mine["params"], mine["rest"]),
                                              config, config.eval_split, step, on_device_eval)
                    log.evaluation(step, config.eval_split, reports[k])
                    if np.isfinite(reports[k]["auc"]):
                        best.save(step, args=ocp.args.StandardSave(mine),
                                  metrics={"patient_auc": reports[k]["auc"]}, force=True)
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                save(step)
            if stop["requested"] or (several and reached_preemption_sync_point(step)):
                save(step)
                signum = stop["requested"] or signal.SIGTERM
                raise StopRequested(f"{signal.Signals(signum).name}: checkpoint written at step "
                                    f"{step}; the same command resumes", signum)
    finally:
        if not several:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        for (latest, best), log in zip(managers, logs):
            latest.wait_until_finished()
            best.wait_until_finished()
            log.close()
    return reports


class _member_named:
    """Puts the member's run folder before a TrainingDiverged raised inside (packs only)."""

    def __init__(self, run: RunFolder | None):
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if self.run is not None and isinstance(error, TrainingDiverged):
            raise TrainingDiverged(f"{self.run.path}: {error}") from None
        return False
