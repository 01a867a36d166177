"""Distillation reaches the engine as a callable: the engine calls what it is given and refuses what it lacks."""

from __future__ import annotations

import pytest
import torch

from rcc_compression.compression.cascade import CascadePipeline as EngineCascade
from rcc_compression.errors import CompressionError


def test_engine_refuses_distillation_it_was_not_given(mlp, mlp_batches) -> None:
    """The engine does not train: epochs of distillation without a distiller are an error, not a skip."""
    pipe = EngineCascade(calibration_data=mlp_batches).add_stage("dare", {"pruning_rate": 0.5, "iterations": 1,
                                                                          "fine_tune_epochs": 2})
    with pytest.raises(CompressionError, match="no distiller"):
        pipe.compress(mlp)


def test_engine_calls_the_distiller_it_is_given(mlp, mlp_batches) -> None:
    """A distiller handed to the engine gets the stage's epochs and lr, the batches and the teacher's outputs."""
    calls = []

    def distill(model, params, batches, teacher_outputs, epochs, lr, generator, device):
        calls.append((len(params), len(batches), len(teacher_outputs), epochs, lr, isinstance(generator,
                                                                                           torch.Generator)))
        return {"kd_loss_first_epoch": 1.0, "kd_loss_last_epoch": 0.5}

    pipe = EngineCascade(calibration_data=mlp_batches, distill=distill).add_stage(
        "dare", {"pruning_rate": 0.5, "iterations": 1, "fine_tune_epochs": 3, "fine_tune_lr": 0.01})
    pipe.compress(mlp)
    assert len(calls) == 1
    n_params, n_batches, n_teacher, epochs, lr, has_gen = calls[0]
    assert n_params > 0 and n_batches == n_teacher > 0 and (epochs, lr, has_gen) == (3, 0.01, True)
    assert pipe.stage_results["dare"]["kd_loss_last_epoch"] == 0.5
