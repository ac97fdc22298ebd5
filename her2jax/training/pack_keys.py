"""What may differ between the members of a pack (light: the launchers import it without JAX).

PACK_KEYS are arguments of the compiled step (`optim.HYPERPARAMETERS`, the dropout rate) and the
seed (each member's initialisation, data order, augmentation and dropout draws); members draw
their batches on the device (DEVICE_SETTINGS)."""

PACK_KEYS = ("seed", "optimizer.learning_rate", "optimizer.weight_decay", "optimizer.b1",
             "optimizer.b2", "loss.label_smoothing", "model.kwargs.dropout")

# what every member of a pack sets: its data resident on the device, augmented there
DEVICE_SETTINGS = {"input.source": "device", "input.augment_on": "device"}
