"""A checkpoint is read through its manifest: only listed files, each read once and checked as read."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rcc_compression import get_model, load_compressed, save_compressed
from rcc_compression.errors import CheckpointError

WORDS = ["a red circle", "zebraword on the left"]
_OPENS: dict = {"on": False, "paths": []}


def _audit(event: str, args: tuple) -> None:
    if _OPENS["on"] and event == "open":
        _OPENS["paths"].append(str(args[0]))


sys.addaudithook(_audit)


def embeddings(wrapper) -> tuple[np.ndarray, np.ndarray]:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    with torch.no_grad():
        return wrapper.encode_image([img]).numpy(), wrapper.encode_text(WORDS).numpy()


@pytest.fixture
def saved(tmp_path):
    wrapper = get_model("tiny-clip")
    path = tmp_path / "ckpt"
    save_compressed(wrapper, path)
    return path, embeddings(wrapper)


def test_files_added_to_a_checkpoint_are_not_read(saved, caplog):
    path, (img_want, txt_want) = saved
    # a processor config that changes the image mean/std, and a token whose id is past the vocabulary
    (path / "processor" / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_mean": [0.9, 0.1, 0.9], "image_std": [0.05, 0.05, 0.05]}}))
    pre = json.loads((path / "processor" / "preprocessor_config.json").read_text())
    (path / "processor" / "preprocessor_config.json.bak").write_text(json.dumps(pre))
    (path / "processor" / "added_tokens.json").write_text(json.dumps({"zebraword": 99999}))
    with caplog.at_level("WARNING"):
        loaded = load_compressed(path)
    img, txt = embeddings(loaded)
    np.testing.assert_array_equal(img, img_want)
    np.testing.assert_array_equal(txt, txt_want)
    assert "ignoring 3 file(s) the manifest does not list" in caplog.text and "added_tokens.json" in caplog.text


def test_each_listed_file_is_read_once_and_checked_as_read(saved):
    path, _ = saved
    _OPENS.update(on=True, paths=[])
    try:
        load_compressed(path)
    finally:
        _OPENS["on"] = False
    reads = [p for p in _OPENS["paths"] if p.startswith(str(path))]
    for name in ("layers.safetensors", "rest.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert sum(p.endswith(name) for p in reads) == 1, (name, reads)  # hashed and used from one read


def test_a_listed_file_changed_on_disk_is_refused(saved):
    path, _ = saved
    f = path / "processor" / "tokenizer_config.json"
    f.write_text(f.read_text() + " ")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is longer than saved"):
        load_compressed(path)
