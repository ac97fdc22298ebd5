"""TensorFlow and TFDS for the input pipeline (`her2jax.data.pipeline` is the API), imported here
only, so that the environment is set before TensorFlow loads: the only TensorFlow users in
`her2jax` are the modules of `her2jax.data` that import this one (not `her2jax.data.augment`).

TensorFlow stays on the host CPU: the accelerators belong to JAX, and a TensorFlow that saw a GPU
would reserve its memory.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# TensorFlow's import loads Keras 3 eagerly (and scikit-learn with it where that is installed:
# 1.5-3 s in every process) unless told to use the legacy `tf_keras` package; that one is not
# installed, so TensorFlow then loads no Keras at all. Nothing here uses tf.keras. A value the
# user set is kept.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices elsewhere in this process
    pass

# The functions the pipelines map over are written in graph form already (tf.cond, no Python
# branches on tensors): marked with this, tf.data traces them as they are instead of running
# AutoGraph's source conversion on each (about 2 s for each process that builds a pipeline).
as_written = tf.autograph.experimental.do_not_convert

__all__ = ["as_written", "tf", "tfds"]
