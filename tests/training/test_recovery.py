"""Recovery: distillation closes the gap to the teacher; the engine's fine-tuning; ``rcc train``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rcc_compression import CompressionPipeline
from rcc_compression.cli import main
from rcc_compression.compression.calibration import flatten_outputs, output_agreement, run_outputs
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.compression.storage import load_compressed, save_compressed
from rcc_compression.config import TrainingSection, dump_config, load_config
from rcc_compression.tracking import read_metrics_file, series_points
from rcc_compression.training.losses import DistillationLoss, clip_contrastive_kd, model_family
from rcc_compression.training.recovery import trainable_parameters
from rcc_compression.training.teacher import Teacher
from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective


def _compress(wrapper, batches, holdout, rate: float = 0.7, fine_tune_epochs: int = 0):
    cfg = {"cascade": {"stages": ["dare"], "validation_threshold": 0.0},
           "dare": {"pruning_rate": rate, "iterations": 1, "fine_tune_epochs": fine_tune_epochs,
                    "fine_tune_lr": 1e-3}}
    pipe = CompressionPipeline(cfg, calibration_data=batches, holdout_data=holdout)
    pipe.compress(wrapper)
    return pipe


def _gap(student, teacher, holdout) -> tuple[float, float]:
    """(similarity KL at T=1 in both directions, 1 - output agreement) on held-out batches."""
    s_out, t_out = run_outputs(student, holdout), run_outputs(teacher, holdout)
    kl = sum(float(clip_contrastive_kd(s["logits_per_image"], t["logits_per_image"], 1.0))
             for s, t in zip(s_out, t_out, strict=True)) / len(holdout)
    return kl, 1.0 - output_agreement(s_out, t_out)


def _distil_and_measure(wrapper, data, holdout, rate: float, epochs: int, what: str
                        ) -> tuple[float, float, float, float]:
    """Prune ``wrapper`` by ``rate``, distil it from its dense copy; the held-out gap before and after."""
    teacher = copy.deepcopy(wrapper.model)
    _compress(wrapper, data, holdout, rate=rate)
    student = wrapper.model
    kl0, dis0 = _gap(student, teacher, holdout)
    objective = DistillationObjective(DistillationLoss(model_family(student), temperature=2.0), Teacher(teacher))
    cfg = TrainingSection(learning_rate=1e-3, scheduler="cosine", warmup_steps=4)
    params = trainable_parameters(student, "compressed")
    with CompressionTrainer(student, objective, cfg, train_data=data, params=params, num_epochs=epochs) as trainer:
        trainer.fit()
    kl1, dis1 = _gap(student, teacher, holdout)
    print(f"\nheld-out gap, {rate:.0%} pruned {what}, {epochs * len(data)} steps: similarity KL {kl0:.4f} -> "
          f"{kl1:.4f} ({1 - kl1 / kl0:.0%} closed); 1 - agreement {dis0:.4f} -> {dis1:.4f} "
          f"({1 - dis1 / dis0:.0%} closed)")
    return kl0, kl1, dis0, dis1


def test_a_short_kd_run_closes_the_gap(tiny_clip, make_batches) -> None:
    data, holdout = make_batches(tiny_clip, 8, 16, 1), make_batches(tiny_clip, 2, 16, 2)
    kl0, kl1, dis0, dis1 = _distil_and_measure(tiny_clip, data, holdout, 0.7, 8, "tiny-clip")
    assert kl1 < 0.5 * kl0
    assert dis1 < 0.75 * dis0
    for m in compressed_layers(tiny_clip.model).values():
        assert (m.weight[~m.mask] == 0).all()


@pytest.mark.e2e
def test_kd_on_the_reference_world_closes_the_gap() -> None:
    """The bundled CLIP, 60 % pruned, distilled on world batches: the held-out gap shrinks."""
    from rcc_compression.data.calibration import build_calibration_batches
    from rcc_compression.models import get_model

    wrapper = get_model("rcc-clip-world")
    batches = build_calibration_batches(wrapper, "world", 10, 32, 0)
    kl0, kl1, dis0, dis1 = _distil_and_measure(wrapper, batches[:8], batches[8:], 0.6, 4,
                                               "rcc-clip-world on world batches")
    assert kl1 < 0.5 * kl0 and dis1 < 0.75 * dis0


def test_engine_fine_tuning_is_deterministic_and_learns(make_batches) -> None:
    from rcc_compression.models import get_model

    results = []
    for _ in range(2):
        wrapper = get_model("tiny-blip")
        data = make_batches(wrapper, 3, 4, 0)
        pipe = _compress(wrapper, data, data[:1], rate=0.5, fine_tune_epochs=3)
        stats = pipe.get_stage_results()["stages"]["dare"]
        results.append((stats, [p.detach().clone() for p in wrapper.model.parameters()]))
    (s1, w1), (s2, w2) = results
    assert s1["kd_loss_last_epoch"] < s1["kd_loss_first_epoch"]
    assert s1["kd_loss_first_epoch"] == s2["kd_loss_first_epoch"]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))


def test_blip_recovery_objective_uses_logit_kd(tiny_blip, make_batches) -> None:
    batch = make_batches(tiny_blip, 1, 2, 0)[0]
    teacher = Teacher(copy.deepcopy(tiny_blip.model))
    loss = DistillationLoss(model_family(tiny_blip.model))
    total, terms = DistillationObjective(loss, teacher)(tiny_blip.model, batch)
    assert set(terms) == {"kd", "feature"} and terms["kd"] == pytest.approx(0.0, abs=1e-6)
    out = flatten_outputs(tiny_blip.model(**batch))
    assert "logits" in out and total.item() == pytest.approx(0.0, abs=1e-6)


def _compressed_run(tmp_path: Path, wrapper, make_batches) -> Path:
    run = tmp_path / "run"
    data = make_batches(wrapper, 3, 8, 0)
    _compress(wrapper, data, data[:1], rate=0.6)
    cfg = load_config(None, ["model.name=tiny-clip", "experiment.seed=0"])
    save_compressed(wrapper, run / "compressed", config=dump_config(cfg), records=[{"stage": "dare"}])
    (run / "config.yaml").write_text(yaml.safe_dump(dump_config(cfg)))
    return run


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated world: 24 training scenes with five captions each, 8 for validation."""
    from rcc_compression.data.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, WorldSpec(seed=0, train=24, val=8, test=8, splits=("train", "val"), parts=("captions",)))
    return root


def test_rcc_train_recovers_a_compressed_run_and_resumes(tmp_path: Path, tiny_clip, make_batches,
                                                         small_world: Path) -> None:
    run = _compressed_run(tmp_path, tiny_clip, make_batches)
    out = tmp_path / "recovered"
    sets = ["--data", str(small_world), "--set", "training.batch_size=8", "--set", "training.learning_rate=0.002"]
    assert main(["train", "--from", str(run), "--output", str(out), "-q", *sets,
                 "--set", "training.num_epochs=2"]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["teacher"] == "tiny-clip" and results["steps"] == 6 and results["epochs"] == 2
    assert results["data"]["train"]["items"] == 24 and results["data"]["val"]["split"] == "val"
    # the model kept is the one with the lowest validation loss
    best = min(results["history"], key=lambda h: h["val_loss"])
    assert results["kept"] in ("last", "step 3") and results["after"]["val_loss"] == pytest.approx(best["val_loss"])
    assert results["after"]["val_loss"] < results["before"]["val_loss"]
    assert results["after"]["val_agreement"] > results["before"]["val_agreement"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["config"]["training"]["num_epochs"] == 2 and "git" in record
    recovered = load_compressed(out / "compressed")
    manifest = json.loads((out / "compressed" / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["dare", "train"]
    for m in compressed_layers(recovered.model).values():
        assert (m.weight[~m.mask] == 0).all()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["format"] == "rcc-train-progress" and progress["done"] and progress["step"] == 6
    assert list(series_points(read_metrics_file(out), "train")) == list(range(6))

    # one more epoch from the checkpoint: the first two are not repeated
    assert main(["train", "--from", str(run), "--output", str(out), "-q", "--resume", *sets,
                 "--set", "training.num_epochs=3"]) == 0
    resumed = json.loads((out / "train_results.json").read_text())
    assert resumed["steps"] == 9 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == results["history"]
    assert list(series_points(read_metrics_file(out), "train")) == list(range(9))  # the resumed steps go on at 6
    assert series_points(read_metrics_file(out), "eval/after")[0]["val_loss"] == resumed["after"]["val_loss"]


def test_rcc_train_never_returns_a_worse_model(tmp_path: Path, tiny_clip, make_batches, small_world: Path) -> None:
    run = _compressed_run(tmp_path, tiny_clip, make_batches)
    out = tmp_path / "diverged"
    assert main(["train", "--from", str(run), "--output", str(out), "-q", "--set", "training.learning_rate=5.0",
                 "--set", "training.grad_clip=null", "--set", "training.optimizer=sgd", "--data", str(small_world),
                 "--set", "training.num_epochs=2", "--set", "training.batch_size=8"]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert all(not h["val_loss"] < results["before"]["val_loss"] for h in results["history"])  # it diverged
    assert results["kept"] == "input" and results["after"]["val_loss"] == results["before"]["val_loss"]
    source = load_compressed(run / "compressed").model.state_dict()
    kept = load_compressed(out / "compressed").model.state_dict()
    assert all(torch.equal(source[k], kept[k]) for k in source)


def test_rcc_train_bad_source_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--from", str(tmp_path / "nothing"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "compressed" in err and "\n" not in err


def test_rcc_train_needs_data_and_holds_out_val_when_the_source_has_none(tmp_path: Path, tiny_clip, make_batches,
                                                                        small_world: Path, capsys) -> None:
    run = _compressed_run(tmp_path, tiny_clip, make_batches)
    assert main(["train", "--from", str(run), "-q", "--output", str(tmp_path / "none")]) == 2
    assert "rcc train needs training data: --data SPEC" in capsys.readouterr().err
    # a Conceptual Captions tsv has no val split: 5 % of it (at least one item) is held out, never trained on
    # (the images copied beside the tsv: a dataset's paths stay inside its root)
    images = [shutil.copy(p, tmp_path) for p in sorted((small_world / "images" / "train").iterdir())]
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("".join(f"a picture number {i}\t{Path(p).name}\n" for i, p in enumerate(images)))
    out = tmp_path / "carved"
    assert main(["train", "--from", str(run), "--output", str(out), "-q", "--data", str(tsv),
                 "--set", "training.batch_size=8", "--set", "training.max_steps=2"]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert (results["data"]["train"]["items"], results["data"]["val"]["items"]) == (23, 1)
    record = json.loads((out / "data.json").read_text())
    assert not set(record["identities"]["train"]) & set(record["identities"]["val"])
    assert main(["train", "--from", str(run), "--output", str(out), "-q", "--overwrite", "--data",
                 f"{small_world}@train", "--val", f"{small_world}@train", "--set", "training.max_steps=1"]) == 2
    assert "split leak: 24 image(s) of train are also in val" in capsys.readouterr().err
