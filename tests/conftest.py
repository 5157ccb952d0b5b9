"""Shared test set-up: offline hub access and one torch thread per test process.

Tiny models gain nothing from intra-op threads, and several test processes (pytest, nbval kernels, a server
subprocess) share the machine's cores: one thread each keeps them from fighting.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
