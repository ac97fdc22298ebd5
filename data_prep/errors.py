"""The one error type that bad input raises, so every message names patient, file and problem."""
from __future__ import annotations

from her2jax.errors import BadInput


class BadCaseError(BadInput):
    """A patient's data cannot be prepared.

    The message always reads `patient <id>: <file>: <reason>`, one line, so that a user can go
    straight to the offending file; `prepare --skip_bad` records these and goes on.
    """

    def __init__(self, patient_id: str, path: str | None, reason: str):
        self.patient_id = patient_id
        self.path = path or "-"
        self.reason = reason
        super().__init__(f"patient {patient_id}: {self.path}: {reason}")

    def __reduce__(self):
        # Worker processes send the error back pickled; the default would call __init__(message).
        return type(self), (self.patient_id, self.path, self.reason)

    def as_record(self) -> dict[str, str]:
        return {"patient_id": self.patient_id, "file": self.path, "reason": self.reason}
