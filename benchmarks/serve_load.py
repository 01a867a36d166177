"""Bounded load test of `rcc serve` on 127.0.0.1: dense and compressed CLIP side by side, in one run.

Starts two servers (``rcc serve``, one model each, API keys on) as subprocesses on free loopback
ports, then for each concurrency level sends a fixed number of ``/v1/embed/image`` requests (one
64x64 PNG each) to each server in turn, and stops. Prints per model and level: throughput,
p50/p99 latency, the count of 5xx answers (must be 0), the mean dynamic batch size (from
``/metrics``), and the server's resident memory (idle after loading, and the peak under load).

Usage: python benchmarks/serve_load.py [--requests 200] [--levels 1 4 16] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_model import compressed_checkpoint  # noqa: E402


def png(seed: int, size: int = 64) -> str:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """``rcc serve SOURCE`` in a subprocess on a free 127.0.0.1 port; RSS sampled while it runs."""

    def __init__(self, source: str, keys: Path, threads: int, max_batch: int, wait_ms: float) -> None:
        import psutil

        from rcc_compression.serving.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rcc_compression", "serve", source, "--keys", str(keys), "--port",
               str(self.port), "--threads", str(threads), "--max-batch", str(max_batch), "--batch-wait-ms",
               str(wait_ms), "-q"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.ps = psutil.Process(self.proc.pid)
        self.peak = 0
        self._stop = threading.Event()

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    self.idle_rss = self.ps.memory_info().rss
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.url} not ready after {timeout}s")

    def sample(self) -> None:
        self.peak = self.ps.memory_info().rss
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self.ps.memory_info().rss)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def model_memory(url: str, key: str) -> int:
    """Bytes of the served model's tensors (parameters, buffers, kernel copies), as the server reports them."""
    import httpx

    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["models"]
    return int(models[0]["memory_bytes"])


def batch_stats(url: str, key: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    vals = {}
    for line in text.splitlines():
        if line.startswith(("rcc_batch_size_sum", "rcc_batch_size_count")) and 'task="embed_image"' in line:
            vals[line.split("{")[0]] = float(line.split()[-1])
    return vals.get("rcc_batch_size_sum", 0.0), vals.get("rcc_batch_size_count", 0.0)


async def load(url: str, key: str, images: list[str], concurrency: int, cap_s: float) -> dict:
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    todo = list(range(len(images)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=60) as client:
        t_end = time.monotonic() + cap_s

        async def worker() -> None:
            while todo and time.monotonic() < t_end:
                i = todo.pop()
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/embed/image", json={"images": [images[i]]})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 599
                lat.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"requests": len(lat), "wall_s": wall, "rps": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "codes": codes,
            "5xx": sum(v for k, v in codes.items() if k >= 500)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per model and level")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--cap-s", type=float, default=120.0, help="time cap per model and level")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from rcc_compression.serving.auth import KeyStore

    work = Path(args.work or tempfile.mkdtemp(prefix="rcc-serve-"))
    ckpt = compressed_checkpoint(work / "clip-4x")
    store = KeyStore()
    key = store.add("bench", ["*"])
    store.save(work / "keys.json")
    images = [png(i) for i in range(args.requests)]
    servers = {"dense": Server("rcc-clip-world", work / "keys.json", args.threads, args.max_batch,
                               args.batch_wait_ms),
               "4x": Server(str(ckpt), work / "keys.json", args.threads, args.max_batch, args.batch_wait_ms)}
    results: dict = {"levels": {}, "threads": args.threads, "requests": args.requests}
    try:
        for tag, s in servers.items():
            s.wait_ready()
            results.setdefault("model_bytes", {})[tag] = model_memory(s.url, key)
        sizes = ", ".join(f"{t} {b / 1e6:.2f} MB" for t, b in results["model_bytes"].items())
        print(f"model tensors in memory: {sizes} (parameters, buffers and inference-kernel copies)")
        print(f"/v1/embed/image, one 64x64 PNG per request, {args.requests} requests per model and level; "
              f"servers with {args.threads} torch thread(s), max batch {args.max_batch}, wait {args.batch_wait_ms} ms")
        print(f"{'model':6s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'5xx':>4s} {'batch':>6s} "
              f"{'RSS idle MB':>11s} {'RSS peak MB':>11s}")
        for level in args.levels:
            for tag, s in servers.items():
                before = batch_stats(s.url, key)
                s.sample()
                r = asyncio.run(load(s.url, key, images, level, args.cap_s))
                peak = s.stop_sampling()
                after = batch_stats(s.url, key)
                r["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                r["rss_idle_mb"], r["rss_peak_mb"] = s.idle_rss / 2**20, peak / 2**20
                results["levels"].setdefault(str(level), {})[tag] = r
                print(f"{tag:6s} {level:4d} {r['rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['5xx']:4d} "
                      f"{r['mean_batch']:6.2f} {r['rss_idle_mb']:11.1f} {r['rss_peak_mb']:11.1f}")
            lv = results["levels"][str(level)]
            print(f"       concurrency {level}: 4x/dense throughput {lv['4x']['rps'] / lv['dense']['rps']:.2f}x")
    finally:
        for s in servers.values():
            s.close()
    total_5xx = sum(r["5xx"] for lv in results["levels"].values() for r in lv.values())
    print(f"5xx answers in total: {total_5xx}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if total_5xx:
        sys.exit(1)


if __name__ == "__main__":
    main()
