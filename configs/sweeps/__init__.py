"""Sweep definitions: each file's `get_sweep(arg)` returns a `launch.spec.Sweep`; launch with
`python -m launch.sweep --sweep configs/sweeps/NAME.py --backend local|slurm|tpu`."""
