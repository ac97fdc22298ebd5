"""The data on its way to the model: the prepared TFRecords (`records`), each process's share
and the balanced sampling (`sampling`), augmentation (`augment`: its options and the on-device
form; `augment_host`: the tf.data form) and the pipeline that turns records into global batches
(`pipeline`, the API). Only the modules that import `tensorflow_host` load TensorFlow; `augment`
does not, so the train step runs without it.
"""
