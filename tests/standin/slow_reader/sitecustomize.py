"""On PYTHONPATH, makes every NIfTI read of a process (and of the worker processes it starts)
hang like a read from a stalled network file system: a preparation started with it stays busy
until it is stopped (tests/test_prepare_stop.py). Each process that reaches a read leaves a file
named by its pid in $STALLED_DIR, so the test knows when the workers are inside a patient."""
import os
import time

import nibabel

_load = nibabel.load


def _stalled_load(*args, **kwargs):
    with open(os.path.join(os.environ["STALLED_DIR"], str(os.getpid())), "w"):
        pass
    time.sleep(600)
    return _load(*args, **kwargs)


nibabel.load = _stalled_load
