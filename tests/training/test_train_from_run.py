"""``rcc train --from RUN`` on a run made by ``rcc compress`` from the world's captions, which differ in length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcc_compression.cli import main
from rcc_compression.config import load_config
from rcc_compression.data.collate import pad_collate
from rcc_compression.jobs.common import calibration_batches
from rcc_compression.models import get_model
from rcc_compression.training.distributed import BatchesDataset

CALIBRATION = ["--set", "calibration.source=world", "--set", "calibration.num_batches=4", "--set",
               "calibration.batch_size=8", "--set", "calibration.holdout_batches=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as ``rcc compress`` leaves it (the bundled CLIP, dare at 50 %, world calibration)."""
    run = tmp_path_factory.mktemp("compress") / "run"
    assert main(["compress", "--model", "rcc-clip-world", *CALIBRATION, "--set", "compression.cascade.stages=[dare]",
                 "--set", "compression.dare.iterations=1", "--set", "compression.dare.fine_tune_epochs=0",
                 "--set", "compression.dare.pruning_rate=0.5", "--set", "compression.cascade.validation_threshold=0",
                 "--no-eval", "--output", str(run), "-q"]) == 0
    return run


@pytest.mark.e2e
def test_the_runs_captions_differ_in_length(run: Path) -> None:
    batches = calibration_batches(get_model("rcc-clip-world"), load_config(run / "config.yaml"))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1


def test_padding_keeps_each_samples_outputs() -> None:
    """Samples of batches padded to different lengths, padded again together, give the outputs they gave alone."""
    wrapper = get_model("rcc-clip-world")
    batches = calibration_batches(wrapper, load_config(None, ["calibration.source=world", "calibration.num_batches=3",
                                                              "calibration.batch_size=4"]))
    samples = BatchesDataset(batches)
    pad_id = wrapper.tokenizer.pad_token_id
    merged = pad_collate([samples[i] for i in range(len(samples))], pad_token_id=pad_id)
    assert merged["input_ids"].shape[1] == max(b["input_ids"].shape[1] for b in batches)
    assert (merged["attention_mask"].sum(1) == torch.cat([b["attention_mask"].sum(1) for b in batches])).all()
    with torch.no_grad():
        alone = torch.cat([wrapper.model(**b).text_embeds for b in batches])
        together = wrapper.model(**merged).text_embeds
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_rcc_train_from_a_compress_run(run: Path, tmp_path: Path) -> None:
    """The run calibrated on the world; recovery streams a world's train split (small here) through the model."""
    from rcc_compression.data.world import WorldSpec, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=0, train=32, val=8, test=8, splits=("train", "val"), parts=("captions",)))
    out = tmp_path / "recovered"
    assert main(["train", "--from", str(run), "--data", str(world), "--output", str(out), "-q",
                 "--set", "training.num_epochs=1", "--set", "training.batch_size=8",
                 "--set", "training.learning_rate=0.0005"]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["steps"] == 4 and results["kept"] in ("last", "input", "step 4")
    assert results["after"]["val_loss"] <= results["before"]["val_loss"]


@pytest.mark.parametrize(("config_text", "expected"), [
    ("model: [unclosed", "YAML syntax error"),
    ("- a list\n- not a mapping\n", "top level must be a mapping"),
    ("model: {name: rcc-clip-world, size: 3}\n", "model.size: unknown key 'size'"),
])
def test_rcc_train_from_a_run_with_a_broken_config_is_one_line(run: Path, tmp_path: Path, capsys, config_text,
                                                               expected) -> None:
    broken = tmp_path / "broken"
    (broken / "compressed").mkdir(parents=True)
    for f in (run / "compressed").iterdir():
        if f.is_file():
            (broken / "compressed" / f.name).write_bytes(f.read_bytes())
    (broken / "config.yaml").write_text(config_text)
    assert main(["train", "--from", str(broken), "--output", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err and str(broken / "config.yaml") in err


@pytest.mark.e2e
def test_private_rcc_train_from_a_compress_run(run: Path, tmp_path: Path, capsys) -> None:
    """``training.privacy`` through the command line: Poisson batches of the world's train split, the epsilon spent
    printed and recorded, no membership list in data.json."""
    from rcc_compression.data.world import WorldSpec, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=0, train=32, val=8, test=8, splits=("train", "val"), parts=("captions",)))
    out = tmp_path / "private"
    assert main(["train", "--from", str(run), "--data", str(world), "--output", str(out), "-q", "--steps", "3",
                 "--set", "training.batch_size=8", "--set", "training.kd_weight=0",
                 "--set", "training.privacy.epsilon=8", "--set", "training.privacy.delta=0.001"]) == 0
    assert "privacy: epsilon" in capsys.readouterr().out
    results = json.loads((out / "train_results.json").read_text())
    private = results["privacy"]
    assert results["steps"] == 3 and private["steps"] == 3 and 0 < private["epsilon_spent"] <= 8
    assert private["items"] == 32 and private["sample_rate"] == 0.25
    assert "train" not in json.loads((out / "data.json").read_text())["identities"]
    manifest = json.loads((out / "compressed" / "manifest.json").read_text())
    assert manifest["stages"][-1]["privacy"]["epsilon_spent"] == private["epsilon_spent"]
    # the contrastive terms are refused, in one line
    assert main(["train", "--from", str(run), "--data", str(world), "--output", str(tmp_path / "no"), "-q",
                 "--set", "training.batch_size=8", "--set", "training.privacy.epsilon=8",
                 "--set", "training.privacy.delta=0.001"]) == 2
    assert "training.kd_weight" in capsys.readouterr().err
