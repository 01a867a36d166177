"""``rcc data anonymize``: planted personal data out of the captions, metadata out of images, faces blurred, every
format the project reads written back in its own format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from rcc_compression.cli import main
from rcc_compression.data.anonymize import REPORT_NAME, ImageSanitizer, TextScrubber, anonymize_dataset, plant_pii
from rcc_compression.data.datasets import open_dataset
from rcc_compression.data.transforms import ImageTransform
from rcc_compression.data.world import WorldSpec, generate_world
from rcc_compression.errors import DataError

from .conftest import TINY_SPEC, karpathy_entry, write_png

SMALL = ImageTransform(size=16)


@pytest.fixture(scope="module")
def scrubber() -> TextScrubber:
    return TextScrubber(nlp_model=None)


@pytest.mark.e2e
def test_planted_pii_in_the_worlds_captions_is_removed_and_nothing_else_changes(tiny_world: Path,
                                                                               scrubber: TextScrubber) -> None:
    """200 names, e-mails and phones planted in the world's captions: >= 99 % removed, every other character kept."""
    data = json.loads(next((tiny_world / "captions").glob("dataset_*.json")).read_text())
    captions = [s["raw"] for e in data["images"] for s in e["sentences"]]
    assert len(captions) >= 200
    plants = plant_pii(captions, 200, seed=0)
    before = dict(scrubber.counts)
    score = plants.score([scrubber.scrub(c) for c in plants.planted])
    assert score["removed_share"] >= 0.99, score
    assert score["unplanted_changed"] == 0 and score["captions_not_as_expected"] <= 2, score
    counted = {k: v - before.get(k, 0) for k, v in scrubber.counts.items()}
    assert counted == {"PERSON": 67, "EMAIL_ADDRESS": 67, "PHONE_NUMBER": 66} == score["planted_by_type"]


def _jpeg_with_exif(path: Path) -> Path:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # camera make
    exif[0x0132] = "2024:05:01 10:00:00"
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    exif.get_ifd(0x8825).update({1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)})  # GPS
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", exif=exif, quality=95, comment=b"taken at home")
    return path


def _png_with_text(path: Path) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Maria Garcia")
    info.add_text("Location", "12 Example Street")
    write_png(path, 3)
    Image.open(path).save(path, pnginfo=info)
    return path


def test_exif_gps_and_text_chunks_are_gone_and_the_picture_is_kept(tmp_path: Path) -> None:
    jpg = _jpeg_with_exif(tmp_path / "src" / "a.jpg")
    png = _png_with_text(tmp_path / "src" / "b.png")
    with Image.open(jpg) as im:
        assert im.getexif().get_ifd(0x8825) and "comment" in im.info
    images = ImageSanitizer(blur_faces=False)
    clean, info = images.sanitize(jpg.read_bytes(), "a.jpg")
    assert set(info["metadata_removed"]) >= {"exif", "gps", "comment"}
    with Image.open(io.BytesIO(clean)) as im:
        assert im.format == "JPEG" and len(im.getexif()) == 0 and "comment" not in im.info and "exif" not in im.info
        assert im.size == (40, 60)  # the orientation was applied before the tag went
    clean, info = images.sanitize(png.read_bytes(), "b.png")
    assert "text_chunks" in info["metadata_removed"]
    with Image.open(io.BytesIO(clean)) as im, Image.open(png) as orig:
        assert not im.text and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(orig.convert("RGB")))
    assert images.describe()["metadata_removed"]["gps"] == 1


def test_faces_are_blurred_with_the_shipped_detector() -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the test photograph")
    photo = skimage_data.astronaut()  # a portrait bundled with scikit-image
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    images = ImageSanitizer(blur_faces=True)
    clean, info = images.sanitize(buf.getvalue(), "astronaut.png")
    assert info["faces_blurred"] == 1
    out = np.asarray(Image.open(io.BytesIO(clean)).convert("RGB"))
    changed = np.any(out != photo, axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.mean() < 0.1  # only the face moved
    assert 150 < xs.mean() < 300 and 50 < ys.mean() < 200
    assert images._faces(out) == []  # no face left to find


def _karpathy_dir(root: Path) -> Path:
    jpg = _jpeg_with_exif(root / "images" / "img0.jpg")
    write_png(root / "images" / "img1.png", 1)
    entries = [karpathy_entry(0, "test", ["a red circle photo by Maria Garcia", "a red circle"]),
               karpathy_entry(1, "test", ["a blue star, call (415) 555-0134",
                                          "sent by maria.garcia@example.com: a star"])]
    entries[0]["filename"], entries[1]["filename"] = jpg.name, "img1.png"
    for e in entries:
        e["filepath"] = "images"
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    return root


def test_anonymize_a_caption_dataset_on_the_command_line(tmp_path: Path, capsys) -> None:
    src = _karpathy_dir(tmp_path / "coco")
    out = tmp_path / "coco-anon"
    assert main(["data", "anonymize", str(src), "--output", str(out), "--nlp-model", "none", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "replaced: EMAIL_ADDRESS 1, PERSON 1, PHONE_NUMBER 1" in printed and "exif 1" in printed
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["text"]["replaced"] == {"EMAIL_ADDRESS": 1, "PERSON": 1, "PHONE_NUMBER": 1}
    assert "Maria" not in json.dumps(report) and "555-0134" not in json.dumps(report)  # the report repeats no PII
    assert {f["path"] for f in report["files_changed"]} == {"dataset_coco.json", "images/img0.jpg"}
    ds = open_dataset(out / "dataset_coco.json", "test", transform=SMALL)
    assert [r.captions for r in ds.records] == [["a red circle photo by <PERSON>", "a red circle"],
                                                ["a blue star, call <PHONE_NUMBER>", "sent by <EMAIL_ADDRESS>: a star"]]
    assert ds[0]["error"] is None and ds[1]["error"] is None
    with Image.open(out / "images" / "img0.jpg") as im:
        assert len(im.getexif()) == 0
    assert main(["data", "anonymize", str(src), "--output", str(out), "--nlp-model", "none"]) == 2
    assert "not empty (pass --overwrite" in capsys.readouterr().err


@pytest.mark.e2e
def test_every_format_is_written_back_in_its_own_format(tmp_path: Path, scrubber: TextScrubber) -> None:
    """A generated world (Karpathy captions, VQA, class folders), a tsv and a saved Hugging Face dataset."""
    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=1, **TINY_SPEC))
    q = next((world / "vqa").glob("questions_test.json"))
    qdata = json.loads(q.read_text())
    qdata["questions"][0]["question"] = "what colour is the shape Maria Garcia drew?"
    q.write_text(json.dumps(qdata))
    report = anonymize_dataset(world, tmp_path / "world-anon", nlp_model=None, blur_faces=False)
    assert report["text"]["replaced"] == {"PERSON": 1}
    for part, task in (("captions", None), ("vqa", "vqa"), ("colour_shape", "classification")):
        before = open_dataset(f"{world}", "test", task=task or part, transform=SMALL)
        after = open_dataset(f"{tmp_path / 'world-anon'}", "test", task=task or part, transform=SMALL)
        assert len(after) == len(before) and after[0]["error"] is None
    vqa = open_dataset(tmp_path / "world-anon", "test", task="vqa", transform=SMALL)
    assert vqa.records[0].question == "what colour is the shape <PERSON> drew?"
    # Conceptual Captions tsv
    cc = tmp_path / "cc"
    write_png(cc / "a.png", 1)
    (cc / "train.tsv").write_text("caption\timage\na red circle by John Smith\ta.png\n")
    anonymize_dataset(cc, tmp_path / "cc-anon", nlp_model=None, blur_faces=False)
    assert open_dataset(tmp_path / "cc-anon" / "train.tsv").records[0].captions == ["a red circle by <PERSON>"]
    # a saved Hugging Face dataset with embedded image bytes
    datasets = pytest.importorskip("datasets")
    jpeg = _jpeg_with_exif(tmp_path / "x.jpg").read_bytes()
    ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg, "path": None}],
                                     "caption": ["a green heart, mail olga.petrova@example.org"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    report = anonymize_dataset(tmp_path / "hf", tmp_path / "hf-anon", nlp_model=None, blur_faces=False)
    assert report["images"]["metadata_removed"].get("gps") == 1
    back = open_dataset(tmp_path / "hf-anon", "test", transform=SMALL)
    assert back.records[0].captions == ["a green heart, mail <EMAIL_ADDRESS>"] and back[0]["error"] is None


def test_a_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    src = _karpathy_dir(tmp_path / "coco")
    (src / "images" / "leak.png").symlink_to(write_png(tmp_path / "private" / "p.png", 4))
    with pytest.raises(DataError, match="outside the dataset root"):
        anonymize_dataset(src, tmp_path / "out", nlp_model=None, blur_faces=False)
    assert not (tmp_path / "out").exists()
