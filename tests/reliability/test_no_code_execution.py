"""No code execution on load: tensors only through safetensors, metadata through JSON and safe YAML,
``torch.load`` only with ``weights_only=True``. Planted pickles with a payload are refused and the
payload never runs (each test first shows that a plain unpickle would have run it)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from reliability_helpers import MLP

from rcc_compression.compression.storage import load_compressed
from rcc_compression.config import load_config
from rcc_compression.errors import CheckpointError, ConfigError
from rcc_compression.utils.io import safe_torch_load

SRC = Path(__file__).resolve().parents[2] / "src" / "rcc_compression"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def payload(tmp_path) -> tuple[bytes, Path]:
    """A pickle with a payload, and the marker file it would create; shown live once, then cleared."""
    marker = tmp_path / "payload-ran"
    data = pickle.dumps({"weight": Payload(marker)})
    pickle.loads(data)  # noqa: S301 - the control: a plain unpickle runs it
    assert marker.exists()
    marker.unlink()
    return data, marker


def _plant(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and fix its manifest entry, as an attacker holding both would."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["layers.safetensors", "rest.safetensors"])
def test_pickle_in_place_of_a_checkpoint_file_is_refused(ckpt, payload, name):
    path, _ = ckpt
    data, marker = payload
    _plant(path, name, data)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / name}: not a valid safetensors file (")):
        load_compressed(path, model=MLP())
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["raw pickle .bin", "torch.save .pt"])
def test_safe_torch_load_refuses_a_payload(tmp_path, payload, fmt):
    data, marker = payload
    f = tmp_path / ("model.bin" if fmt.startswith("raw") else "model.pt")
    if fmt.startswith("raw"):
        f.write_bytes(data)
    else:
        torch.save({"weight": torch.ones(2), "extra": Payload(marker)}, f)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(f)
    assert str(err.value).startswith(f"{f}: refused: not a plain tensor file (Weights only load failed")
    assert not marker.exists()


def test_safe_torch_load_still_reads_plain_tensors(tmp_path):
    f = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "meta": {"step": 3, "names": ["a"]}}, f)
    got = safe_torch_load(f)
    assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3)) and got["meta"] == {"step": 3, "names": ["a"]}


def test_manifest_cannot_name_a_class_to_construct(ckpt):
    path, _ = ckpt
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model"] = {"class": "os.system", "config": {"x": 1}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape("checkpoint holds a custom nn.Module; pass model=")):
        load_compressed(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_model_directory_with_a_pickled_payload_never_runs_it(tmp_path, tiny_clip, payload):
    from rcc_compression.models import get_model

    data, marker = payload
    model_dir = tmp_path / "model"
    tiny_clip.model.config.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever transformers raises; the point is the marker
        get_model(str(model_dir))
    assert "Weights only load failed" in str(err.value) or "weights_only" in str(err.value)
    assert not marker.exists()


def test_yaml_python_tags_are_not_constructed(tmp_path):
    marker = tmp_path / "payload-ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'experiment: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == (f"config error: {cfg}: line 1, column 13: YAML syntax error: could not determine a "
                              "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert not marker.exists()


_UNSAFE_MODULE_LOAD = re.compile(r"(c?pickle|marshal|shelve|dill|joblib)\.(load|loads|open|Unpickler)")
_UNSAFE_YAML = re.compile(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)")


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that could run code from data: ``torch.load`` without ``weights_only=True``, pickle-family
    loads, YAML loaders other than ``safe_load``, ``eval``/``exec``, ``allow_pickle`` loads."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        bad = False
        if name.endswith("torch.load") or (name == "load" and "weights_only" in kw):
            bad = not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True)
        elif _UNSAFE_MODULE_LOAD.fullmatch(name) or _UNSAFE_YAML.fullmatch(name) or name in ("eval", "exec"):
            bad = True
        elif name.endswith(".load") and "allow_pickle" in kw:
            bad = True
        if bad:
            problems.append(f"{filename}:{node.lineno} {name}")
    return problems


def test_the_checker_finds_unsafe_loaders():
    bad = ("torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nyaml.load(t, Loader=L)\n"
           "np.load(f, allow_pickle=True)\neval(s)\n")
    good = "torch.load(f, weights_only=True)\nyaml.safe_load(t)\njson.loads(t)\nload_file(p)\n"
    assert unsafe_calls(bad, "bad.py") == ["bad.py:1 torch.load", "bad.py:2 torch.load", "bad.py:3 pickle.loads",
                                           "bad.py:4 yaml.load", "bad.py:5 np.load", "bad.py:6 eval"]
    assert unsafe_calls(good) == []


def test_the_code_base_has_no_unsafe_loader():
    problems = [p for f in sorted(SRC.rglob("*.py")) for p in unsafe_calls(f.read_text(), str(f.relative_to(SRC)))]
    assert problems == []
    io_src = (SRC / "utils" / "io.py").read_text()  # the one torch.load is the restricted one
    assert io_src.count("torch.load(") == 1 and "weights_only=True" in io_src
