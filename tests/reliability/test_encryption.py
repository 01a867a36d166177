"""Encryption at rest: AES-256-GCM checkpoints (``--encrypt`` / ``--key-file`` / ``RCC_CHECKPOINT_KEY``),
files 0600, a wrong or missing key and a modified file refused with a clear error."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from reliability_helpers import MLP, assert_same_state, compressed_mlp, model_state
from safetensors.torch import load_file

from rcc_compression.cli import main
from rcc_compression.compression.storage import load_compressed, save_compressed
from rcc_compression.errors import CheckpointError
from rcc_compression.utils.crypto import KEY_ENV, MAGIC, key_id, load_key

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
TINY = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=3",
        "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=1",
        "--set", "compression.dare.fine_tune_epochs=0", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[]",
        "--no-eval", "-q"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_round_trip_and_permissions(tmp_path, umask_022):
    model = compressed_mlp()
    enc, plain = tmp_path / "enc", tmp_path / "plain"
    manifest = save_compressed(model, enc, encrypt_key=KEY)
    save_compressed(model, plain)
    assert manifest["encrypted"] is True and manifest["key_id"] == key_id(KEY)
    for name in ("layers.safetensors", "rest.safetensors"):
        data = (enc / name).read_bytes()
        assert data.startswith(MAGIC) and b"dtype" not in data and b"fc1" not in data
        assert _mode(enc / name) == 0o600 and _mode(plain / name) == 0o644
    assert _mode(enc / "manifest.json") == 0o600 and _mode(plain / "manifest.json") == 0o644
    assert _mode(enc) == 0o700 and _mode(plain) == 0o755
    loaded = load_compressed(enc, model=MLP(), key=KEY)
    assert_same_state(model_state(loaded), model_state(model))


@pytest.fixture
def encrypted(tmp_path) -> Path:
    path = tmp_path / "enc"
    save_compressed(compressed_mlp(), path, encrypt_key=KEY)
    return path


def test_wrong_key_is_refused(encrypted):
    with pytest.raises(CheckpointError) as err:
        load_compressed(encrypted, model=MLP(), key=OTHER)
    assert str(err.value) == (f"{encrypted}: wrong key: the checkpoint was encrypted with key id {key_id(KEY)}, "
                              f"the given key has id {key_id(OTHER)}")


def test_wrong_key_without_a_key_id_fails_authentication(encrypted):
    m = json.loads((encrypted / "manifest.json").read_text())
    del m["key_id"]
    (encrypted / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as err:
        load_compressed(encrypted, model=MLP(), key=OTHER)
    assert str(err.value) == (f"{encrypted / 'layers.safetensors'}: decryption failed: wrong key or the file was "
                              "modified")


def test_missing_key_is_refused(encrypted):
    with pytest.raises(CheckpointError) as err:
        load_compressed(encrypted, model=MLP())
    assert str(err.value) == f"{encrypted}: checkpoint is encrypted; give the key (RCC_CHECKPOINT_KEY or a key file)"


@pytest.mark.parametrize("verify", [True, False])
def test_tampered_ciphertext_is_refused(encrypted, verify):
    f = encrypted / "rest.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x80
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_compressed(encrypted, model=MLP(), key=KEY, verify=verify)
    assert str(err.value) == (f"{encrypted}: file rest.safetensors is corrupt (sha256 mismatch; truncated or modified)"
                              if verify else f"{f}: decryption failed: wrong key or the file was modified")


def test_plaintext_swapped_in_for_an_encrypted_manifest_is_refused(encrypted, tmp_path):
    plain = tmp_path / "plain"
    save_compressed(compressed_mlp(), plain)
    m = json.loads((encrypted / "manifest.json").read_text())
    m["encrypted"] = False
    (encrypted / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as err:
        load_compressed(encrypted, model=MLP(), key=KEY)
    assert str(err.value) == f"{encrypted / 'layers.safetensors'}: file is encrypted but the manifest says it is not"


@pytest.mark.parametrize("form", ["hex", "base64", "raw"])
def test_key_file_forms(tmp_path, form):
    f = tmp_path / "key"
    f.write_bytes({"hex": KEY.hex().encode() + b"\n", "base64": base64.b64encode(KEY), "raw": KEY}[form])
    assert load_key(f) == KEY


def test_bad_keys_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "abc")
    with pytest.raises(CheckpointError, match=r"^RCC_CHECKPOINT_KEY: encryption key must be 64 hex digits or "
                                              r"base64 of 32 bytes$"):
        load_key()
    short = tmp_path / "short"
    short.write_text(KEY[:16].hex())
    with pytest.raises(CheckpointError, match=rf"^{short}: encryption key must be 32 bytes \(AES-256\), got 16$"):
        load_key(short)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope'}: key file not found$"):
        load_key(tmp_path / "nope")
    monkeypatch.delenv(KEY_ENV)
    assert load_key() is None


# --------------------------------------------------------------------------- the command line
@pytest.mark.e2e
def test_cli_encrypt_writes_encrypted_checkpoints_with_the_same_weights(tmp_path, monkeypatch, capsys, umask_022):
    plain, enc = tmp_path / "plain", tmp_path / "enc"
    assert main(["compress", *TINY, "--output", str(plain)]) == 0
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    assert main(["compress", *TINY, "--output", str(enc), "--encrypt"]) == 0
    ckpt = next((enc / "checkpoints").iterdir())
    for d in (enc / "compressed", ckpt):
        m = json.loads((d / "manifest.json").read_text())
        assert m["encrypted"] is True and m["key_id"] == key_id(KEY)
        assert (d / "layers.safetensors").read_bytes().startswith(MAGIC) and _mode(d / "layers.safetensors") == 0o600
    assert json.loads((enc / "run.json").read_text())["encrypted"] is True
    wrapper = load_compressed(enc / "compressed", key=KEY)
    reference = load_compressed(plain / "compressed")
    assert_same_state(model_state(wrapper.model), model_state(reference.model))
    # a finished encrypted run resumes (re-saving compressed/) only with its key, and stays encrypted
    monkeypatch.delenv(KEY_ENV)
    capsys.readouterr()
    assert main(["compress", "--resume", str(enc), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: this run's checkpoints are encrypted: no key given; set RCC_CHECKPOINT_KEY (64 hex digits or base64 "
        "of 32 bytes) or pass --key-file")
    wrong = tmp_path / "wrong.key"
    wrong.write_text(OTHER.hex())
    assert main(["compress", "--resume", str(enc), "-q", "--key-file", str(wrong)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ckpt}: wrong key: the checkpoint was encrypted with key id {key_id(KEY)}, the given key has id "
        f"{key_id(OTHER)}")
    right = tmp_path / "right.key"
    right.write_bytes(KEY)
    assert main(["compress", "--resume", str(enc), "-q", "--key-file", str(right)]) == 0
    assert json.loads((enc / "compressed" / "manifest.json").read_text())["encrypted"] is True
    assert torch.equal(load_file(plain / "compressed" / "rest.safetensors")["logit_scale"],
                       load_compressed(enc / "compressed", key=KEY).model.logit_scale.detach())


def test_cli_encrypt_without_a_key_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    out = tmp_path / "run"
    assert main(["compress", *TINY, "--output", str(out), "--encrypt"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --encrypt: no key given; set RCC_CHECKPOINT_KEY (64 hex digits "
                                               "or base64 of 32 bytes) or pass --key-file")
    assert not out.exists()
