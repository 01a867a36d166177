"""CUDA out of memory: the batch is halved with a warning, and statistics and outputs come out as
from whole batches. Simulated on the CPU by a layer that raises ``torch.cuda.OutOfMemoryError`` for
inputs of more than a given number of rows (after the layers before it have run)."""

from __future__ import annotations

import logging

import pytest
import torch
from reliability_helpers import MLP, fresh_mlp, make_batches, mlp_section, model_state

from rcc_compression.compression.calibration import (
    BatchHalver,
    collect_layer_stats,
    run_outputs,
    split_batch,
)
from rcc_compression.compression.cascade import CascadePipeline


def _limit_rows(module: torch.nn.Module, max_rows: int, calls: list[int]) -> None:
    """Make ``module`` raise CUDA OOM for inputs with more than ``max_rows`` rows (all leading dims)."""
    real = module.forward

    def forward(x, *args, **kwargs):  # noqa: ANN001, ANN202
        rows = x.shape[0]
        calls.append(rows)
        if rows > max_rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows")
        return real(x, *args, **kwargs)

    module.forward = forward


@pytest.fixture
def warnings_seen():
    """Warning messages of the package logger (which does not propagate once the CLI set it up)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("rcc_compression")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_split_batch_splits_tensors_along_dim_0_and_shares_the_rest():
    batch = {"x": torch.arange(10).reshape(5, 2), "mask": torch.ones(5, 3), "flag": True}
    a, b = split_batch(batch, 2)
    assert a["x"].tolist() == [[0, 1], [2, 3], [4, 5]] and b["x"].tolist() == [[6, 7], [8, 9]]
    assert a["mask"].shape == (3, 3) and b["mask"].shape == (2, 3) and a["flag"] is True and b["flag"] is True


def test_layer_statistics_survive_out_of_memory(warnings_seen):
    batches = make_batches(3, rows=8)
    reference = collect_layer_stats(fresh_mlp(), ["fc1", "fc2", "head"], batches, gram=True)
    model, calls = fresh_mlp(), []
    _limit_rows(model.fc2, 2, calls)  # fc1's hook has counted the batch when fc2 fails
    stats = collect_layer_stats(model, ["fc1", "fc2", "head"], batches, gram=True)
    assert warnings_seen == ["CUDA out of memory on a batch of 8 in calibration statistics; halving the batch to 4",
                             "CUDA out of memory on a batch of 4 in calibration statistics; halving the batch to 2"]
    assert calls == [8, 4] + [2] * 12  # two failures, then every batch in pieces of 2
    for name, ref in reference.items():
        got = stats[name]
        assert got.count == ref.count == 24
        for field, tol in (("sum_sq", 1e-6), ("sum_abs", 1e-6), ("gram", 1e-5)):
            # float32 products of differently sized matmuls (and a float32 gram): equal to rounding
            torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=tol, atol=tol)


def test_outputs_survive_out_of_memory(warnings_seen):
    batches = make_batches(2, rows=6)
    reference = run_outputs(fresh_mlp(), batches)
    model, calls = fresh_mlp(), []
    _limit_rows(model.head, 3, calls)
    outs = run_outputs(model, batches)
    assert warnings_seen == ["CUDA out of memory on a batch of 6 in model outputs; halving the batch to 3"]
    assert calls == [6, 3, 3, 3, 3]
    assert len(outs) == 2 and all(o["output"].shape == (6, 16) for o in outs)
    for got, ref in zip(outs, reference, strict=True):
        torch.testing.assert_close(got["output"], ref["output"], rtol=0, atol=1e-6)


def test_clip_similarity_matrices_are_rebuilt_for_a_split_batch(tiny_clip, warnings_seen):
    batch = tiny_clip.synthetic_batch(4, torch.Generator().manual_seed(0))
    (reference,) = run_outputs(tiny_clip.model, [batch])
    calls: list[int] = []
    _limit_rows(tiny_clip.model.visual_projection, 2, calls)
    (got,) = run_outputs(tiny_clip.model, [batch])
    assert warnings_seen == ["CUDA out of memory on a batch of 4 in model outputs; halving the batch to 2"]
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert got[key].shape == reference[key].shape, key
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-5)


def test_one_row_that_does_not_fit_is_an_error():
    model, calls = MLP(), []
    _limit_rows(model.fc1, 0, calls)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_outputs(model, make_batches(1, rows=2))
    assert calls == [2, 1]


def test_halver_keeps_the_size_that_fits():
    halver, seen = BatchHalver("test"), []

    def work(piece):  # noqa: ANN001, ANN202
        rows = piece["x"].shape[0]
        seen.append(rows)
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("no room")
        return rows

    assert halver.run(work, {"x": torch.zeros(10, 1)}) == [3, 2, 3, 2]
    assert halver.limit == 3 and seen == [10, 5, 3, 2, 3, 2]
    assert halver.run(work, {"x": torch.zeros(7, 1)}) == [3, 2, 2]  # split up front, no new failure
    assert seen[6:] == [3, 2, 2]


def test_a_cascade_runs_through_out_of_memory_to_the_same_model(warnings_seen):
    reference = fresh_mlp()
    CascadePipeline(mlp_section(), calibration_data=make_batches(6, rows=8), seed=1).compress(reference)
    model, calls = fresh_mlp(), []
    _limit_rows(model.fc2, 4, calls)
    section = mlp_section()
    section.cascade.offload = "memory"  # the teacher is then a deep copy: the patched forward reaches it
    CascadePipeline(section, calibration_data=make_batches(6, rows=8), seed=1).compress(model)
    assert warnings_seen and set(warnings_seen) <= {
        "CUDA out of memory on a batch of 8 in calibration statistics; halving the batch to 4",
        "CUDA out of memory on a batch of 8 in model outputs; halving the batch to 4"}
    got, want = model_state(model), model_state(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
