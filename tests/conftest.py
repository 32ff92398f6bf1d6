"""Shared test set-up: small thread pools (2 cores are shared by everything here)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
