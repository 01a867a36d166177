"""Fuzzing the parsers of untrusted input: the config loader (YAML text, nested mappings, ``--set``
strings) and the checkpoint manifest (``validate_manifest`` on any JSON value, ``read_manifest`` on
any bytes), plus ``progress.json``, keys and encrypted blobs. Whatever the input, they either
succeed or raise the project's own error type with a one-line message; never anything else."""

from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.storage import read_manifest, save_compressed, validate_manifest
from rcc_compression.config import RCCConfig, load_config
from rcc_compression.errors import CheckpointError, ConfigError
from rcc_compression.utils.crypto import decrypt_bytes, encrypt_bytes, parse_key

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
WORK = Path(tempfile.mkdtemp(prefix="rcc-fuzz-"))


def _one_line_error(exc: Exception, cls: type[Exception]) -> None:
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip() and "\n" not in msg and len(msg) < 2000, msg[:300]


def _config_outcome(call) -> None:  # noqa: ANN001
    try:
        cfg = call()
    except ConfigError as exc:
        _one_line_error(exc, ConfigError)
    else:
        assert isinstance(cfg, RCCConfig)


# ------------------------------------------------------------------------------ config values
scalars = (st.none() | st.booleans() | st.integers(-(10**20), 10**20)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
keys = st.text(alphabet=string.ascii_letters + "_.-[]0 ", min_size=0, max_size=10)


def _schema(model: type[BaseModel]) -> dict[str, dict | None]:
    tree: dict[str, dict | None] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        tree[name] = _schema(ann) if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tree


def _mapping(tree: dict[str, dict | None]) -> st.SearchStrategy:
    optional = {k: (_mapping(sub) if sub else values) | values for k, sub in tree.items()}
    optional["inherit"] = st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=2) | values
    optional["override"] = values
    return st.fixed_dictionaries({}, optional=optional).flatmap(
        lambda d: st.dictionaries(keys, values, max_size=2).map(lambda extra: {**extra, **d}))


config_mappings = _mapping(_schema(RCCConfig))


@FUZZ
@given(st.text(max_size=300))
def test_config_loader_on_arbitrary_yaml_text(text):
    f = WORK / "fuzz.yaml"
    f.write_text(text, encoding="utf-8")
    _config_outcome(lambda: load_config(f))


@FUZZ
@given(st.binary(max_size=200))
def test_config_loader_on_arbitrary_bytes(data):
    f = WORK / "fuzz-bytes.yaml"
    f.write_bytes(data)
    _config_outcome(lambda: load_config(f))


@pytest.mark.e2e
@FUZZ
@given(config_mappings)
def test_config_loader_on_nested_mappings(data):
    import yaml

    _config_outcome(lambda: load_config(None, data=data))
    f = WORK / "fuzz-mapping.yaml"
    f.write_text(yaml.safe_dump(data), encoding="utf-8")
    _config_outcome(lambda: load_config(f))


set_keys = st.lists(st.sampled_from(["experiment", "model", "compression", "dare", "nullu", "cascade", "stages",
                                     "pruning_rate", "seed", "name", "inherit", "calibration", "batch_size", "x"])
                    | keys, min_size=0, max_size=4).map(".".join)
set_values = st.text(max_size=30) | values.map(lambda v: json.dumps(v, default=str))


@FUZZ
@given(st.lists(st.text(max_size=40) | st.tuples(set_keys, set_values).map("=".join), max_size=4))
def test_config_loader_on_set_strings(sets):
    _config_outcome(lambda: load_config(None, sets))


def test_yaml_edge_cases_the_fuzzer_found():
    cases = {
        "deep.yaml": "[" * 5000,
        "recursive.yaml": "model: &a\n  name: x\n  more: *a\n",
        "recursive-list.yaml": "evaluation:\n  benchmarks: &b [*b]\n",
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                     "experiment: {seed: [*d, *d, *d, *d, *d, *d, *d, *d, *d]}\n",
        "nul-inherit.yaml": 'inherit: "a\\0b"\n',
        "long-inherit.yaml": f"inherit: {'x' * 5000}\n",
        "dev-inherit.yaml": "inherit: /dev/null\n",
        "big-int.yaml": f"experiment: {{seed: {'9' * 5000}}}\n",
    }
    expected = {
        "deep.yaml": "nested too deeply",
        "recursive.yaml": "nested too deeply",
        "recursive-list.yaml": "evaluation.benchmarks",
        "bomb.yaml": "experiment.seed: expected an integer (int), got [[[[",
        "nul-inherit.yaml": "inherit: cannot use path 'a\\x00b': embedded null byte",
        "long-inherit.yaml": "cannot use this path: File name too long (inherited from",
        "dev-inherit.yaml": "not a regular file",
        "big-int.yaml": "YAML value error: Exceeds the limit (4300 digits) for integer string conversion",
    }
    for name, text in cases.items():
        f = WORK / name
        f.write_text(text)
        try:
            load_config(f)
        except ConfigError as exc:
            _one_line_error(exc, ConfigError)
            assert expected[name] in str(exc), (name, str(exc))
        else:
            raise AssertionError(f"{name} was accepted")


# ------------------------------------------------------------------------------ manifests
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=16)


def _valid_manifest() -> dict:
    from reliability_helpers import compressed_mlp

    path = WORK / "manifest-source"
    return save_compressed(compressed_mlp(), path, overwrite=True)


VALID = _valid_manifest()
FIELDS = sorted(VALID) + ["files.layers.safetensors", "layers.fc1", "layers.fc1.in_features", "layers.fc1.dtype",
                          "layers.fc1.encoding", "files.layers.safetensors.sha256", "files.layers.safetensors.bytes"]


def _set_path(doc: dict, dotted: str, value) -> dict:  # noqa: ANN001
    doc = copy.deepcopy(doc)
    parts = dotted.split(".") if not dotted.startswith("files.layers.safetensors") else (
        ["files", "layers.safetensors", *dotted.split(".")[3:]])
    node = doc
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return doc


def _manifest_outcome(call) -> None:  # noqa: ANN001
    try:
        out = call()
    except CheckpointError as exc:
        _one_line_error(exc, CheckpointError)
    else:
        assert isinstance(out, dict)


@FUZZ
@given(json_values)
def test_validate_manifest_on_any_json_value(value):
    _manifest_outcome(lambda: validate_manifest(value))


@FUZZ
@given(st.sampled_from(FIELDS), json_values, st.booleans())
def test_validate_manifest_on_mutated_manifests(field, value, new_key):
    doc = _set_path(VALID, field, value)
    if new_key and isinstance(doc["files"], dict):
        doc["files"] = {**doc["files"], str(value)[:12]: value}
    _manifest_outcome(lambda: validate_manifest(doc))


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_read_manifest_on_arbitrary_bytes(data):
    d = WORK / "ckpt-bytes"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_bytes(data)
    _manifest_outcome(lambda: read_manifest(d))


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"format": st.just("rcc-cascade-progress"), "format_version": st.just(1)},
                               optional={"next_step": json_values, "checkpoint": json_values,
                                         "records": json_values, "done": json_values}).map(
           lambda d: json.dumps(d).encode()))
def test_progress_file_on_arbitrary_bytes(data):
    run = WORK / "run-progress"
    run.mkdir(exist_ok=True)
    (run / "progress.json").write_bytes(data)
    pipe = CascadePipeline(run_dir=run)
    try:
        out = pipe._read_progress()
    except CheckpointError as exc:
        _one_line_error(exc, CheckpointError)
    else:
        assert isinstance(out, dict) and isinstance(out["next_step"], int) and isinstance(out["checkpoint"], str)


# ------------------------------------------------------------------------------ keys and ciphertexts
@FUZZ
@given(st.text(max_size=80))
def test_parse_key_on_arbitrary_text(text):
    try:
        key = parse_key(text)
    except CheckpointError as exc:
        _one_line_error(exc, CheckpointError)
    else:
        assert isinstance(key, bytes) and len(key) == 32


KEY = bytes(range(32))
BLOB = encrypt_bytes(b"tensor bytes " * 8, KEY)


@FUZZ
@given(st.binary(max_size=120) | st.tuples(st.integers(0, len(BLOB) - 1), st.integers(1, 255)).map(
    lambda t: BLOB[:t[0]] + bytes([BLOB[t[0]] ^ t[1]]) + BLOB[t[0] + 1:]))
def test_decrypt_on_arbitrary_or_tampered_blobs(blob):
    try:
        decrypt_bytes(blob, KEY)
    except CheckpointError as exc:
        _one_line_error(exc, CheckpointError)
    else:
        raise AssertionError("a modified or foreign blob decrypted")


def test_manifest_edge_cases():
    d = WORK / "ckpt-edge"
    d.mkdir(exist_ok=True)
    m = d / "manifest.json"
    cases = [
        (b"[" * 100_000, f"{m}: malformed manifest: nested too deeply"),
        (b"1" * 5000, f"{m}: malformed manifest: Exceeds the limit (4300 digits) for integer string conversion"),
        (b'{"format": "rcc-compressed", "format_version": 1e400}',
         f"{m}: unknown format_version inf; this version reads 1, 2, 3, 4"),
        (b'{"format": "rcc-compressed", "format_version": true}',
         f"{m}: unknown format_version True; this version reads 1, 2, 3, 4"),
        (json.dumps({**VALID, "layers": {"fc1": {**VALID["layers"]["fc1"], "in_features": True}}}).encode(),
         f"{m}: layer 'fc1': in_features must be a positive integer"),
        (json.dumps({**VALID, "files": {"a/./b": {"sha256": "0"}}}).encode(), f"{m}: illegal file path 'a/./b'"),
        (json.dumps({**VALID, "encrypted": "yes"}).encode(), f"{m}: field 'encrypted' must be true or false"),
    ]
    for data, expected in cases:
        m.write_bytes(data)
        try:
            read_manifest(d)
        except CheckpointError as exc:
            _one_line_error(exc, CheckpointError)
            assert str(exc).startswith(expected), (str(exc)[:200], expected)
        else:
            raise AssertionError(f"accepted: {data[:60]!r}")
