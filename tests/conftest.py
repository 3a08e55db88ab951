"""Test-wide settings: one intra-op thread per test process (tests use small tensors, where thread hand-offs cost
far more than they save; CI runs two pytest-xdist workers to use both cores)."""

import torch

torch.set_num_threads(1)
