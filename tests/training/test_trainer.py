"""The trainer: accumulation, masks, exact resume, checkpoint files, callbacks, the teacher cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from rcc_compression.compression.layers import CompressedLinear
from rcc_compression.config import TrainingSection
from rcc_compression.errors import CheckpointError
from rcc_compression.models import get_model
from rcc_compression.training.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from rcc_compression.training.distributed import BatchesDataset, DistInfo, make_loader
from rcc_compression.training.losses import DistillationLoss, LossWeights
from rcc_compression.training.teacher import Teacher
from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective

FEATURES = LossWeights(kd=0.0, feature=1.0)  # per-sample terms only: split batches train like whole ones


def _split(batch: dict, parts: int) -> list[dict]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def test_accumulation_equals_the_large_batch(tiny_clip, make_batches, prune) -> None:
    big = make_batches(tiny_clip, 2, 8, 0)
    teacher = copy.deepcopy(tiny_clip.model)  # the Teacher freezes it; students are pruned from the original
    finals = []
    for data, accum in ((big, 1), ([m for b in big for m in _split(b, 4)], 4)):
        student = prune(tiny_clip.model)
        objective = DistillationObjective(DistillationLoss("clip", FEATURES), Teacher(teacher))
        cfg = TrainingSection(grad_accumulation=accum, grad_clip=0.05, learning_rate=0.5, optimizer="sgd",
                              scheduler="constant")  # SGD: updates linear in the gradient, so tolerances stay tight
        in_order = list(range(len(data)))
        trainer = CompressionTrainer(student, objective, cfg, train_data=data, order=lambda e, o=in_order: o,
                                     num_epochs=2)
        state = trainer.fit()
        finals.append(([p.detach().clone() for p in student.parameters()], [s["loss"] for s in state.steps],
                       [s["grad_norm"] for s in state.steps]))
    (w1, l1, g1), (w2, l2, g2) = finals
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert g1 == pytest.approx(g2, rel=1e-4) and min(g1) > 0.05  # clipping was active, on the whole batch
    for a, b in zip(w1, w2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masks_hold_and_only_given_params_move(tiny_clip, make_batches, prune) -> None:
    teacher = tiny_clip.model
    student = prune(teacher)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, CompressedLinear)}
    params = [m.weight for m in layers.values()]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    objective = DistillationObjective(DistillationLoss("clip"), Teacher(teacher))
    cfg = TrainingSection(learning_rate=1e-2, weight_decay=0.1, optimizer="sgd")
    with CompressionTrainer(student, objective, cfg, train_data=make_batches(tiny_clip, 3, 4, 1), params=params,
                            num_epochs=2) as trainer:
        trainer.fit()
    for name, p in student.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name.endswith(".weight") and name[: -len(".weight")] in layers), name
        assert p.requires_grad == flags[name]
    for m in layers.values():
        assert (m.weight[~m.mask] == 0).all() and m.mask.float().mean() == pytest.approx(0.4, abs=0.01)
    assert not student.training


class _Kill(Exception):
    pass


class _KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, logs) -> None:
        if trainer.state.step == self.step:
            raise _Kill


def _resume_setup(ckpt_dir: Path | None, callbacks=()):
    """A run with everything that has state: dropout, DataLoader, accumulation, warm-up, clipping, projection."""
    teacher = get_model("tiny-clip").model
    student = get_model("tiny-clip", seed=3).model
    for m in student.modules():
        if type(m).__name__ == "CLIPAttention":
            m.dropout = 0.2
    data = [get_model("tiny-clip").synthetic_batch(12, torch.Generator().manual_seed(i)) for i in range(2)]
    loader = make_loader(BatchesDataset(data), 4, DistInfo(), seed=7)
    loss = DistillationLoss("clip", LossWeights(kd=1.0, feature=0.5), 2.0, projections={"image_embeds": (16, 16)})
    objective = DistillationObjective(loss, Teacher(teacher))
    cfg = TrainingSection(dropout=True, grad_accumulation=2, warmup_steps=2, learning_rate=3e-3, weight_decay=0.01)
    cbs = [LearningRateMonitor(), *callbacks]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(ckpt_dir, every_steps=2))
    return CompressionTrainer(student, objective, cfg, train_data=loader, val_data=data[:1], num_epochs=3,
                              callbacks=cbs, seed=7)


def _snapshot(trainer: CompressionTrainer) -> dict:
    return {"params": [p.detach().clone() for p in trainer.model.parameters()],
            "proj": trainer.objective.loss.features.proj["image_embeds"].weight.detach().clone(),
            "steps": trainer.state.steps, "history": trainer.state.history,
            "lrs": trainer.callbacks.callbacks[0].history}


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full = _resume_setup(None)
    full.fit()
    want = _snapshot(full)
    assert len(want["steps"]) == 9  # 3 epochs x 6 micro-batches / accumulation 2

    killed = _resume_setup(tmp_path, [_KillAt(5)])
    with pytest.raises(_Kill):
        killed.fit()
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())["state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 2)  # mid-epoch checkpoint

    resumed = _resume_setup(tmp_path / "again")
    torch.manual_seed(999)  # a new process: another RNG state until the checkpoint restores it
    resumed.load_checkpoint(tmp_path / "last")
    resumed.fit()
    got = _snapshot(resumed)
    for a, b in zip(want["params"], got["params"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(want["proj"], got["proj"])
    assert got["steps"] == want["steps"] and got["history"] == want["history"] and got["lrs"] == want["lrs"]

    # the RNG state matters (dropout is on): resuming without it gives another run
    careless = _resume_setup(None)
    careless.load_checkpoint(tmp_path / "last")
    careless._pending_rng = None
    torch.manual_seed(999)
    careless.fit()
    assert not all(torch.equal(a, b) for a, b in zip(want["params"], careless.model.parameters(), strict=True))


def test_checkpoint_files_and_corruption(tmp_path: Path, tiny_clip, make_batches, prune) -> None:
    teacher = tiny_clip.model
    trainer = CompressionTrainer(prune(teacher), DistillationObjective(DistillationLoss("clip"), Teacher(teacher)),
                                 TrainingSection(), train_data=make_batches(tiny_clip, 2, 4, 0), num_epochs=1)
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "ck")
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["model.safetensors", "objective.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "trainer_state.json"]
    assert not list(tmp_path.glob(".ck*"))  # no temporary left behind
    trainer.save_checkpoint(tmp_path / "ck")  # replacing an existing checkpoint works
    blob = bytearray((tmp_path / "ck" / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ck" / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        trainer.load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="trainer_state"):
        trainer.load_checkpoint(tmp_path)


def test_early_stopping_on_a_rising_metric(tiny_clip, make_batches) -> None:
    values = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])
    trainer = CompressionTrainer(
        tiny_clip.model, DistillationObjective(DistillationLoss("clip"), Teacher(copy.deepcopy(tiny_clip.model))),
        TrainingSection(), train_data=make_batches(tiny_clip, 1, 4, 0), num_epochs=6,
        metric_fn=lambda m: {"val_loss": next(values)}, callbacks=[EarlyStopping("val_loss", patience=2)])
    state = trainer.fit()
    assert state.should_stop and state.epoch == 4  # best at epoch 2, no better at 3 and 4
    assert [h["val_loss"] for h in state.history] == [1.0, 0.5, 0.6, 0.7]


def test_teacher_cache_saves_forward_passes(tmp_path: Path, tiny_clip, make_batches) -> None:
    data = make_batches(tiny_clip, 2, 6, 0)
    teacher_model = copy.deepcopy(tiny_clip.model)
    cache = Teacher(teacher_model, cache_dir=tmp_path)
    loader = make_loader(BatchesDataset(data), 6, DistInfo(), seed=1)  # reshuffled every epoch
    trainer = CompressionTrainer(tiny_clip.model, DistillationObjective(DistillationLoss("clip"), cache),
                                 TrainingSection(), train_data=loader, num_epochs=3)
    trainer.fit()
    assert (cache.forward_calls, cache.cache_hits) == (2, 4)  # epochs 2 and 3 read every sample from disk
    assert len(list(tmp_path.rglob("*.safetensors"))) == 12  # one file per sample
    batch = next(iter(make_loader(BatchesDataset(data), 6, DistInfo(), seed=2)))
    fresh = Teacher(teacher_model).compute(batch)
    cached = cache(batch)
    assert cache.cache_hits == 5 and cached.keys() == fresh.keys()
    for k in fresh:
        if k.startswith("logits_per"):  # rebuilt from the cached embeddings
            torch.testing.assert_close(cached[k], fresh[k], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(cached[k], fresh[k]), k
    with torch.no_grad():
        next(teacher_model.parameters()).add_(1.0)
    changed = Teacher(teacher_model, cache_dir=tmp_path)
    changed(data[0])
    assert (changed.forward_calls, changed.cache_hits) == (1, 0)  # a changed teacher never reads stale outputs


def test_task_objective_trains_clip_on_its_own_loss(tiny_clip, make_batches) -> None:
    from rcc_compression.training.trainer import TaskObjective

    data = make_batches(tiny_clip, 2, 8, 0)
    objective = TaskObjective("clip")
    loss, terms = objective(tiny_clip.model, data[0])
    assert loss.item() == pytest.approx(tiny_clip.model(**data[0], return_loss=True).loss.item(), rel=1e-5)
    trainer = CompressionTrainer(tiny_clip.model, objective, TrainingSection(learning_rate=3e-3), train_data=data,
                                 num_epochs=8)
    history = trainer.fit().history
    assert history[-1]["train_task"] < 0.5 * history[0]["train_task"]


def test_custom_schedule_and_a_mid_epoch_stop(tiny_clip, make_batches) -> None:
    """A scheduler factory replaces the config's schedule; a callback's stop ends the epoch after that step."""

    class StopAt(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_step_end(self, trainer, logs) -> None:
            self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.state.should_stop = trainer.state.step == 3

    stop = StopAt()
    cfg = TrainingSection(learning_rate=0.1, optimizer="sgd", betas=(0.8, 0.9))
    trainer = CompressionTrainer(
        tiny_clip.model, DistillationObjective(DistillationLoss("clip"), Teacher(copy.deepcopy(tiny_clip.model))),
        cfg, train_data=make_batches(tiny_clip, 6, 4, 0), num_epochs=2, callbacks=[stop],
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)))
    state = trainer.fit()
    assert state.step == 3 and len(state.steps) == 3 and state.epoch == 1  # 3 of 6 batches, then stopped
    assert stop.lrs == pytest.approx([0.1 / 2, 0.1 / 3, 0.1 / 4])


def test_adamw_betas_come_from_the_config(tiny_clip, make_batches) -> None:
    trainer = CompressionTrainer(
        tiny_clip.model, DistillationObjective(DistillationLoss("clip"), Teacher(copy.deepcopy(tiny_clip.model))),
        TrainingSection(betas=(0.9, 0.98)), train_data=make_batches(tiny_clip, 1, 4, 0))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.98)


def _streaming_setup(ckpt_dir: Path | None, callbacks=(), loads: list | None = None, max_steps: int = 7):
    """A trainer streaming augmented, length-bucketed batches of real captions through a loader."""
    from rcc_compression.data.collate import MODEL_KEYS
    from rcc_compression.data.datasets import ArrayDataset, Record
    from rcc_compression.data.loaders import split_loader
    from rcc_compression.data.transforms import TrainAugment, transform_for
    from rcc_compression.data.world import world_scenes

    class Counted(ArrayDataset):
        def load_raw(self, index: int):
            if loads is not None:
                loads.append(index)
            return super().load_raw(index)

    wrapper = get_model("tiny-clip")
    items = list(world_scenes(0, "train", 20))
    ds = Counted([it.image for it in items], [Record(image=i, image_id=str(i), captions=it.captions)
                                              for i, it in enumerate(items)], transform=transform_for(wrapper))
    loader = split_loader(ds, "train", 4, wrapper.tokenizer, max_length=wrapper.max_text_length, seed=5,
                          augment=TrainAugment(), keys=MODEL_KEYS)
    student = get_model("tiny-clip", seed=3).model
    objective = DistillationObjective(DistillationLoss("clip"), Teacher(wrapper.model))
    cfg = TrainingSection(max_steps=max_steps, eval_every_steps=3, learning_rate=3e-3, warmup_steps=2)
    cbs = [*callbacks] + ([ModelCheckpoint(ckpt_dir, every_steps=1)] if ckpt_dir is not None else [])
    val = [wrapper.synthetic_batch(4, torch.Generator().manual_seed(1))]
    return CompressionTrainer(student, objective, cfg, train_data=loader, val_data=val, callbacks=cbs, seed=5)


def test_a_streamed_run_stops_at_max_steps_validates_and_resumes_exactly(tmp_path: Path) -> None:
    full = _streaming_setup(None)
    assert full.total_steps == 7 and full.steps_per_epoch == 5
    full.fit()
    assert full.state.step == 7 and [h["step"] for h in full.state.history] == [3, 6, 7]
    assert all("val_loss" in h for h in full.state.history)

    killed = _streaming_setup(tmp_path, [_KillAt(3)])
    with pytest.raises(_Kill):
        killed.fit()
    loads: list[int] = []
    resumed = _streaming_setup(tmp_path / "again", loads=loads)
    resumed.load_checkpoint(tmp_path / "last")
    assert (resumed.state.step, resumed.state.batch_in_epoch) == (2, 2)  # saved before the kill at step 3
    resumed.fit()
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.state.history == full.state.history
    # the two batches of epoch 0 seen before the checkpoint were skipped, not loaded and thrown away
    assert len(loads) == 4 * (5 - 2) + 4 * 2


@pytest.mark.e2e
def test_a_run_resumed_with_its_steps_done_trains_no_further(tmp_path: Path) -> None:
    """A run stopped after step 2 and resumed with ``max_steps=2`` ends where it stopped (``rcc train --resume
    --steps N`` to finish a longer run early)."""
    killed = _streaming_setup(tmp_path, [_KillAt(3)])
    with pytest.raises(_Kill):
        killed.fit()
    resumed = _streaming_setup(tmp_path / "again", max_steps=2)
    resumed.load_checkpoint(tmp_path / "last")
    saved = [p.detach().clone() for p in resumed.model.parameters()]
    assert resumed.state.step == 2 and not resumed.state.should_stop
    resumed.fit()
    assert resumed.state.step == 2 and resumed.state.should_stop
    assert all(torch.equal(a, b) for a, b in zip(saved, resumed.model.parameters(), strict=True))
