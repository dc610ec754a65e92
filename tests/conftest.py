"""Test-wide settings. Threaded BLAS on a small shared machine makes many tiny numpy/scipy fits dozens of
times slower (measured on the 2-core dev box), so tests pin BLAS to one thread before numpy loads it."""

import os

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
