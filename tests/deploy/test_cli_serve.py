"""``rcc serve`` as a user runs it: a subprocess on a free 127.0.0.1 port; ``rcc keys add``."""

from __future__ import annotations

import json
import os
import stat
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


@pytest.mark.e2e
def test_rcc_serve_generates_a_key_binds_loopback_and_serves(tmp_path):
    """Output to a pipe (a log): the generated key goes to a 0600 file, never to the output."""
    from rcc_compression.serving.server import free_port

    port = free_port()
    key_file = tmp_path / "serve.key"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rcc_compression", "serve", "rcc-clip-world", "--port", str(port),
                             "--threads", "1", "-q", "--key-out", str(key_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving on"):
                break
        assert any(line.startswith(f"API key written to {key_file} (mode 0600") for line in lines), lines
        key = key_file.read_text().strip()
        assert key.startswith("rcc_") and stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
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
    assert sum(line.count(key) for line in lines + out.splitlines()) == 0, "the key never reaches the output"


@pytest.mark.e2e
def test_generated_key_is_shown_on_a_terminal_only(tmp_path):
    """Standard output a terminal: the key is shown there once. Redirected without --key-out: refused."""
    import pty

    from rcc_compression.cli import main
    from rcc_compression.serving.server import free_port

    assert main(["serve", "tiny-clip", "--port", str(free_port())]) == 2  # pytest's captured stdout is no terminal
    port = free_port()
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rcc_compression", "serve", "tiny-clip", "--port", str(port), "-q"],
                            stdout=follower, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while b"serving on" not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(leader, 4096)
            except OSError:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert text.count("API key (shown once; only its hash is kept): rcc_") == 1, text


def test_no_auth_needs_loopback():
    from rcc_compression.cli import main

    assert main(["serve", "rcc-clip-world", "--no-auth", "--host", "0.0.0.0"]) == 2


@pytest.mark.parametrize("args,message", [
    (["tiny-clip", "a=tiny-clip", "a=tiny-blip"], "served model names must differ: a given more than once"),
    (["no-such-org/no-such-model", "--no-auth"], "rcc serve does not download models unless asked (--allow-download)"),
    (["tiny-clip", "--keys", "KEYS"], "key 'alice' names model(s) ['rcc-blip-world'] that are not served; served: "
                                      "['tiny-clip']"),
])
def test_serve_refuses_bad_setups_in_one_line_before_loading(tmp_path, capsys, args, message):
    from rcc_compression.cli import main
    from rcc_compression.serving.auth import KeyStore

    store = KeyStore()
    store.add("alice", ["rcc-blip-world"])
    store.save(tmp_path / "keys.json")
    args = [str(tmp_path / "keys.json") if a == "KEYS" else a for a in args]
    assert main(["serve", *args, "--key-out", str(tmp_path / "k")] if "--keys" not in args and "--no-auth" not in args
                else ["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
