"""Shared test set-up: offline hub access, one torch thread per test process, one inductor cache per checkout.

Tiny models gain nothing from intra-op threads, and several test processes (pytest, nbval kernels, a server
subprocess) share the machine's cores: one thread each keeps them from fighting.

torch.compile's artefacts (inductor's FX graph cache, AOT autograd cache, compiled kernels) go to `runs/inductor-cache`
in this checkout (ignored by git): every test and notebook kernel of a run reuses what an earlier one compiled (the
same decode step is compiled by several tests), a fresh clone starts cold, and other checkouts or users on the machine
neither share nor spoil it. Set TORCHINDUCTOR_CACHE_DIR to choose another place.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# before torch is imported (inductor reads these once); inherited by subprocesses and nbval kernels
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "runs" / "inductor-cache"))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")  # on by default since torch 2.5; pyproject allows 2.4
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
