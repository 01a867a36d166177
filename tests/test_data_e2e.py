"""Real data formats through every job: compress -> train (with val) -> evaluate from the command line.

A 3-class ImageNet-style folder and a COCO Karpathy json are written from generated images; the
jobs read them by config. Every job records the identities (pixel hashes) of the images each role
used in ``data.json``; the test compares them with the files it wrote itself: calibration and
training images come from the train split only, and none of them is in val or test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from rcc_compression.cli import main
from rcc_compression.data.datasets import ImageFolderDataset, KarpathyCaptionsDataset
from rcc_compression.data.splits import image_identities
from rcc_compression.data.world import classification_scenes, render_scene, world_scenes

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    imagenet = root / "imagenet"
    for split, per_class in (("train", 1), ("val", 1), ("test", 1)):
        for index, scene in classification_scenes(0, split, per_class):
            shape = scene.objects[0].shape
            if shape in SHAPES:
                folder = imagenet / split / f"n0{SHAPES.index(shape)}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render_scene(scene)).save(folder / f"{index:04d}.png")
    (imagenet / "classnames.txt").write_text("".join(f"n0{i}\t{s}\n" for i, s in enumerate(SHAPES)))
    coco = root / "coco"
    (coco / "val2014").mkdir(parents=True)
    entries = []
    for split, count in (("train", 48), ("restval", 16), ("val", 16), ("test", 24)):
        world_split = "train" if split == "restval" else split
        start = 48 if split == "restval" else 0
        for item in world_scenes(0, world_split, count, start=start):
            name = f"COCO_val2014_{len(entries):012d}.png"
            Image.fromarray(item.image).save(coco / "val2014" / name)
            entries.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": len(entries),
                            "sentences": [{"raw": c} for c in item.captions]})
    (coco / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    return {"imagenet": imagenet, "coco": coco}


def _ids(ds) -> set[str]:
    return set(image_identities(ds, None, "content"))


@pytest.mark.e2e
def test_compress_train_evaluate_on_imagenet_and_coco(data: dict[str, Path], tmp_path: Path) -> None:
    imagenet, coco = str(data["imagenet"]), str(data["coco"])
    files = {split: _ids(KarpathyCaptionsDataset(data["coco"] / "dataset_coco.json", split))
             for split in ("train", "val", "test")}
    files["imagenet_test"] = _ids(ImageFolderDataset(data["imagenet"], "test"))
    assert not (files["train"] & (files["val"] | files["test"] | files["imagenet_test"]))
    assert not files["val"] & files["test"]

    compressed = tmp_path / "compressed"
    assert main([
        "compress", "--model", "rcc-clip-world", "--output", str(compressed), "-q",
        "--set", f"calibration.source={coco}", "--set", "calibration.num_batches=2",
        "--set", "calibration.batch_size=16", "--set", "calibration.holdout_batches=1",
        "--set", f"dataset.val={coco}", "--set", f"dataset.test={imagenet}",
        "--set", "evaluation.benchmarks=[zero_shot]", "--set", "evaluation.bootstrap_samples=0",
        "--set", "compression.cascade.stages=[nullu]", "--set", "compression.nullu.rank_reduction=0.6",
        "--set", "compression.nullu.energy_threshold=null", "--set", "compression.cascade.validation_threshold=0",
    ]) == 0
    record = json.loads((compressed / "data.json").read_text())
    ids = {role: set(v) for role, v in record["identities"].items()}
    assert ids["calibration"] and ids["calibration"] <= files["train"]
    assert ids["val"] == files["val"] and ids["test"] == files["imagenet_test"]
    results = json.loads((compressed / "results.json").read_text())
    assert f"zero_shot {imagenet} top1" in results["quality"]["compressed"]

    recovered = tmp_path / "recovered"
    assert main([
        "train", "--from", str(compressed), "--data", coco, "--val", coco, "--steps", "6", "--output",
        str(recovered), "-q", "--set", "training.batch_size=16", "--set", "training.eval_every_steps=3",
        "--set", "training.learning_rate=0.0005", "--set", "training.val_benchmarks=[retrieval]",
        "--set", "training.monitor=val_retrieval_i2t_R@1",
    ]) == 0
    trained = json.loads((recovered / "train_results.json").read_text())
    assert trained["steps"] == 6 and [h["step"] for h in trained["history"]] == [3, 6]
    assert all("val_retrieval_i2t_R@1" in h and "val_loss" in h for h in trained["history"])
    assert trained["kept"] in ("input", "last", "step 3", "step 6")
    assert (recovered / "checkpoints" / "best").is_dir() and (recovered / "checkpoints" / "last").is_dir()
    record = json.loads((recovered / "data.json").read_text())
    assert set(record["identities"]["train"]) == files["train"]
    assert set(record["identities"]["val"]) == files["val"]
    assert trained["data"]["train"]["items"] == 64  # Karpathy train includes restval

    evaluated = tmp_path / "evaluated"
    assert main(["evaluate", "-m", str(recovered / "compressed"), "-b", "zero_shot", "-b", "retrieval",
                 "-d", imagenet, "-d", coco, "--bootstrap", "0", "-o", str(evaluated), "-q"]) == 0
    res = json.loads((evaluated / "results.json").read_text())
    assert set(res["results"]["zero_shot"]) == {imagenet} and set(res["results"]["retrieval"]) == {coco}
    assert res["results"]["retrieval"][coco]["metrics"]["i2t_R@1"]["n"] == 24  # the test split
    assert res["lineage_checked"] == [str(recovered), str(compressed)]


def test_a_leaked_image_stops_every_job(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    leaky = tmp_path / "imagenet"
    shutil.copytree(data["imagenet"], leaky)
    test_image = next((leaky / "test" / "n01").iterdir())
    shutil.copy(test_image, leaky / "train" / "n01" / "copied.png")
    assert main(["compress", "--model", "rcc-clip-world", "--output", str(tmp_path / "r"), "-q",
                 "--set", f"calibration.source={leaky}", "--set", "calibration.num_batches=1",
                 "--set", f"calibration.batch_size={len(list((leaky / 'train').rglob('*.png')))}",
                 "--set", "calibration.holdout_batches=0", "--set", f"dataset.test={leaky}",
                 "--set", "evaluation.benchmarks=[zero_shot]"]) == 2
    err = capsys.readouterr().err
    assert "split leak: 1 image(s) of calibration are also in test" in err and "copied.png" in err
