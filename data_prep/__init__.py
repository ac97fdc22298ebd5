"""Offline preparation: DCE-MRI studies -> normalised RGB-fused slices in TFRecords.

This package never imports JAX. TensorFlow is imported only by the TFDS builder and the
`prepare` entry point, so the readers and transforms run in light worker processes.
"""

import os

__version__ = "0.1.0"


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    import subprocess

    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, text=True,
                                capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__
