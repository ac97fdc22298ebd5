"""Parts of the input pipeline (`her2jax.input_pipeline` is the API): the only TensorFlow users.

TensorFlow stays on the host CPU: the accelerators belong to JAX, and a TensorFlow that saw a GPU
would reserve its memory.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices elsewhere in this process
    pass
