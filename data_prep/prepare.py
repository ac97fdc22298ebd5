"""Prepare a dataset: `python -m data_prep.prepare --source DIR --data_dir OUT --normalization NAME`.

Reads a BreastDCEDL folder or a manifest, writes the TFDS dataset `her2_dce/<config>` with its
preparation report and QC montage, and prints the dataset path (the last line of the output), which
`tfds.builder_from_directory(path)` opens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from data_prep import normalization  # noqa: E402
from data_prep.errors import BadCaseError  # noqa: E402
from data_prep.params import CROPS, IMAGE_PARAMETERS, PrepParams  # noqa: E402
from her2jax import files  # noqa: E402
from her2jax.errors import BadInput, InvalidSetting, MissingInput, UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = PrepParams()
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="BreastDCEDL folder, manifest CSV, or folder holding manifest.csv")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--normalization", default=defaults.normalization,
                        choices=normalization.names(), help="8-bit strategy (README table)")
    parser.add_argument("--n4", action="store_true", help="N4 bias-field correction first")
    parser.add_argument("--n4_shrink", type=int, default=defaults.n4_shrink)
    parser.add_argument("--n4_iterations", type=_integers, default=defaults.n4_iterations,
                        help="iterations per level, comma separated (default 50,50,50,50)")
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--slices_per_patient", type=int, default=defaults.slices_per_patient,
                        help="central tumour slices per patient; 0 = every tumour slice")
    parser.add_argument("--crop_margin", type=float, default=defaults.crop_margin,
                        help="margin on each side of the tumour box, fraction of its longer side")
    parser.add_argument("--crop", choices=CROPS, default=defaults.crop,
                        help="tumour: a square sized to the tumour box plus --crop_margin (every "
                             "patient its own zoom); fixed: a --crop_size field of view at native "
                             "resolution around the tumour centre (tumour size kept); both then "
                             "resized to --image_size")
    parser.add_argument("--crop_size", default=defaults.crop_size,
                        help="side of the fixed field of view, e.g. 64mm or 96px (default "
                             "%(default)s; --crop fixed only)")
    parser.add_argument("--phases", type=_integers, default=None,
                        help="pre,early,late time-point indices overriding the metadata")
    parser.add_argument("--cohorts", type=_names, default=None,
                        help="cohorts to keep, comma separated (BreastDCEDL: spy1, spy2, duke; "
                             "a manifest: its `cohort` values); default: every cohort, except "
                             "for BreastDCEDL MinCrop: spy1,spy2 (the study's). Part of the "
                             "dataset's config name")
    parser.add_argument("--split_seed", type=int, default=defaults.split_seed)
    parser.add_argument("--external", default=None, metavar="COHORT",
                        help="the whole source is an external validation set with this name")
    parser.add_argument("--fit_from", default=None, metavar="DATASET_DIR",
                        help="reuse the normalisation fitted on this prepared dataset (nyul)")
    parser.add_argument("--like", default=None, metavar="RUN",
                        help="prepare exactly as the training data of this run folder "
                             "(normalisation, N4, size, crop, slices, phases; the normalisation "
                             "fit is taken from its dataset): for external validation")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (patients in parallel)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="record bad cases in the report and go on, instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, nor TFDS's 'Downloading and preparing' lines")
    parser.add_argument("--debug", action="store_true",
                        help="an unexpected error while preparing a patient stops with its "
                             "traceback, instead of becoming that patient's one-line error")
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["HER2JAX_DEBUG"] = "1"     # the worker processes inherit it
    if args.like:
        try:
            apply_like(args, defaults)
        except (UserError, OSError) as error:
            parser.error(str(error))
    return args




def apply_like(args: argparse.Namespace, defaults: PrepParams) -> None:
    """Copies the image parameters of run `args.like`'s training data into `args`; a parameter
    also given on the command line with another value is an error."""
    from her2jax.run_folder import PREPARATION_FILE, RunFolder

    run = RunFolder(args.like)
    if not run.preparation_file.exists():
        raise MissingInput(f"--like {args.like}: not a run folder (no {PREPARATION_FILE})")
    recorded = run.preparation()
    for key in IMAGE_PARAMETERS:
        value = recorded.get(key, getattr(defaults, key))     # absent: recorded before it existed
        value = tuple(value) if isinstance(value, list) else value
        given = getattr(args, key)
        given = tuple(given) if isinstance(given, list) else given
        default = getattr(defaults, key)
        if given != default and given != value:
            raise InvalidSetting(f"--{key} {given!r} contradicts --like {args.like} ({value!r})")
        setattr(args, key, value)
    if normalization.get(args.normalization).needs_fit and not args.fit_from:
        args.fit_from = run.config_dict()["data_dir"]


def _names(text: str) -> tuple[str, ...]:
    names = tuple(sorted({part.strip() for part in text.split(",") if part.strip()}))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated cohort names, got {text!r}")
    return names


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build(args: argparse.Namespace):
    """The command's arguments -> `prepare_dataset`."""
    files.check_folder(args.data_dir, "--data_dir")     # before any patient is read
    params = PrepParams(
        normalization=args.normalization, n4=args.n4, n4_shrink=args.n4_shrink,
        n4_iterations=tuple(args.n4_iterations), image_size=args.image_size,
        slices_per_patient=args.slices_per_patient, crop_margin=args.crop_margin,
        crop=args.crop, crop_size=args.crop_size,
        phases=tuple(args.phases) if args.phases else None, split_seed=args.split_seed,
        external=args.external, fit_from=args.fit_from, cohorts=args.cohorts)
    return prepare_dataset(args.source, args.data_dir, params, workers=args.workers,
                           skip_bad=args.skip_bad, overwrite=args.overwrite,
                           progress=not args.quiet)


def prepare_dataset(source: str, data_dir: str, params: PrepParams, *, workers: int = 1,
                    skip_bad: bool = False, overwrite: bool = False, progress: bool = True):
    """Prepares `source` into `data_dir` with `params`: this command as a library call.

    Returns the TFDS builder; `os.fspath(builder.data_dir)` is the dataset path (equal to
    `params.dataset_path(data_dir)`). An existing dataset of the same settings and source is
    reused unless `overwrite`. Raises a `UserError` for anything the caller can fix, and
    `BadCaseError` for a patient that cannot be prepared (without `skip_bad`).
    """
    from data_prep.sources import locate

    # checked before TFDS starts, which would otherwise write into data_dir first
    manual_dir, manifest = locate(source)
    if params.cohorts and manifest is None and \
            not os.path.isfile(os.path.join(manual_dir, "manifest.csv")):
        from data_prep.sources import breastdcedl

        unknown = sorted(set(params.cohorts) - set(breastdcedl.COHORTS))
        if unknown:
            raise InvalidSetting(f"--cohorts {','.join(params.cohorts)}: {', '.join(unknown)} is "
                                 f"not a BreastDCEDL cohort ({', '.join(breastdcedl.COHORTS)})")
    if "://" in data_dir:
        raise InvalidSetting(f"--data_dir {data_dir}: preparation writes local files "
                             f"(TFRecords, report, QC montage); prepare into a local folder, then "
                             f"copy it (e.g. gcloud storage rsync -r DIR {data_dir})")
    if params.external and normalization.get(params.normalization).needs_fit and \
            not params.fit_from:
        raise InvalidSetting(
            f"--external {params.external}: normalization {params.normalization!r} is fitted on "
            f"the training split and an external set has none; add --fit_from <the prepared "
            f"training dataset> (or --like RUN, which sets it)")

    from data_prep.her2_dce import Her2Dce, config_for
    from her2jax.data.tensorflow_host import tfds

    tfds.disable_progress_bar()  # ours show patients; TFDS's would show examples and shards
    logging.getLogger("absl").setLevel(logging.ERROR)  # "custom data configuration" notices
    builder = Her2Dce(config=config_for(params), data_dir=data_dir, workers=workers,
                      skip_bad=skip_bad, progress=progress, manifest=manifest)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    if not overwrite:
        _check_same_source(os.fspath(builder.data_path),
                           os.path.join(manual_dir, manifest) if manifest else manual_dir)
    new = [path for path in _tfds_paths(builder, data_dir) if not os.path.lexists(path)]
    config_dir = os.path.dirname(os.fspath(builder.data_path))
    try:
        os.makedirs(config_dir, exist_ok=True)
        with _preparing(config_dir, os.fspath(builder.data_path)):
            # TFDS prints its own progress to stdout: keep stdout for the dataset path alone
            with contextlib.redirect_stdout(sys.stderr):
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=manual_dir, download_mode=mode))
    except BaseException as error:
        _remove_left_empty(new)
        failed = _write_failure(error, data_dir)
        if failed:
            raise WriteFailed(f"could not write the dataset into {data_dir}: {failed}; "
                              f"{_free(data_dir)} free there; nothing was kept (the unfinished "
                              "dataset was removed)") from None
        raise
    return builder


class DatasetBusy(UserError):
    """Another process prepares the same dataset."""


class WriteFailed(UserError, OSError):
    """The file system refused a write into --data_dir (full disk, quota, file size limit)."""


LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def _preparing(config_dir: str, dataset: str):
    """Holds CONFIG_DIR/.prepare.lock while the dataset is prepared: a second preparation of the
    same settings into the same --data_dir is refused naming the first; holding it, every
    temporary folder in CONFIG_DIR was left by a preparation that was stopped (SIGKILL, power
    loss) and is removed, saying so."""
    from her2jax import lock

    def busy(holder):
        return DatasetBusy(f"{dataset} is being prepared by another process "
                           f"({lock.describe(holder)}; {os.path.join(config_dir, LOCK_FILE)}): "
                           "wait for it to finish, or stop it")

    with lock.hold(os.path.join(config_dir, LOCK_FILE), busy, remove=True) as held:
        stale = sorted(name for name in os.listdir(config_dir)
                       if name.startswith("incomplete.")
                       and os.path.isdir(os.path.join(config_dir, name)))
        for name in stale:
            shutil.rmtree(os.path.join(config_dir, name), ignore_errors=True)
        if stale:
            by = f" ({lock.describe(held.killed)})" if held.killed else ""
            print(f"removed {len(stale)} unfinished dataset folder(s) left in {config_dir} by a "
                  f"preparation that was stopped{by}: {', '.join(stale)}", file=sys.stderr)
        yield


def _write_failure(error: BaseException, data_dir: str) -> str | None:
    """What the file system said, when `error` (or an error that caused it) is a refused write
    of a file inside `data_dir`: an OSError naming such a file, or TensorFlow's error for a
    TFRecord file there (TFDS re-raises it as another type)."""
    root = os.path.realpath(data_dir)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename:
            if _inside(os.fspath(error.filename), root):
                return f"{error.strerror or error} ({error.filename})"
        elif type(error).__module__.startswith("tensorflow") and hasattr(error, "message"):
            path, _, reason = str(error.message).partition("; ")
            if reason and _inside(path, root):
                return f"{reason} ({path})"
        error = error.__cause__ or error.__context__
    return None


def _inside(path: str, root: str) -> bool:
    path = os.path.realpath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _free(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path or ".").free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:,.1f} MiB"


def _check_same_source(dataset: str, source: str) -> None:
    """A finished dataset of the same settings is reused only if it came from the same source
    (the config name holds the settings, not the source)."""
    path = os.path.join(dataset, "metadata.json")
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        used = (json.load(handle).get("source") or {}).get("path")
    if used and os.path.normpath(used) != os.path.normpath(source):
        raise BadInput(f"{dataset} holds a dataset prepared with these settings from {used}, "
                       f"not from {source}: use another --data_dir, or --overwrite to "
                       f"replace it")


def _tfds_paths(builder, data_dir: str) -> list[str]:
    """What TFDS creates in `data_dir` before it writes any example, deepest first."""
    version = os.fspath(builder.data_path)            # data_dir/her2_dce/<config>/<version>
    config = os.path.dirname(version)
    dataset = os.path.dirname(config)
    return [version, config, os.path.join(dataset, ".config", "metadata.json"),
            os.path.join(dataset, ".config"), dataset,
            os.path.join(data_dir, "downloads", "extracted"), os.path.join(data_dir, "downloads"),
            data_dir]


def _remove_left_empty(new: list[str]) -> None:
    """After a failure: removes the folders of `new` (paths this run created) that are left empty,
    and TFDS's default-config note `her2_dce/.config/metadata.json` when it created `.config`."""
    for path in new:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)                                      # fails unless empty
            elif path.endswith(os.path.join(".config", "metadata.json")) and \
                    os.path.dirname(path) in new:
                os.remove(path)
        except OSError:
            pass


class Stopped(KeyboardInterrupt):
    """SIGTERM, SIGHUP or Ctrl-C, raised where the main thread is, as a KeyboardInterrupt:
    every `with` and `finally` on the way out runs (the workers end, the unfinished dataset
    folder is removed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stops_cleanly() -> Iterator[None]:
    """SIGTERM, SIGHUP and Ctrl-C stop the preparation; once stopping, further signals are
    ignored so that the clean-up finishes."""
    def stop(signum, frame):
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with _stops_cleanly():
            builder = build(args)
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"stopped by {signal.Signals(signum).name}: the worker processes ended and the "
              f"unfinished dataset was removed from {args.data_dir}", file=sys.stderr)
        return 128 + int(signum)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, BadCaseError):
            print("(use --skip_bad to record such cases and go on)", file=sys.stderr)
        return 1
    metadata = builder.info.metadata
    skipped = metadata.get("skipped", [])
    splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
    excluded = metadata.get("excluded_counts") or {}
    source = metadata.get("source") or {}
    read = "BreastDCEDL MinCrop" if source.get("release") == "mincrop" else source.get("kind")
    print(f"read {read} ({', '.join(metadata.get('cohorts') or [])}); slices per split: "
          f"{splits}; skipped patients: {len(skipped)}; excluded rows: "
          f"{sum(excluded.values())}"
          + (f" ({'; '.join(f'{n} {reason}' for reason, n in excluded.items())})"
             if excluded else ""), file=sys.stderr)
    print(os.fspath(builder.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
