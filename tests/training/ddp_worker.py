"""A short distillation run for the data-parallel test: ``torchrun ... ddp_worker.py OUT`` or :func:`run` in-process.

The global batch is fixed (8 samples per micro-batch, 2 micro-batches per step); each of the
``WORLD_SIZE`` processes takes ``8 / WORLD_SIZE`` samples of every micro-batch. Rank 0 writes
the per-step losses (``losses.json``), the final weights (``weights.safetensors``) and a trainer
checkpoint (``ck/last``) into OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

GLOBAL_MICRO_BATCH = 8


def _student(model: nn.Module) -> nn.Module:
    import copy

    from rcc_compression.compression.layers import CompressedLinear, replace_module

    student = copy.deepcopy(model)
    for name, mod in list(student.named_modules()):
        if isinstance(mod, nn.Linear) and "encoder.layers" in name:
            layer = CompressedLinear.from_linear(mod)
            w = layer.weight.detach()
            layer.set_sparse(w, w.abs() > w.abs().flatten().kthvalue(int(0.6 * w.numel())).values)
            replace_module(student, name, layer)
    return student


def run(out: Path) -> None:
    from rcc_compression.config import TrainingSection
    from rcc_compression.models import get_model
    from rcc_compression.training.callbacks import ModelCheckpoint
    from rcc_compression.training.distributed import (
        BatchesDataset,
        cleanup,
        gather_with_grad,
        init_distributed,
        make_loader,
    )
    from rcc_compression.training.losses import DistillationLoss, LossWeights
    from rcc_compression.training.teacher import Teacher
    from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective
    from rcc_compression.utils.io import atomic_save_safetensors, atomic_write_json

    torch.set_num_threads(1)
    info = init_distributed()
    try:
        wrapper = get_model("tiny-clip")
        teacher = wrapper.model
        student = _student(teacher)
        g = torch.Generator().manual_seed(0)
        data = [wrapper.synthetic_batch(8, g) for _ in range(4)]
        loader = make_loader(BatchesDataset(data), GLOBAL_MICRO_BATCH // info.world_size, info, seed=5)
        loss = DistillationLoss("clip", LossWeights(kd=1.0, feature=1.0), 2.0,
                                gather=gather_with_grad if info.enabled else None)
        objective = DistillationObjective(loss, Teacher(teacher))
        cfg = TrainingSection(optimizer="sgd", learning_rate=0.05, grad_accumulation=2, warmup_steps=1,
                              grad_clip=1.0)
        trainer = CompressionTrainer(student, objective, cfg, train_data=loader, num_epochs=3, dist=info,
                                     callbacks=[ModelCheckpoint(out / "ck")])
        state = trainer.fit()
        if info.is_main:
            atomic_write_json(out / "losses.json", {"world_size": info.world_size,
                                                    "losses": [s["loss"] for s in state.steps]})
            atomic_save_safetensors(dict(student.state_dict()), out / "weights.safetensors")
    finally:
        cleanup()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
