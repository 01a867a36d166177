"""What one client can do to `rcc serve` on 127.0.0.1: the answers and the server's memory, in one run.

Starts ``rcc serve rcc-clip-world --timeout 5 --key-out FILE`` (default limits) as a subprocess on
a free loopback port and sends: eight text requests with a ninth holding a lone surrogate;
format-string templates; image bombs (4096 x 4096 PNGs of 48 KB) eight in one request, two in one
request, and six such requests at once with one key; a header declaring 100000 x 100000; a
404, a 405 and /readyz with and without a key; a public path with a declared body. Prints each
answer's status and error, and the server's resident memory (VmRSS, peak VmHWM) around the bombs.

Usage: python benchmarks/serve_limits.py [--port PORT]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image


def png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def png_header(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def memory_mb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def show(name: str, r: httpx.Response, seconds: float | None = None) -> None:
    took = f" ({seconds:.3f} s)" if seconds is not None else ""
    print(f"{name}{took}: {r.status_code} {r.text[:300]}")


def start(port: int, key_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "rcc_compression", "serve", "rcc-clip-world", "--port", str(port),
                             "--timeout", "5", "--key-out", str(key_file), "--threads", "1", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("serving on"):
            break
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def texts_and_templates(url: str, auth: dict[str, str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        good = [pool.submit(httpx.post, url + "/v1/embed/text", json={"texts": [f"a photo {i}"]}, headers=auth)
                for i in range(8)]
        bad = pool.submit(httpx.post, url + "/v1/embed/text", content=b'{"texts": ["\\ud800"]}',
                          headers={**auth, "content-type": "application/json"})
        print("eight normal texts:", [f.result().status_code for f in good])
        show("lone surrogate", bad.result())
    img = png(64)
    for template in ["{0:>10000000}{{}}", "{0.__class__.__mro__}{{}}", "{1}{}", "{} {}", "{}{"]:
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/zero-shot", json={"images": [img], "labels": ["a"] * 6, "templates": [template]},
                       headers=auth)
        show(f"template {template!r}", r, time.monotonic() - t0)


def bombs(url: str, auth: dict[str, str], pid: int) -> None:
    bomb = png(4096)
    print(f"4096 x 4096 PNG: {len(base64.b64decode(bomb))} bytes; server memory (MB) {memory_mb(pid)}")
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/embed/image", json={"images": [bomb] * 8}, headers=auth, timeout=120)
    show("eight in one request", r, time.monotonic() - t0)
    print("server memory (MB)", memory_mb(pid))
    r = httpx.post(url + "/v1/embed/image", json={"images": [bomb] * 2}, headers=auth, timeout=120)
    print(f"two in one request: {r.status_code}; server memory (MB) {memory_mb(pid)}")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(httpx.post, url + "/v1/embed/image", json={"images": [bomb] * 2}, headers=auth,
                            timeout=120) for _ in range(6)]
        codes = sorted(f.result().status_code for f in futs)
    print(f"six two-image requests at once, one key: {codes}; server memory (MB) {memory_mb(pid)}")
    show("header declaring 100000 x 100000", httpx.post(url + "/v1/embed/image",
                                                        json={"images": [png_header(100_000, 100_000)]}, headers=auth))


def small_promises(url: str, port: int, auth: dict[str, str]) -> None:
    show("GET /v1/nothing", httpx.get(url + "/v1/nothing", headers=auth))
    show("GET /v1/embed/text", httpx.get(url + "/v1/embed/text", headers=auth))
    show("/readyz without a key", httpx.get(url + "/readyz"))
    show("/readyz with a key", httpx.get(url + "/readyz", headers=auth))
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        head = s.recv(200).splitlines()[0].decode()
        print(f"POST /healthz declaring 100 KB: {head} after {time.monotonic() - t0:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        proc = start(port, key_file)
        try:
            url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key_file.read_text().strip()}"}
            texts_and_templates(url, auth)
            bombs(url, auth, proc.pid)
            small_promises(url, port, auth)
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0]
    print("server output after the requests:", "Traceback" in out and "a traceback" or "no traceback")


if __name__ == "__main__":
    main()
