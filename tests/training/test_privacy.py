"""Private recovery training (``training.privacy``): per-sample gradients, Opacus' accountant, the budget, and the
ordinary path left exactly as it was."""

from __future__ import annotations

import copy
import hashlib
import sys

import pytest
import torch
from torch import nn

from rcc_compression.compression.calibration import run_outputs
from rcc_compression.compression.layers import CompressedLinear, compressed_layers
from rcc_compression.errors import ConfigError
from rcc_compression.models import get_model
from rcc_compression.training.losses import DistillationLoss, LossWeights, model_family
from rcc_compression.training.privacy import PrivateTraining, compressed_linear_grad_sample, epsilon_of
from rcc_compression.training.recovery import finetune_on_batches, trainable_parameters
from rcc_compression.training.settings import PrivacySection, TrainingSection
from rcc_compression.training.teacher import Teacher
from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective

#: sha256 of the student's weights after :func:`_distil` without privacy, as the trainer gave before private
#: training existed (torch 2.13 CPU, one thread)
ORDINARY_DIGEST = "c8bc5efbab01ba19e89cdc65ff7a1a4ee9da1e227953d3c858a62b850c94a049"
FEATURES_ONLY = {"kd_weight": 0.0, "feature_weight": 1.0}


def _student_and_teacher(prune, seed: int = 0):
    wrapper = get_model("tiny-clip", seed=seed)
    teacher = copy.deepcopy(wrapper.model)
    return wrapper, prune(wrapper.model, 0.6), teacher


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _distil(prune, make_batches, config: TrainingSection, ledger=None) -> tuple[nn.Module, dict]:
    """Two epochs of stage distillation of a 60 %-pruned tiny CLIP on three synthetic batches of six."""
    wrapper, student, teacher = _student_and_teacher(prune)
    batches = make_batches(wrapper, 3, 6, 1)
    out = finetune_on_batches(student, trainable_parameters(student, "compressed"), batches,
                              run_outputs(teacher, batches), 2, 1e-3, torch.Generator().manual_seed(2),
                              config=config, ledger=ledger)
    return student, out


def test_training_without_privacy_is_unchanged_bit_for_bit(prune, make_batches, monkeypatch) -> None:
    """The ordinary path gives the weights it gave before private training existed, and never imports Opacus."""
    for name in [m for m in sys.modules if m == "opacus" or m.startswith("opacus.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opacus", None)  # importing it now would fail
    student, out = _distil(prune, make_batches, TrainingSection(scheduler="constant"))
    assert _digest(student) == ORDINARY_DIGEST
    assert "privacy" not in out


def test_per_sample_gradients_of_a_compressed_layer_match_one_backward_per_sample() -> None:
    """Sparse part, low-rank factors, both scales and the bias: each sample's gradient, as a loop computes it."""
    torch.manual_seed(0)
    layer = CompressedLinear.from_linear(nn.Linear(6, 5))
    layer.set_sparse(layer.weight.detach(), torch.rand(5, 6) > 0.5)
    layer.set_low_rank(torch.randn(5, 2), torch.randn(2, 6))
    layer.set_scales(torch.rand(6) + 0.5, torch.rand(5) + 0.5)
    layer.train()
    x, g = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    per_sample = compressed_linear_grad_sample(layer, [x], g)
    for i in range(4):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        for p in layer.parameters():
            torch.testing.assert_close(per_sample[p][i], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_the_accountants_epsilon_for_a_fixed_run_is_opacus_figure() -> None:
    """Our record of a run equals the epsilon Opacus' PrivacyEngine reports for the same sampling, noise and steps."""
    from opacus import PrivacyEngine

    items, batch, steps = 64, 8, 24
    ours = PrivateTraining(PrivacySection(epsilon=8, delta=1e-5), items, batch, steps)
    for _ in range(steps):
        ours.after_step()
    # the same run through Opacus' own engine: a linear model on random data, Poisson batches of 8 of 64
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.randn(items, 3), torch.randn(items, 1))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=batch), noise_multiplier=ours.noise_multiplier,
        max_grad_norm=1.0)
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward() if len(x) else None
            optimizer.step()
            done += 1
            if done == steps:
                break
    figure = engine.get_epsilon(1e-5)
    record = ours.record()
    assert record["epsilon_spent"] == pytest.approx(figure, rel=1e-12)
    assert record["epsilon_spent"] == pytest.approx(epsilon_of("rdp", [(ours.noise_multiplier, 1 / 8, 24)], 1e-5))
    assert 7.5 < record["epsilon_spent"] <= 8.0  # calibrated to the budget, not beyond it


@pytest.mark.e2e
def test_private_distillation_spends_at_most_its_budget_and_keeps_the_sparsity(prune, make_batches) -> None:
    cfg = TrainingSection(scheduler="constant", **FEATURES_ONLY,
                          privacy=PrivacySection(epsilon=8, delta=1e-3, max_grad_norm=1.0))
    ledger: list = []
    student, out = _distil(prune, make_batches, cfg, ledger)
    record = out["privacy"]
    assert record["steps"] == 6 and 0 < record["epsilon_spent"] <= 8
    assert record["items"] == 18 and record["sample_rate"] == pytest.approx(6 / 18)
    assert ledger and ledger[-1][2] == 6
    for layer in compressed_layers(student).values():  # noise never revives a pruned entry
        assert bool((layer.weight.detach()[~layer.mask] == 0).all())
    _, _, teacher = _student_and_teacher(prune)
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, dict(teacher.named_parameters())[n])]
    assert changed and all("encoder.layers" in n for n in changed)
    # a second distillation of the same run draws on what is left of the one budget
    _, out2 = _distil(prune, make_batches, cfg, ledger)
    assert out2["privacy"]["earlier_steps"] == 6 and out2["privacy"]["epsilon_spent"] <= 8 + 1e-9
    assert out2["privacy"]["noise_multiplier"] > record["noise_multiplier"]


@pytest.mark.e2e
def test_contrastive_terms_are_refused_under_privacy(prune, make_batches) -> None:
    cfg = TrainingSection(scheduler="constant", privacy=PrivacySection(epsilon=8, delta=1e-3))
    with pytest.raises(ConfigError, match="training.kd_weight"):
        _distil(prune, make_batches, cfg)


@pytest.mark.e2e
def test_a_run_that_would_exceed_its_budget_is_refused_or_stopped(prune, make_batches) -> None:
    """A fixed noise multiplier too small for the planned steps: refused before anything trains; a trainer asked for
    more steps than its plan stops at the last step within the budget, saying so."""
    budget = PrivacySection(epsilon=2, delta=1e-3, noise_multiplier=2.0)
    with pytest.raises(ConfigError, match=r"would spend epsilon .* > the budget 2; train at most 17 steps"):
        PrivateTraining(budget, 24, 6, 500)
    private = PrivateTraining(budget, 24, 6, 5)  # planned 5 steps; the trainer is then asked for more
    fit = private.steps_within_budget()
    assert fit == 17
    wrapper, student, teacher = _student_and_teacher(prune)
    batches = make_batches(wrapper, 4, 6, 3)
    cfg = TrainingSection(scheduler="constant", **FEATURES_ONLY, privacy=budget)
    objective = DistillationObjective(DistillationLoss(model_family(student), LossWeights.from_config(cfg)),
                                      Teacher(teacher))
    with CompressionTrainer(student, objective, cfg, train_data=batches, num_epochs=10_000 // 4,
                            params=trainable_parameters(student, "compressed"), privacy=private) as trainer:
        state = trainer.fit(num_epochs=(fit + 8) // 4 + 1)
    assert state.step == fit and private.stopped and "privacy budget" in private.stopped
    assert private.epsilon() <= 2 < private.epsilon(1)
    assert not any(hasattr(p, "grad_sample") for p in student.parameters())  # hooks gone with the trainer


@pytest.mark.e2e
def test_rcc_compress_distils_privately_under_one_budget(tmp_path) -> None:
    """The cascade's distillation (dare's fine-tuning here) through ``rcc compress`` runs DP-SGD and records it."""
    import json

    from rcc_compression.cli import main

    out = tmp_path / "run"
    assert main(["compress", "--model", "rcc-clip-world", "--set", "calibration.source=world", "--set",
                 "calibration.num_batches=3", "--set", "calibration.batch_size=8", "--set",
                 "calibration.holdout_batches=1", "--set", "compression.cascade.stages=[dare]", "--set",
                 "compression.dare.iterations=1", "--set", "compression.dare.fine_tune_epochs=2", "--set",
                 "compression.dare.pruning_rate=0.5", "--set", "compression.cascade.validation_threshold=0",
                 "--set", "training.kd_weight=0", "--set", "training.privacy.epsilon=8", "--set",
                 "training.privacy.delta=0.001", "--no-eval", "--output", str(out), "-q"]) == 0
    text = json.dumps(json.loads((out / "results.json").read_text()))
    i = text.index('"privacy"')
    record = json.loads(text[text.index("{", i):text.index("}", i) + 1])
    assert record["steps"] == 6 and 0 < record["epsilon_spent"] <= 8 and record["items"] == 24


@pytest.mark.e2e
def test_a_resumed_private_run_continues_the_accounting(prune, make_batches, tmp_path) -> None:
    """The checkpoint holds the accountant's history (never the noise generator's state)."""
    budget = PrivacySection(epsilon=8, delta=1e-3)
    wrapper, student, teacher = _student_and_teacher(prune)
    batches = make_batches(wrapper, 4, 6, 3)
    cfg = TrainingSection(scheduler="constant", **FEATURES_ONLY, privacy=budget)

    def trainer(private: PrivateTraining) -> CompressionTrainer:
        objective = DistillationObjective(DistillationLoss(model_family(student), LossWeights.from_config(cfg)),
                                          Teacher(teacher))
        return CompressionTrainer(student, objective, cfg, train_data=batches, num_epochs=2,
                                  params=trainable_parameters(student, "compressed"), privacy=private)

    first = PrivateTraining(budget, 24, 6, 8)
    with trainer(first) as t:
        t.fit(num_epochs=1)
        t.save_checkpoint(tmp_path / "ckpt")
    meta = (tmp_path / "ckpt" / "trainer_state.json").read_text()
    assert '"privacy"' in meta and "generator" not in meta
    second = PrivateTraining(budget, 24, 6, 8)
    with trainer(second) as t:
        t.load_checkpoint(tmp_path / "ckpt")
        assert second.steps_taken == 4 and second.epsilon() == pytest.approx(first.epsilon())
        t.fit()
    assert second.steps_taken == 8 and second.epsilon() <= 8


def test_private_training_records_no_membership_list(tmp_path) -> None:
    """data.json of a private run keeps counts and the leak check, not the identity of each training image."""
    import json

    from rcc_compression.data.datasets import ArrayDataset, Record
    from rcc_compression.jobs.data import check_and_record

    images = [torch.full((8, 8, 3), i, dtype=torch.uint8).numpy() for i in range(6)]
    ds = ArrayDataset(images, [Record(image=i, image_id=str(i), captions=["a red circle"]) for i in range(6)])
    check_and_record(tmp_path, {"train": [ds]}, "content", withhold=("train",))
    record = json.loads((tmp_path / "data.json").read_text())
    assert "train" not in record["identities"] and record["roles"]["train"][0]["items"] == 6
    assert "training.privacy" in record["identities_withheld"]["train"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_private_distillation_on_cuda(prune, make_batches) -> None:
    """Per-sample gradients, clipping and noise on the GPU (the noise generator lives on the gradients' device)."""
    wrapper, student, teacher = _student_and_teacher(prune)
    student, teacher = student.cuda(), teacher.cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in make_batches(wrapper, 3, 6, 1)]
    cfg = TrainingSection(scheduler="constant", **FEATURES_ONLY, privacy=PrivacySection(epsilon=8, delta=1e-3))
    out = finetune_on_batches(student, trainable_parameters(student, "compressed"), batches,
                              run_outputs(teacher, batches), 2, 1e-3, torch.Generator().manual_seed(2),
                              device="cuda", config=cfg)
    assert out["privacy"]["steps"] == 6 and out["privacy"]["epsilon_spent"] <= 8
    for layer in compressed_layers(student).values():
        assert bool((layer.weight.detach()[~layer.mask] == 0).all())
