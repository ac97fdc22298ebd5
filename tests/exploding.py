"""A patient function for tests/test_bad_input.py that reads the patient's first phase, then
meets what an image library can raise on an unusual file. Its own light module: the worker
processes of a preparation import it."""
from data_prep import volumes


def explode(case, params):
    volumes.read_volume(case.patient_id, case.phases[0])
    raise ZeroDivisionError("a library's\nsurprise")
