"""``rcc serve`` as a user runs it: a subprocess on a free 127.0.0.1 port; ``rcc keys add``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")


def test_rcc_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path):
    from rcc_compression.cli import main
    from rcc_compression.serving.auth import KeyStore

    path = tmp_path / "keys.json"
    assert main(["keys", "add", str(path), "--id", "alice", "--models", "rcc-clip-world"]) == 0
    assert main(["keys", "add", str(path), "--id", "alice"]) == 2  # duplicate id: one-line error
    data = json.loads(path.read_text())
    assert [k["id"] for k in data["keys"]] == ["alice"] and data["keys"][0]["models"] == ["rcc-clip-world"]
    assert set(data["keys"][0]) == {"id", "sha256", "models"}
    assert KeyStore.load(path).records[0].sha256 == data["keys"][0]["sha256"]


def test_rcc_serve_generates_a_key_binds_loopback_and_serves(tmp_path):
    from rcc_compression.serving.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rcc_compression", "serve", "rcc-clip-world", "--port", str(port),
                             "--threads", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    try:
        key = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("API key"):
                key = line.rsplit(" ", 1)[-1].strip()
            if line.startswith("serving on"):
                break
        assert key and key.startswith("rcc_"), lines
        assert f"serving on http://127.0.0.1:{port}" in lines[-1]
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        r = httpx.post(url + "/v1/embed/text", json={"texts": ["a red circle"]},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) > 0
        assert httpx.post(url + "/v1/embed/text", json={"texts": ["a"]}).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert sum(line.count(key) for line in lines + out.splitlines()) == 1, "the key is shown once"


def test_no_auth_needs_loopback():
    from rcc_compression.cli import main

    assert main(["serve", "rcc-clip-world", "--no-auth", "--host", "0.0.0.0"]) == 2
