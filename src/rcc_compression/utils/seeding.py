"""Seeding and RNG state capture, so that every run can be repeated and resumed exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); optionally force deterministic kernels.

    ``deterministic=True`` also sets ``torch.use_deterministic_algorithms`` and the cuBLAS
    workspace variable, trading speed for bit-identical repeat runs on the GPU.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_rng_state() -> dict[str, torch.Tensor]:
    """Capture torch's CPU (and CUDA) generator states as uint8 tensors, for safetensors."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore generator states captured by :func:`get_rng_state`."""
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8).cpu())
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])
