"""What may differ between the members of a pack (light: the launchers import it without JAX).

PACK_KEYS are arguments of the compiled step (`optim.HYPERPARAMETERS`, the dropout rate, the
class weights, the augmentation magnitudes) and the seed (each member's initialisation, data
order, augmentation and dropout draws); members draw their batches on the device
(DEVICE_SETTINGS)."""

# the scalar augmentation magnitudes: a step on (non-zero) in one member is on in all (a member
# cannot turn a step off inside the shared program), see `augment_steps_on`
AUGMENT_PACK_KEYS = ("input.augment.flip", "input.augment.rotate_degrees",
                     "input.augment.intensity_jitter")
PACK_KEYS = ("seed", "optimizer.learning_rate", "optimizer.weight_decay", "optimizer.b1",
             "optimizer.b2", "loss.label_smoothing", "model.kwargs.dropout",
             "loss.class_weights") + AUGMENT_PACK_KEYS

# what every member of a pack sets: its data resident on the device, augmented there
DEVICE_SETTINGS = {"input.source": "device", "input.augment_on": "device"}


def augment_steps_on(values: dict) -> tuple[tuple[str, bool], ...]:
    """Which augmentation steps a run's flat config (or overrides) turns on: members of a pack
    must agree on them."""
    return tuple((key, bool(values[key])) for key in AUGMENT_PACK_KEYS if key in values)
