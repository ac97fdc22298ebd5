"""Offline preparation: DCE-MRI studies -> normalised RGB-fused slices in TFRecords.

This package never imports JAX. TensorFlow is imported only by the TFDS builder and the
`prepare` entry point, so the readers and transforms run in light worker processes.
"""

__version__ = "0.1.0"
