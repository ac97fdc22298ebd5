"""The TFDS builder `her2_dce`: one TFRecord example per tumour slice.

Each BuilderConfig is one preparation variant (`PrepParams`); its name is
`<normalization>[_n4][_<hash of other settings>]`. `manual_dir` is the source (BreastDCEDL folder or
folder holding manifest.csv), or the folder of the manifest CSV named by the builder's `manifest`
(TFDS wants a folder). Splits come from the source (BreastDCEDL `test` column, manifest `split`
column), otherwise from a seeded patient-level split stratified by label. TFDS writes into a
temporary `*.incomplete*` folder and renames it only at the end, so an interrupted preparation
never leaves a dataset that looks complete; the report and QC montage are written inside that
folder too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import tempfile
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

import data_prep
from data_prep import normalization, pipeline, report, splits, volumes
from data_prep.errors import BadCaseError
from data_prep.params import DATASET_VERSION, PrepParams
from data_prep.sources import Case, list_cases
from her2jax.data.tensorflow_host import tfds
from her2jax.errors import BadInput, InvalidSetting, MissingInput

LABEL_NAMES = ("HER2-", "HER2+")
QC_SAMPLES_PER_CLASS = 6


@dataclasses.dataclass(eq=False)
class Her2DceConfig(tfds.core.BuilderConfig):
    params: PrepParams = dataclasses.field(default_factory=PrepParams)


def make_config(params: PrepParams) -> Her2DceConfig:
    return Her2DceConfig(name=params.config_name(), params=params,
                         description=f"her2_dce prepared with {params.to_dict()}")


def config_for(params: PrepParams) -> Her2DceConfig | str:
    """The registered config's name when `params` is one of them (TFDS refuses a second object of
    the same name), else a new config."""
    registered = {config.name: config for config in Her2Dce.BUILDER_CONFIGS}
    match = registered.get(params.config_name())
    return match.name if match is not None and match.params == params else make_config(params)


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset that exists only where it is prepared.

    TFDS looks up pre-computed metadata for a dataset it does not find on disk in its public
    bucket, and leaves an empty temporary folder behind each time (`initialize_from_bucket`);
    her2_dce is never there, so the lookup is skipped.
    """

    def initialize_from_bucket(self) -> None:
        return None


class Her2Dce(tfds.core.GeneratorBasedBuilder):
    """Breast DCE-MRI tumour slices as 8-bit RGB (R = pre, G = early, B = late) with HER2 labels."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config(PrepParams(normalization=name)) for name in normalization.names()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at a BreastDCEDL folder (metadata CSV + NIfTI files) or a manifest CSV. "
        "`python -m data_prep.synthetic --out DIR` writes a synthetic cohort in that layout.")

    def __init__(self, *, workers: int = 1, skip_bad: bool = False, progress: bool = True,
                 manifest: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.manifest = manifest    # a manifest CSV's file name in manual_dir, or None
        self.workers = max(1, workers)
        self.skip_bad = skip_bad
        self.progress = progress
        self.skipped: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.written: set[str] = set()
        self.case_notes: dict[str, list[str]] = {}   # per patient, from the write pass
        self.qc_samples: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
        self._pool: concurrent.futures.Executor | None = None
        self._spill_dir: str | None = None   # the fit pass's output for the write pass

    @property
    def params(self) -> PrepParams:
        return self.builder_config.params

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.params.image_size
        metadata = self.get_metadata()
        described = {key: value for key, value in (("description", metadata.description),
                                                   ("citation", metadata.citation)) if value}
        return LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
                "patient_id": tfds.features.Text(),
                "slice_index": tfds.features.Scalar(dtype=np.int32),
                "cohort": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
            **described,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = os.fspath(dl_manager.manual_dir)
        if self.manifest:
            source = os.path.join(source, self.manifest)
        listing = list_cases(source, self.params)
        for problem in listing.problems:
            self._reject(problem)
        self.notes.extend(listing.notes)
        if not listing.cases:
            left_out = "; ".join(f"{n} {reason}" for reason, n in listing.excluded_counts().items())
            raise BadInput(f"no patient to prepare in {source}"
                           + (f" (excluded: {left_out})" if left_out else ""))
        by_split = splits.assign(listing.cases, self.params)
        fitted = self._fit_normalization(by_split.get("train", []))
        self.info.metadata.update({
            "preparation": self.params.to_dict(),
            "source": {"path": source, "kind": listing.kind, "release": listing.release,
                       "layout": listing.layout},
            "cohorts": sorted({c.cohort for c in listing.cases}),
            "excluded": listing.excluded,
            "excluded_counts": listing.excluded_counts(),
            "code_version": data_prep.code_version(),
            "normalization_fit": fitted,
            "split_rule": splits.describe(listing.cases, self.params),
            "patients": {name: sorted(c.patient_id for c in cases)
                         for name, cases in by_split.items()},
            "files": {c.patient_id: [os.path.basename(p) for p in c.phases] +
                      [os.path.basename(c.mask) if c.mask else None] for c in listing.cases},
        })
        if listing.phase_rules:
            self.info.metadata["phase_rules"] = {c.patient_id: listing.phase_rules[c.patient_id]
                                                 for c in listing.cases}
        return {name: self._generate_examples(name, cases, fitted)
                for name, cases in by_split.items() if cases}

    def _reject(self, error: BadCaseError) -> None:
        if not self.skip_bad:
            raise error
        if error.as_record() in self.skipped:  # a training case that failed the fit fails again
            return
        self.skipped.append(error.as_record())
        if self.progress:
            tqdm.write(f"skipped: {error}")

    def _fit_normalization(self, train_cases: list[Case]) -> dict | None:
        strategy = normalization.get(self.params.normalization)
        if self.params.fit_from:
            if not strategy.needs_fit:
                raise InvalidSetting(f"--fit_from: normalization {strategy.name!r} learns nothing")
            return fit_from_dataset(self.params.fit_from, strategy.name)
        if not strategy.needs_fit:
            return None
        # in patient order, not in the order workers finish: the fit must not depend on timing
        results = sorted(self._run(pipeline.summarize_case, train_cases,
                                   f"fit {strategy.name} (train)", self._spill_dir),
                         key=lambda item: item[0].patient_id)
        summaries = [summary for _, summary in results]
        if not summaries:
            raise InvalidSetting(f"normalization {strategy.name!r} is fitted on the training "
                                 f"split, but no training patient could be read")
        return strategy.fit(summaries)

    def _run(self, function, cases: list[Case], description: str, *extra) -> Iterator:
        """Yields (case, result) as workers finish; bad cases are raised or recorded."""
        bar = tqdm(total=len(cases), desc=description, unit="patient", disable=not self.progress)
        with bar:
            for case, outcome in _map(function, cases, (self.params,) + extra, self._pool):
                bar.update(1)
                if isinstance(outcome, BadCaseError):
                    self._reject(outcome)
                else:
                    yield case, outcome

    def _generate_examples(self, split: str, cases: list[Case], fitted: dict | None):
        for case, prepared in self._run(pipeline.prepare_case, cases, split, fitted,
                                        self._spill_dir):
            self.counts[(split, LABEL_NAMES[case.label], case.cohort, "patients")] += 1
            self.written.add(case.patient_id)
            if prepared.notes:
                self.case_notes[case.patient_id] = prepared.notes
            for item in prepared.slices:
                self.counts[(split, LABEL_NAMES[case.label], case.cohort, "slices")] += 1
                example = {"image": item.image, "mask": item.mask, "label": case.label,
                           "patient_id": case.patient_id, "slice_index": item.slice_index,
                           "cohort": case.cohort}
                self._keep_for_qc(example)
                yield f"{case.patient_id}/{item.slice_index}", example

    def _keep_for_qc(self, example: dict[str, Any]) -> None:
        """Keeps the lowest slice of the QC_SAMPLES_PER_CLASS smallest patient IDs per class:
        the montage does not depend on the order in which workers finish."""
        kept = self.qc_samples[example["label"]]
        same = [k for k in kept if k["patient_id"] == example["patient_id"]]
        if same and same[0]["slice_index"] <= example["slice_index"]:
            return
        if same:
            kept.remove(same[0])
        kept.append(example)
        kept.sort(key=lambda k: (k["patient_id"], k["slice_index"]))
        del kept[QC_SAMPLES_PER_CLASS:]

    # TFDS prints "Downloading and preparing dataset ..." and "Dataset ... downloaded and prepared
    # to ..." (print, not logging): progress lines, left out with progress=False (--quiet)
    def _log_download_bytes(self) -> None:
        if self.progress:
            super()._log_download_bytes()

    def _log_download_done(self) -> None:
        if self.progress:
            super()._log_download_done()

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        # one pool for the normalisation fit and every split: workers start once; a fit pass that
        # can leave each training case's crops for the write pass does so in a folder inside the
        # dataset's temporary folder (self.data_dir here), so whatever removes that folder after
        # a failure or a stop (TFDS, or the next preparation) removes it too
        strategy = normalization.get(self.params.normalization)
        spill = (tempfile.TemporaryDirectory(prefix="fit_spill_", dir=os.fspath(self.data_dir))
                 if strategy.apply_summarized is not None and not self.params.fit_from
                 else contextlib.nullcontext())
        # (the pool is shut down before the folder is removed)
        with spill as self._spill_dir, _worker_pool(self.workers) as self._pool:
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        self._spill_dir = None
        self.info.metadata["skipped"] = self.skipped
        # patients skipped while their images were read have no examples: drop them from the lists
        self.info.metadata["patients"] = {
            name: [pid for pid in pids if pid in self.written]
            for name, pids in self.info.metadata["patients"].items()}
        self.info.metadata["case_notes"] = dict(sorted(self.case_notes.items()))
        if self.case_notes:
            pids = sorted(self.case_notes)
            self.notes.append(f"{len(pids)} patients have notes of their own (case_notes in "
                              f"metadata.json; e.g. a tumour range in the metadata that disagrees "
                              f"with the mask, which wins): {', '.join(pids[:10])}"
                              f"{', ...' if len(pids) > 10 else ''}")
        self.info.metadata["notes"] = self.notes
        self.info.metadata["counts"] = [list(key) + [n] for key, n in sorted(self.counts.items())]
        report.write(os.fspath(self.data_dir), self.info.metadata, self.qc_samples)


def fit_from_dataset(dataset_dir: str, strategy: str) -> dict:
    """The normalisation fitted on another prepared dataset's training split (e.g. for an external
    set, which must be normalised exactly like the data the model was trained on)."""
    path = os.path.join(dataset_dir, "metadata.json")
    if not os.path.isfile(path):
        raise MissingInput(f"--fit_from {dataset_dir}: no prepared dataset there ({path})")
    with open(path) as handle:
        metadata = json.load(handle)
    used = metadata["preparation"]["normalization"]
    if used != strategy or not metadata.get("normalization_fit"):
        raise BadInput(f"--fit_from {dataset_dir}: prepared with normalization {used!r}, "
                       f"not {strategy!r}, or holds no fitted parameters")
    return metadata["normalization_fit"]


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[concurrent.futures.Executor | None]:
    """A process pool, or None for one worker (no pool: plain tracebacks, no start-up cost).

    Leaving the block with an exception (a bad patient without --skip_bad, a stop by SIGTERM or
    Ctrl-C) ends the workers at once instead of waiting for the patients they are on."""
    if workers == 1:
        yield None
        return
    # spawn, not fork: the parent has TensorFlow's threads running, which fork does not copy safely
    threads = max(1, (os.cpu_count() or 1) // workers)
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
        initargs=(threads, os.getpid()))
    try:
        yield executor
    except BaseException:
        _end_workers(executor)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _end_workers(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    terminate = getattr(executor, "terminate_workers", None)       # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.terminate()


def _map(function, cases: list[Case], args: tuple,
         pool: concurrent.futures.Executor | None) -> Iterator:
    """(case, result or BadCaseError), in order without a pool, as completed with one."""
    if pool is None:
        for case in cases:
            try:
                yield case, _guarded(function, case, *args)
            except BadCaseError as error:
                yield case, error
        return
    futures = {pool.submit(_guarded, function, case, *args): case for case in cases}
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result()
            except BadCaseError as error:
                yield futures[future], error
    finally:
        # on an early stop (a bad case without --skip_bad), drop the queued patients
        for future in futures:
            future.cancel()


def _guarded(function, case: Case, *args):
    """`function(case, *args)`, any exception but a BadCaseError made that patient's error,
    naming the file being read when it happened (an image library can raise anything on an
    unusual file); HER2JAX_DEBUG=1 (`prepare --debug`) keeps the traceback instead."""
    volumes.LAST_READ = None
    try:
        return function(case, *args)
    except BadCaseError:
        raise
    except Exception as error:
        if os.environ.get("HER2JAX_DEBUG"):
            raise
        text = " ".join(str(error).split()) or "no message"
        raise BadCaseError(
            case.patient_id, volumes.LAST_READ or (case.mask or case.phases[0]),
            f"{type(error).__name__} while preparing it: {text[:300]} (an unusual file, or a "
            "her2jax bug: prepare --debug shows the traceback)") from None


def _start_worker(threads: int, parent: int) -> None:
    """A worker process's set-up: its share of the cores; Ctrl-C left to the parent (which ends
    the workers); and on Linux, ended when the parent dies, even by SIGKILL, so a killed
    preparation leaves no orphan workers behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:                 # the parent died before prctl took effect
            os._exit(1)
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


_PR_SET_PDEATHSIG = 1     # <linux/prctl.h>
