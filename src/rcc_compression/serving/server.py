"""Running the app on uvicorn: in the foreground (``rcc serve``) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

from ..errors import ConfigError
from ..utils.io import atomic_write_text
from .app import create_app
from .auth import KeyStore
from .models import check_sources, load_models

DEFAULT_HOST = "127.0.0.1"


def uvicorn_config(app: Any, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "warning",
                   limit_concurrency: int | None = 512) -> Any:
    """A uvicorn config with the server's hardening: no server header, short keep-alive, bounded
    concurrency (503 beyond it) and bounded header size."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                          timeout_keep_alive=5, limit_concurrency=limit_concurrency,
                          h11_max_incomplete_event_size=64 * 1024, access_log=False,
                          timeout_graceful_shutdown=10)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """``with BackgroundServer(app) as url: ...``: uvicorn on a free 127.0.0.1 port in a thread."""

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int | None = None, startup_timeout: float = 30.0
                 ) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, name="rcc-server", daemon=True)
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def run_server(sources: list[str], host: str = DEFAULT_HOST, port: int = 8000, keys_file: str | None = None,
               no_auth: bool = False, checkpoint_key: bytes | None = None, limits: Any = None,
               max_batch: int = 16, batch_wait_ms: float = 5.0, echo: Any = print, key_out: str | None = None,
               terminal: bool | None = None, allow_download: bool = False) -> None:
    """Load the models, set up authentication and serve until interrupted (what ``rcc serve`` runs).

    Without ``keys_file`` and without ``no_auth`` a random key is made and only its hash kept; the
    plain key is written to ``key_out`` (mode 0600) or, when standard output is a terminal, shown
    there once; it never goes to a log (a non-terminal output without ``key_out`` is refused).
    ``no_auth`` is refused on a non-loopback host. A key file whose keys name models that are not
    served is refused, and so is a source that would need a download, unless ``allow_download``.
    """
    import uvicorn

    if no_auth and keys_file:
        raise ConfigError("give --keys FILE or --no-auth, not both")
    if no_auth and host not in LOOPBACK:
        raise ConfigError(f"--no-auth serves without keys; refused on a non-loopback host ({host})")
    if key_out and (keys_file or no_auth):
        raise ConfigError("--key-out writes a generated key; it goes without --keys and --no-auth")
    terminal = sys.stdout.isatty() if terminal is None else terminal
    if not (keys_file or no_auth or key_out or terminal):
        raise ConfigError("standard output is not a terminal: a generated API key would end up in a log; pass "
                          "--key-out FILE (written with mode 0600) or --keys FILE (make one with `rcc keys add`)")
    names = [n for n, _ in check_sources(sources, allow_download)]
    keys = None if no_auth else (KeyStore.load(keys_file) if keys_file else KeyStore())
    if keys is not None and keys_file:
        if not keys.records:
            raise ConfigError(f"{keys_file}: the key file holds no key")
        for rec in keys.records:
            unknown = [m for m in rec.models if m != "*" and m not in names]
            if unknown:
                raise ConfigError(f"{keys_file}: key {rec.id!r} names model(s) {unknown} that are not served; "
                                  f"served: {names}")
    models = load_models(sources, key=checkpoint_key, allow_download=allow_download)
    for m in models:
        d = m.describe()
        kernels = ", ".join(f"{k} x{v}" for k, v in d["kernels"].items()) or "dense"
        echo(f"model {d['name']}: {d['type']} ({d['source_kind']}; kernels: {kernels}); tasks: {', '.join(d['tasks'])}")
    app = create_app(models, keys, limits, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    if keys is not None and not keys_file:
        plain = keys.add("generated", ["*"])
        if key_out:
            atomic_write_text(key_out, plain + "\n", mode=0o600)
            echo(f"API key written to {key_out} (mode 0600; only its hash is kept here)")
        else:
            echo(f"API key (shown once; only its hash is kept): {plain}")
    echo(f"serving on http://{host}:{port} (auth: {'OFF' if keys is None else 'API keys'})")
    uvicorn.Server(uvicorn_config(app, host, port, log_level="info")).run()
