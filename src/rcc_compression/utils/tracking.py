"""Experiment tracking: one :class:`ExperimentTracker`, several backends, chosen by the ``tracking`` config.

A run logs *series* of metrics: ``cascade`` (one point per cascade step), ``stage/<name>`` (one per
round of a stage), ``train`` (one per optimiser step of any distillation), ``val`` (one per
validation), ``eval`` (the evaluation after the run) and ``system`` (wall time and peak memory).
Each point is ``(series, step, {name: value})``; every backend keeps the series' own step axis.

Backends:

- ``console``: one log line per point (training steps at debug level);
- ``file``: ``metrics.jsonl`` in the run directory, one JSON object per line, flushed as written,
  so a dashboard can follow a running job;
- ``tensorboard``: event files in ``<run_dir>/tensorboard`` (``torch.utils.tensorboard``);
- ``wandb``: a Weights & Biases run in ``<run_dir>/wandb``. Without an API key (and without an
  explicit ``WANDB_MODE``) it runs offline; ``wandb sync`` uploads it later.

Tracking never fails or stalls a run: a backend that cannot start, or raises, is switched off with
one warning, and closing W&B is given a bounded time. Metric names are sanitised to
``[A-Za-z0-9_.-]`` parts joined by ``/`` (:func:`metric_key`), which every backend keeps unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from .logging import get_logger
from .schema import StrictModel

log = get_logger("tracking")

BACKENDS = ("console", "file", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
#: seconds ``wandb.init`` may take (``WANDB_INIT_TIMEOUT`` overrides)
WANDB_INIT_TIMEOUT = 60.0
#: seconds ``finish`` waits for W&B to close (an unreachable server must not hold the run)
WANDB_CLOSE_TIMEOUT = 60.0
#: series whose points the console backend logs at debug level (there are many of them)
_QUIET_SERIES = ("train",)


class TrackingConfig(StrictModel):
    """The ``tracking`` section: where a run's metrics, config and model go."""

    backends: list[Literal["console", "file", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["console", "file"], description="any of console, file, tensorboard, wandb")
    project: str = Field("rcc-compression", min_length=1, description="W&B project (TensorBoard: run label)")
    run_name: str | None = Field(None, description="None: the run directory's name")
    tags: list[str] = Field(default_factory=list, description="tags given to the run (W&B)")
    log_model: bool = Field(True, description="log the compressed model directory as an artifact")
    figures: bool = Field(True, description="record figure data and write the run's plots (PNG and SVG)")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"backend {dup[0]!r} listed twice")
        return v


# ------------------------------------------------------------------------------------ names
_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def metric_key(*parts: str) -> str:
    """``metric_key("eval", "zero_shot world:shape", "i2t_R@1")`` -> ``"eval/zero_shot_world_shape/i2t_R_1"``.

    Each part keeps letters, digits, ``_``, ``.`` and ``-``; anything else becomes ``_``. The same
    name then reads back unchanged from every backend.
    """
    out = []
    for p in parts:
        for piece in str(p).split("/"):
            clean = _BAD.sub("_", piece).strip("_")
            if clean:
                out.append(clean)
    return "/".join(out)


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mapping -> ``{"a/b": float}`` for every finite-or-not number in it (bools as 0/1; others dropped)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = metric_key(prefix, str(key)) if prefix else metric_key(str(key))
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, name))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def system_metrics(started: float) -> dict[str, float]:
    """Elapsed seconds since ``started``, peak and current resident memory (MB), CUDA peak (MB) if any."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"elapsed_s": time.perf_counter() - started,
           "peak_rss_mb": peak_kb / (1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0)}
    try:
        import psutil

        out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except (ImportError, OSError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------- backends
class Backend:
    """One place metrics go. Every method may raise; the tracker turns a failing backend off."""

    name = "backend"

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_summary(self, values: Mapping[str, float]) -> None: ...
    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None: ...
    def log_event(self, event: str, **fields: Any) -> None: ...
    def close(self, status: str) -> None: ...


class ConsoleBackend(Backend):
    """Log lines through the package logger."""

    name = "console"

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        level = 10 if series in _QUIET_SERIES else 20
        shown = ", ".join(f"{k} {v:.5g}" for k, v in list(values.items())[:12])
        more = f" (+{len(values) - 12} more)" if len(values) > 12 else ""
        log.log(level, "%s %d: %s%s", series, step, shown, more)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        log.info("artifact %s (%s): %s", name, kind, path)


class FileBackend(Backend):
    """``metrics.jsonl``: one JSON object per line, appended and flushed (a resumed run appends)."""

    name = "file"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        self._t0 = time.time()

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, allow_nan=True, separators=(",", ":")) + "\n")
        self._fh.flush()

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        self._write({"kind": "metrics", "series": series, "step": step, "time": time.time(), "values": dict(values)})

    def log_summary(self, values: Mapping[str, float]) -> None:
        self._write({"kind": "summary", "time": time.time(), "values": dict(values)})

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        self._write({"kind": "artifact", "time": time.time(), "name": name, "type": kind, "path": str(path),
                     "metadata": dict(metadata)})

    def log_event(self, event: str, **fields: Any) -> None:
        self._write({"kind": "event", "event": event, "time": time.time(), **fields})

    def close(self, status: str) -> None:
        self._write({"kind": "event", "event": "end", "status": status, "time": time.time()})
        self._fh.close()


class TensorBoardBackend(Backend):
    """TensorBoard event files (scalars per series tag, the config and artifacts as text)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=10)
        self.run_name = run_name

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{series}/{key}", value, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log_summary(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"summary/{key}", value, 0)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        self.writer.add_text(f"artifacts/{metric_key(name)}", f"{kind}: `{path}` {json.dumps(dict(metadata))}", 0)

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise ``online`` with an API key in the environment, else ``offline``."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbBackend(Backend):
    """A W&B run in ``<run_dir>/wandb``; offline without an API key. Each series has its own step metric."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: TrackingConfig, run_name: str, config: Mapping[str, Any] | None) -> None:
        import wandb

        self.wandb = wandb
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT))
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, init_timeout=timeout,
                                  disable_git=True, disable_code=True)
        self.run = wandb.init(project=cfg.project, name=run_name, tags=list(cfg.tags), dir=str(run_dir),
                              config=dict(config or {}), mode=self.mode, reinit="create_new", settings=settings)
        self._series: set[str] = set()

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        if series not in self._series:
            self.run.define_metric(f"{series}/step", hidden=True)
            self.run.define_metric(f"{series}/*", step_metric=f"{series}/step")
            self._series.add(series)
        self.run.log({f"{series}/step": step, **{f"{series}/{k}": v for k, v in values.items()}})

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_summary(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        art = self.wandb.Artifact(metric_key(name).replace("/", "-"), type=kind, metadata=dict(metadata))
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        exit_code = 0 if status == "ok" else 1
        done = threading.Event()

        def _finish() -> None:
            try:
                self.run.finish(exit_code=exit_code)
            finally:
                done.set()

        sync_file = Path(self.run.settings.sync_file)
        deadline = time.monotonic() + WANDB_CLOSE_TIMEOUT
        threading.Thread(target=_finish, name="wandb-finish", daemon=True).start()
        if not done.wait(WANDB_CLOSE_TIMEOUT):
            log.warning("W&B did not close within %.0f s; the run's local files are kept (wandb sync uploads them)",
                        WANDB_CLOSE_TIMEOUT)
            return
        # the W&B service writes the local run file asynchronously: wait (bounded) for its exit record
        while time.monotonic() < deadline and not _has_exit_record(sync_file):
            time.sleep(0.05)


# ----------------------------------------------------------------------------------- tracker
class ExperimentTracker:
    """Send metrics, the resolved config, system metrics and artifacts to the configured backends.

    >>> with ExperimentTracker(TrackingConfig(backends=["file"]), run_dir) as t:  # doctest: +SKIP
    ...     t.log_metrics({"retention": 0.98}, step=0, series="cascade")

    ``ExperimentTracker()`` (no config) logs nothing, so code can always be handed a tracker.
    Backends that need a directory (``file``, ``tensorboard``, ``wandb``) are skipped, with a
    warning, when there is none.
    """

    def __init__(self, config: TrackingConfig | Mapping[str, Any] | None = None,
                 run_dir: str | os.PathLike[str] | None = None, *, run_config: Mapping[str, Any] | None = None,
                 run_name: str | None = None) -> None:
        if config is None:
            cfg = TrackingConfig(backends=[])
        elif isinstance(config, TrackingConfig):
            cfg = config
        else:
            cfg = TrackingConfig.model_validate(dict(config))
        self.config = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_name = run_name or cfg.run_name or (self.run_dir.name if self.run_dir is not None else "run")
        self.started = time.perf_counter()
        self._steps: dict[str, int] = {}
        self._closed = False
        self.backends: list[Backend] = []
        for name in cfg.backends:
            backend = self._start(name, run_config)
            if backend is not None:
                self.backends.append(backend)
        if run_config is not None:
            self._call("log_config", dict(run_config), skip=("wandb",))

    def _start(self, name: str, run_config: Mapping[str, Any] | None) -> Backend | None:
        if name == "console":
            return ConsoleBackend()
        if self.run_dir is None:
            log.warning("tracking backend %s needs a run directory; skipped", name)
            return None
        try:
            if name == "file":
                return FileBackend(self.run_dir)
            if name == "tensorboard":
                return TensorBoardBackend(self.run_dir, self.run_name)
            return WandbBackend(self.run_dir, self.config, self.run_name, run_config)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
            log.warning("tracking backend %s could not start (%s: %s); continuing without it", name,
                        type(exc).__name__, str(exc)[:300])
            return None

    @property
    def enabled(self) -> bool:
        """Whether any backend is active."""
        return bool(self.backends)

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def _call(self, method: str, *args: Any, skip: tuple[str, ...] = (), **kwargs: Any) -> None:
        for backend in list(self.backends):
            if backend.name in skip:
                continue
            try:
                getattr(backend, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
                log.warning("tracking backend %s failed in %s (%s: %s); switched off", backend.name, method,
                            type(exc).__name__, str(exc)[:300])
                self.backends.remove(backend)
                try:
                    backend.close("failed")
                except Exception:  # noqa: BLE001, S110 - already reported
                    pass

    # ------------------------------------------------------------------ logging
    def next_step(self, series: str) -> int:
        """The step the next point of ``series`` gets when none is given (0, 1, 2, ...)."""
        return self._steps.get(series, 0)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, series: str = "metrics") -> None:
        """Log numbers (nested mappings are flattened to ``a/b``; non-numbers dropped) as one point of ``series``."""
        if not self.backends:
            return
        values = flatten_numbers(metrics)
        if not values:
            return
        series = metric_key(series)
        step = self._steps.get(series, 0) if step is None else int(step)
        self._steps[series] = max(self._steps.get(series, 0), step + 1)
        self._call("log", series, step, values)

    def log_system(self, step: int | None = None) -> dict[str, float]:
        """Log (and return) elapsed time and peak memory as a point of the ``system`` series."""
        values = system_metrics(self.started)
        self.log_metrics(values, step, "system")
        return values

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the resolved configuration (W&B config, TensorBoard text)."""
        self._call("log_config", dict(config))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Final figures of the run (W&B summary, TensorBoard ``summary/*`` scalars, a ``summary`` line)."""
        flat = flatten_numbers(values)
        if flat:
            self._call("log_summary", flat)

    def log_artifact(self, path: str | os.PathLike[str], name: str, kind: str = "model",
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Log a file or directory (e.g. the compressed model) as an artifact."""
        path = Path(path)
        if not path.exists():
            log.warning("artifact %s: %s does not exist; not logged", name, path)
            return
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        meta = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), **dict(metadata or {})}
        self._call("log_artifact", path, name, kind, meta)

    def log_event(self, event: str, **fields: Any) -> None:
        """A marker in the file log (e.g. the phase a job enters), for live views of a running job."""
        self._call("log_event", event, **fields)

    def finish(self, status: str = "ok") -> None:
        """Close every backend (idempotent). ``status`` other than ``ok`` marks the run failed (W&B exit code 1)."""
        if self._closed:
            return
        self._closed = True
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
                log.warning("tracking backend %s failed to close (%s: %s)", backend.name, type(exc).__name__, exc)
        self.backends = []

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("ok" if exc_type is None else "failed")


# ------------------------------------------------------------------------------- reading back
def read_metrics_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` (a file or a run directory); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def series_points(lines: list[dict[str, Any]], series: str) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of one series from :func:`read_metrics_file` lines (later lines win)."""
    out: dict[int, dict[str, float]] = {}
    for line in lines:
        if line.get("kind") == "metrics" and line.get("series") == series:
            out.setdefault(int(line["step"]), {}).update(line.get("values", {}))
    return dict(sorted(out.items()))


_WB_IDENT, _WB_MAGIC, _WB_VERSION = b":W&B", 0xBEE1, 0
_WB_BLOCK, _WB_HEADER = 32768, 7


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The raw records of a ``.wandb`` transaction log (LevelDB log framing, CRC-checked)."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != _WB_IDENT or magic != _WB_MAGIC or version != _WB_VERSION:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _WB_HEADER <= len(data):
        left = _WB_BLOCK - pos % _WB_BLOCK
        if left < _WB_HEADER:  # the rest of a block too small for a header is padding
            pos += left
            continue
        crc, length, rtype = struct.unpack("<IHB", data[pos:pos + _WB_HEADER])
        if length == 0 and rtype == 0:
            pos += left
            continue
        body = data[pos + _WB_HEADER:pos + _WB_HEADER + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            break  # a torn tail
        pos += _WB_HEADER + length
        if rtype == 1:
            yield body
        elif rtype == 2:
            pending = body
        elif rtype == 3:
            pending += body
        elif rtype == 4:
            yield pending + body
            pending = b""


def _has_exit_record(path: Path) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in _wandb_records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return True
    except (OSError, ValueError, struct.error):
        return False
    return False


def read_wandb_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a local (offline or not yet synced) W&B run back: history rows, summary, config, artifacts.

    ``path`` is the run's ``.wandb`` file, its run folder, or a directory holding one run folder
    (``<run_dir>/wandb``; the latest run is taken).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.wandb"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{path}: no .wandb file")
        path = found[-1]
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []
    info: dict[str, Any] = {}

    def key_of(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for raw in _wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        which = rec.WhichOneof("record_type")
        if which == "history":
            history.append({key_of(i): json.loads(i.value_json) for i in rec.history.item})
        elif which == "summary":
            for i in rec.summary.update:
                summary[key_of(i)] = json.loads(i.value_json)
        elif which == "run":
            info.update(run_id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name,
                        tags=list(rec.run.tags))
            for i in rec.run.config.update:
                config[key_of(i)] = json.loads(i.value_json)
        elif which == "config":
            for i in rec.config.update:
                config[key_of(i)] = json.loads(i.value_json)
        elif which == "artifact":
            a = rec.artifact
            artifacts.append({"name": a.name, "type": a.type, "files": [e.path for e in a.manifest.contents],
                              "metadata": json.loads(a.metadata) if a.metadata else {}})
    config.pop("_wandb", None)
    return {"file": str(path), **info, "history": history, "summary": summary, "config": config,
            "artifacts": artifacts}


def wandb_series(run: Mapping[str, Any], series: str) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of one series of :func:`read_wandb_run`'s history."""
    out: dict[int, dict[str, float]] = {}
    prefix = f"{series}/"
    for row in run["history"]:
        if f"{series}/step" not in row:
            continue
        step = int(row[f"{series}/step"])
        vals = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and k != f"{series}/step"}
        out.setdefault(step, {}).update(vals)
    return dict(sorted(out.items()))


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite real number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
