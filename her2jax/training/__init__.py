"""Training: losses, optimizers and schedules (`losses`, `optim`), the jitted train and eval
steps (`steps`), the one inference path that training and every analysis share (`inference`),
the metrics log (`run_log`) and the training loop with checkpoints and relaunch checks (`loop`).
Nothing here imports TensorFlow except through `her2jax.data.pipeline`, which `loop` uses to read
the records.
"""
