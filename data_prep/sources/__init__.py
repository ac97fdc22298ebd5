"""Sources: where studies come from, turned into a uniform list of `Case` records.

A source lists cases without reading any image, so problems found in the metadata (missing or
invalid label, duplicate patient id, missing phase file, phase index out of range) surface before
any heavy work starts. Reading images happens later, in worker processes (`data_prep.pipeline`).
"""
from __future__ import annotations

import dataclasses
import os

from data_prep.params import PrepParams
from data_prep.sources import breastdcedl, manifest
from data_prep.sources.cases import Case, Listing, cohort_reason, parse_label, reject_duplicates
from her2jax.errors import InvalidSetting, MissingInput

__all__ = ["Case", "Listing", "cohort_reason", "list_cases", "locate", "parse_label",
           "reject_duplicates"]


def locate(source: str) -> tuple[str, str | None]:
    """(folder, manifest file name or None) of a `--source`, checked before anything is written:
    a `.csv` file is a manifest; a folder must hold `manifest.csv` or a BreastDCEDL metadata CSV."""
    if "://" in source:
        raise InvalidSetting(f"--source {source}: preparation reads local files; copy the cohort "
                             f"here first (e.g. gcloud storage rsync -r {source} DIR)")
    path = os.path.abspath(source)
    if not os.path.exists(path):
        raise MissingInput(f"--source {source}: does not exist")
    if os.path.isfile(path):
        if not path.lower().endswith(".csv"):
            raise InvalidSetting(f"--source {source}: not a folder or a manifest CSV file")
        return os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(path):
        raise InvalidSetting(f"--source {source}: not a folder or a manifest CSV file")
    if not (os.path.isfile(os.path.join(path, "manifest.csv")) or breastdcedl.find_metadata(path)):
        raise MissingInput(
            f"--source {source}: holds no BreastDCEDL metadata CSV (columns "
            f"{sorted(breastdcedl.REQUIRED_COLUMNS)}) and no manifest.csv: see README, 'Sources'")
    return path, None


def list_cases(source: str, params: PrepParams) -> Listing:
    """Detects the source's kind and lists its cases.

    A `.csv` file, or a folder holding `manifest.csv`, is a manifest; any other folder is read as
    the BreastDCEDL layout (metadata CSV plus NIfTI files anywhere below it).
    """
    if not os.path.exists(source):
        raise MissingInput(f"source {source} does not exist")
    if os.path.isfile(source):
        listing = manifest.list_cases(source, params)
    elif os.path.isfile(os.path.join(source, "manifest.csv")):
        listing = manifest.list_cases(os.path.join(source, "manifest.csv"), params)
    else:
        listing = breastdcedl.list_cases(source, params)
    if params.cohorts:
        # (the BreastDCEDL reader leaves other cohorts out before checking their files)
        kept = [c for c in listing.cases if c.cohort in params.cohorts]
        for case in listing.cases:
            if case.cohort not in params.cohorts:
                listing.exclude(case.patient_id, cohort_reason(case.cohort, params.cohorts))
        listing.cases = kept
        empty = [name for name in params.cohorts if not any(c.cohort == name for c in kept)]
        if empty:
            listing.notes.append(f"no patient of the selected cohort(s) {', '.join(empty)}")
    if params.external:
        listing.cases = [dataclasses.replace(c, split="external", cohort=params.external)
                         for c in listing.cases]
    return listing
