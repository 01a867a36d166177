"""``rcc search``: hyper-parameter search over any config key with Optuna, on one machine or many.

A study lives in Optuna's RDB storage: an SQLite file in the search directory by default, or a
``postgresql://`` URL that any number of worker processes on any number of machines share
(Optuna's RDB storage is the distributed engine; nothing else coordinates the workers). Every
worker runs Optuna's own loop, ``study.optimize``, with Optuna's machinery for many workers:

1. heartbeats (``RDBStorage(heartbeat_interval=..., grace_period=...)``): a trial whose worker
   stopped sending them is failed by the next worker that starts a trial (or waits), and
   ``RetryHeartbeatStaleTrialCallback`` queues its parameters again, at most ``max_retry`` times;
2. ``MaxTrialsCallback(trials, states=(COMPLETE, PRUNED))`` stops a worker once the study holds
   ``trials`` finished trials, and a second callback stops it when the trials still missing are
   all running elsewhere; the worker then waits (``poll_interval``) in case one of them fails,
   and ends when the study is complete;
3. each trial: the base experiment config plus the trial's parameters is compressed by the same
   job as ``rcc compress`` into ``trials/trial-NNNN/`` (its ``config.yaml`` is exactly what ``rcc
   compress --config`` needs to reproduce it); the cascade's gate retention after every step is
   reported to Optuna's pruner (median, Hyperband); the compressed checkpoint is then evaluated on
   the search split (``val`` by default: the test split is kept for reporting); constraints are
   set on the trial (``Trial.set_constraint``), where the samplers read them.

A dead worker's trial is failed and re-queued once per death, so nothing is lost. Workers that
finish trials at the same moment may each start one more before the count reaches them: a
study ends with ``trials`` finished trials, or a few more (at most one more per worker) when
many workers race for the last ones.

Outputs (written by every worker when its loop ends; the database is the source of truth):
``trials.json``/``trials.csv`` (every trial's parameters, metrics and state), ``pareto.json``/
``pareto.csv``/``pareto.png``, ``best.yaml`` (the best trial's full config) and ``summary.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..compression.records import last_passed
from ..compression.storage import load_compressed
from ..config import RCCConfig, dump_config
from ..errors import ConfigError, RCCError
from ..evaluation.efficiency import measure_latency, optimize_execution
from ..evaluation.suite import evaluate_model
from ..jobs.compress import headline_metrics, run_compress
from ..models.registry import get_model
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.logging import get_logger
from ..visualization.search import plot_pareto_front
from .space import SearchConfig, base_params, config_for, distributions, grid, trial_params

log = get_logger("search")

TASK_METRIC_NAMES = ("top1", "i2t_R@1", "t2i_R@1", "CIDEr", "BLEU-4", "accuracy")


class SearchError(RCCError):
    """A search cannot go on (storage unreachable or unsupported, too many failed trials)."""


# ----------------------------------------------------------------------------- storage
def storage_url(url: str | None, out_dir: Path) -> str:
    """The study's storage: ``url`` as given, or an SQLite file ``study.db`` in the search directory."""
    if url is None:
        return f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://")):
        raise ConfigError(f"--storage {url.split('@')[-1]!r}: expected sqlite:///PATH or postgresql://...")
    if url.startswith("postgresql://"):  # SQLAlchemy's default driver differs between versions: name one installed
        return f"postgresql+{postgres_driver()}://" + url.removeprefix("postgresql://")
    return url


def postgres_driver() -> str:
    """The PostgreSQL driver to use: ``psycopg`` (3) when installed, else ``psycopg2``."""
    import importlib.util

    for name in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(name) is not None:
            return name
    raise SearchError("a postgresql:// storage needs a PostgreSQL driver: pip install 'rcc-compression[search]' "
                      "(psycopg)")


def open_storage(url: str, search: SearchConfig) -> Any:
    """Optuna RDB storage with heartbeats; a trial whose worker dies is failed and queued again."""
    import optuna

    st = search.study
    engine = {"pool_pre_ping": True} if url.startswith("postgresql") else {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=st.max_retry)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=st.heartbeat_interval,
                                              grace_period=st.grace_period or 3 * st.heartbeat_interval,
                                              heartbeat_stale_trial_callback=retry)
        except Exception as exc:  # sqlalchemy OperationalError, a missing driver
            where = url.split("@")[-1]
            raise SearchError(f"study storage {where}: cannot open: {' '.join(str(exc).split())[:300]}") from None


def make_sampler(search: SearchConfig) -> Any:
    """TPE (single or multi-objective), NSGA-II, random or grid; constraints reach TPE and NSGA-II through the
    trials (``Trial.set_constraint``)."""
    import optuna

    st = search.study
    if st.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=st.seed, n_startup_trials=st.startup_trials)
    if st.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=st.seed)
    if st.sampler == "random":
        return optuna.samplers.RandomSampler(seed=st.seed)
    return optuna.samplers.GridSampler(grid(search), seed=st.seed)


def make_pruner(search: SearchConfig) -> Any:
    """Median or Hyperband on the gate retention reported after every cascade step; none for several objectives."""
    import optuna

    st = search.study
    if search.multi_objective or st.pruner == "none":
        return optuna.pruners.NopPruner()
    if st.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=st.startup_trials, n_warmup_steps=0)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")


def constraint_values(search: SearchConfig, metrics: dict[str, Any]) -> dict[str, float]:
    """Optuna constraint values by constraint name (``<= 0`` is feasible), one per active constraint."""
    c = search.constraints
    out: dict[str, float] = {}
    if c.max_stored_bytes is not None:
        out["max_stored_bytes"] = float(metrics["stored_bytes"]) - c.max_stored_bytes
    if c.min_compression_rate is not None:
        out["min_compression_rate"] = c.min_compression_rate - float(metrics["compression_rate"])
    if c.max_latency_ms is not None:
        out["max_latency_ms"] = float(metrics["latency_ms"]) - c.max_latency_ms
    return out


# ----------------------------------------------------------------------------- one trial
def dense_metrics(cfg: RCCConfig, split: str, max_items: int | None) -> dict[str, float]:
    """Task metrics of the dense model on the search split."""
    if not cfg.evaluation.benchmarks:
        return {}
    wrapper = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    return _task_metrics(wrapper, cfg, split, max_items, headline_metrics)


def _task_metrics(wrapper: Any, cfg: RCCConfig, split: str, max_items: int | None, headline: Callable) -> dict:
    res = evaluate_model(wrapper, benchmarks=cfg.evaluation.benchmarks, datasets=cfg.evaluation.datasets or ["world"],
                         split=split, batch_size=cfg.evaluation.batch_size, bootstrap_samples=0,
                         seed=cfg.experiment.seed, max_items=max_items)
    return headline(res, TASK_METRIC_NAMES)


def trial_metrics(cfg: RCCConfig, trial_dir: Path, results: dict[str, Any], search: SearchConfig,
                  dense: dict[str, float]) -> dict[str, Any]:
    """Everything a trial is judged by: retention (task, on the search split), gate retention, bytes, rate."""
    last = last_passed(results["records"])
    metrics: dict[str, Any] = {
        "gate_retention": results["gate"]["retention"] if results["gate"]["retention"] is not None else 0.0,
        "stored_bytes": int(results["stored_bytes_reported"]["layers"] + results["stored_bytes_reported"]["rest"]),
        "stored_bytes_layers": int(results["stored_bytes_reported"]["layers"]),
        "stored_bytes_measured": int(results["stored_bytes_measured"]["total"]),
        "compression_rate": float(last.achieved.compression_rate) if last is not None else 0.0,
        "stopped_early": bool(results["stopped_early"]),
    }
    wanted = {o.metric for o in search.objectives} | set(search.constraints.active())
    need_task = any(m not in ("gate_retention", "stored_bytes", "compression_rate", "latency_ms") for m in wanted)
    if need_task or (cfg.evaluation.benchmarks and dense):
        wrapper = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
        wrapper = load_compressed(trial_dir / "compressed", model=wrapper)
        task = _task_metrics(wrapper, cfg, search.evaluation.split, search.evaluation.max_items, headline_metrics)
        metrics["task"] = task
        keys = search.evaluation.metrics or [k for k in task if dense.get(k)]
        missing = [k for k in keys if k not in task or not dense.get(k)]
        if missing:
            raise ConfigError(f"evaluation.metrics: {missing[0]!r} was not measured (measured: {', '.join(task)})")
        per = {k: task[k] / dense[k] for k in keys}
        metrics["retention_by_metric"] = per
        metrics["retention"] = sum(per.values()) / len(per) if per else 0.0
    if "latency_ms" in wanted or "max_latency_ms" in wanted:
        metrics["latency_ms"] = _latency_ms(cfg, trial_dir)
    return metrics


def _latency_ms(cfg: RCCConfig, trial_dir: Path) -> float:
    import torch

    wrapper = load_compressed(trial_dir / "compressed", model=get_model(cfg.model.name, cfg.model.type,
                                                                          cfg.model.dtype))
    batch = wrapper.synthetic_batch(1, torch.Generator().manual_seed(cfg.experiment.seed))
    optimize_execution(wrapper, batch)
    inner = wrapper.model.eval()
    with torch.no_grad():
        return float(measure_latency(lambda: inner(**batch), 3, 20, torch.device("cpu"))["median_ms"])


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The value of an objective's metric in a trial's metrics."""
    if name in metrics and not isinstance(metrics[name], dict):
        return float(metrics[name])
    if name.startswith("retention:"):
        key = name.split(":", 1)[1]
        task = metrics.get("task", {})
        if key not in metrics.get("retention_by_metric", {}) and key not in task:
            raise ConfigError(f"objective {name!r}: {key!r} was not measured (measured: {', '.join(task)})")
        return float(metrics.get("retention_by_metric", {}).get(key, math.nan))
    task = metrics.get("task", {})
    if name in task:
        return float(task[name])
    raise ConfigError(f"objective {name!r}: not a metric of a trial; known: retention, gate_retention, stored_bytes, "
                      f"compression_rate, latency_ms, {', '.join(task) or 'task metric keys'}")


# ----------------------------------------------------------------------------- the worker loop
class Search:
    """One worker of a study: ``run()`` takes trials until the study holds ``trials`` finished ones."""

    def __init__(self, search: SearchConfig, out_dir: str | os.PathLike[str], storage: str | None = None,
                 study_name: str | None = None, progress: Callable[[str, int, int], None] | None = None,
                 trial_callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        import optuna

        self.search = search
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.url = storage_url(storage, self.out_dir)
        self.study_name = study_name or search.study.name
        self.progress = progress
        self.trial_callback = trial_callback
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.storage = open_storage(self.url, search)
        directions = [o.direction for o in search.objectives]
        self.study = optuna.create_study(storage=self.storage, study_name=self.study_name, directions=directions,
                                         sampler=make_sampler(search), pruner=make_pruner(search),
                                         load_if_exists=True)
        if list(self.study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise SearchError(f"study {self.study_name!r} exists with other objectives; use another --study")
        self._first_worker_setup()
        self._dense: dict[str, float] | None = None

    @property
    def target(self) -> int:
        if self.search.study.sampler == "grid":
            size = math.prod(len(v) for v in grid(self.search).values())
            return min(self.search.study.trials, size)
        return self.search.study.trials

    def _first_worker_setup(self) -> None:
        """Record the search file in the study and queue the base config's values as the first trial."""
        attrs = self.study.user_attrs
        resolved = self.search.model_dump(mode="json")
        if "search" not in attrs:
            self.study.set_user_attr("search", resolved)
            if self.search.study.enqueue_base and not self.study.trials:
                params = base_params(self.search)
                if params is not None:  # two workers starting together queue it once
                    self.study.enqueue_trial(params, user_attrs={"base_config": True}, skip_if_exists=True)
                else:
                    log.info("the base config's values lie outside the search space; no base trial queued")
        elif attrs["search"].get("space") != resolved.get("space") or attrs["search"].get(
                "objectives") != resolved.get("objectives"):
            raise SearchError(f"study {self.study_name!r} was started with another search space or objectives; "
                              "use another --study (or the same search file)")

    def dense(self) -> dict[str, float]:
        """Dense task metrics on the search split (computed once per study, kept in the study)."""
        if self._dense is None:
            cached = self.study.user_attrs.get("dense_metrics")
            if cached is None:
                cached = dense_metrics(config_for(self.search, {}), self.search.evaluation.split,
                                       self.search.evaluation.max_items)
                self.study.set_user_attr("dense_metrics", cached)
            self._dense = dict(cached)
        return self._dense

    def counts(self) -> dict[str, int]:
        """Trials by state, after failing (and re-queueing) those whose worker stopped sending heartbeats."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def run(self) -> dict[str, Any]:
        """Take trials until the study is complete; then write the report. Returns the report."""
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        target = self.target
        enough = MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))
        while True:
            c = self.counts()
            done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
            if self.progress is not None:
                self.progress("trials", min(done, target), target)
            if done >= target:
                break
            self._check_failures(c)
            if self._rest_runs_elsewhere(c):
                time.sleep(self.search.study.poll_interval)  # one of them may still fail and be queued again
                continue
            self.study.optimize(self._objective, callbacks=[enough, self._after_trial], catch=(Exception,),
                                gc_after_trial=True)
        return write_report(self.study, self.search, self.out_dir)

    def _rest_runs_elsewhere(self, counts: dict[str, int]) -> bool:
        """Whether the trials still missing are all running (nothing queued): starting one more would overshoot."""
        done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        return not counts.get("WAITING", 0) and done + counts.get("RUNNING", 0) >= self.target

    def _check_failures(self, counts: dict[str, int]) -> None:
        limit = self.search.study.max_failures or max(self.target, 3)
        if counts.get("FAIL", 0) >= limit:
            raise SearchError(f"study {self.study_name!r}: {counts['FAIL']} trials failed (limit {limit}); "
                              f"see {self.out_dir / 'trials.json'} for their errors")

    def _after_trial(self, study: Any, trial: Any) -> None:
        """``study.optimize`` callback: report progress; stop on too many failures or when the rest runs elsewhere."""
        c: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            c[t.state.name] = c.get(t.state.name, 0) + 1
        done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
        if self.progress is not None:
            self.progress("trials", min(done, self.target), self.target)
        limit = self.search.study.max_failures or max(self.target, 3)
        if c.get("FAIL", 0) >= limit or self._rest_runs_elsewhere(c):
            study.stop()  # the outer loop raises, waits or ends

    # ------------------------------------------------------------------------- the objective
    def _objective(self, trial: Any) -> Any:
        import optuna

        trial.set_user_attr("worker", self.worker)
        params = self.suggest_parameters(trial)
        try:
            cfg = config_for(self.search, params)
            trial_dir = self.out_dir / "trials" / f"trial-{trial.number:04d}"
            if trial_dir.exists():
                shutil.rmtree(trial_dir)
            trial_dir.mkdir(parents=True)
            atomic_write_text(trial_dir / "config.yaml", yaml.safe_dump(dump_config(cfg), sort_keys=False))
            trial.set_user_attr("config", dump_config(cfg))
            trial.set_user_attr("trial_dir", str(trial_dir))

            def on_step(rec: dict[str, Any]) -> None:
                self.prune_trial(trial, rec)

            dense = self.dense() if cfg.evaluation.benchmarks else {}
            results = run_compress(cfg, trial_dir, step_callback=on_step, evaluate=False)
            metrics = trial_metrics(cfg, trial_dir, results, self.search, dense)
            trial.set_user_attr("metrics", metrics)
            for name, value in constraint_values(self.search, metrics).items():
                trial.set_constraint(name, value)
            atomic_write_json(trial_dir / "trial.json", {"number": trial.number, "params": params,
                                                         "metrics": metrics})
            values = [metric_value(metrics, o.metric) for o in self.search.objectives]
            if self.trial_callback is not None:
                self.trial_callback({"number": trial.number, "params": params, "metrics": metrics})
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
            raise

    def prune_trial(self, trial: Any, record: dict[str, Any]) -> None:
        """Report a cascade step's gate retention to the pruner; raise ``TrialPruned`` when it says stop.

        Single-objective studies only (Optuna prunes those); the step index is the cascade step, so
        trials are compared after the same number of stage applications.
        """
        import optuna

        value = record.get("retention")
        if self.search.multi_objective or self.search.study.pruner == "none" or value is None or not math.isfinite(
                value):
            return
        trial.report(float(value), int(record["step"]))
        if trial.should_prune():
            trial.set_user_attr("pruned_at", {"step": record["step"], "stage": record["stage"],
                                              "gate_retention": value})
            raise optuna.TrialPruned(f"gate retention {value:.4f} after step {record['step']} ({record['stage']})")

    def suggest_parameters(self, trial: Any) -> dict[str, Any]:
        """Draw the trial's value of every searched key from the sampler; returns config values by key."""
        import optuna

        raw: dict[str, Any] = {}
        for key, dist in distributions(self.search).items():
            if isinstance(dist, optuna.distributions.FloatDistribution):
                raw[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                raw[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
            else:
                raw[key] = trial.suggest_categorical(key, dist.choices)
        return trial_params(self.search, raw)


def optimize(search: SearchConfig, out_dir: str | os.PathLike[str], storage: str | None = None,
             study_name: str | None = None, progress: Callable[[str, int, int], None] | None = None
             ) -> dict[str, Any]:
    """Run one worker of the study until it holds ``search.study.trials`` finished trials; returns the report.

    ``optimize()`` of the search API (docs/analysis.md): start it in as many processes or machines as you like
    with one ``storage`` URL.
    """
    return Search(search, out_dir, storage, study_name, progress).run()


# ----------------------------------------------------------------------------- the report
def pareto_mask(values: list[list[float]], directions: list[str]) -> list[bool]:
    """Which points no other point dominates (at least as good in every objective, better in one)."""
    import numpy as np

    if not values:
        return []
    v = np.asarray(values, dtype=float) * np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    le = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # i at least as good as j everywhere
    lt = (v[:, None, :] < v[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)
    return [not d for d in dominated.tolist()]


def trial_rows(study: Any, search: SearchConfig) -> list[dict[str, Any]]:
    """Every trial: number, state, parameters (config values), metrics, feasibility, error, retry origin."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics = t.user_attrs.get("metrics", {})
        cons = dict(t.constraints) or None
        rows.append({
            "number": t.number, "state": t.state.name, "params": trial_params(search, t.params),
            "values": list(t.values) if t.values is not None else None, "metrics": metrics,
            "feasible": all(c <= 0 for c in cons.values()) if cons is not None else t.state.name == "COMPLETE",
            "constraint": cons, "error": t.user_attrs.get("error"), "pruned_at": t.user_attrs.get("pruned_at"),
            "retry_of": _retry_of(t), "base_config": bool(t.user_attrs.get("base_config")),
            "worker": t.user_attrs.get("worker"), "trial_dir": t.user_attrs.get("trial_dir"),
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    return rows


def _retry_of(trial: Any) -> int | None:
    """The number of the trial a re-queued one retries (Optuna's record of it), or ``None``."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def write_report(study: Any, search: SearchConfig, out_dir: Path) -> dict[str, Any]:
    """trials.json/.csv, pareto.json/.csv/.png, best.yaml and summary.md from the study's database."""
    rows = trial_rows(study, search)
    atomic_write_json(out_dir / "trials.json", rows)
    atomic_write_text(out_dir / "trials.csv", _csv(rows))
    objectives = [o.metric for o in search.objectives]
    directions = [o.direction for o in search.objectives]
    # the front is over the objectives; a single objective is traded against stored bytes
    axes = objectives if len(objectives) > 1 else [objectives[0], "stored_bytes"]
    axis_dirs = directions if len(objectives) > 1 else [directions[0], "minimize"]
    done = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    points = [[metric_value(r["metrics"], a) for a in axes] for r in done]
    mask = pareto_mask(points, axis_dirs)
    front = sorted([r for r, m in zip(done, mask, strict=True) if m],
                   key=lambda r: metric_value(r["metrics"], axes[0]), reverse=axis_dirs[0] == "maximize")
    best = None
    if done:
        pool = front if len(objectives) > 1 else done
        sign = 1.0 if directions[0] == "maximize" else -1.0
        best = max(pool, key=lambda r: (sign * metric_value(r["metrics"], objectives[0]), -r["number"]))
    pareto = {"objectives": axes, "directions": axis_dirs,
              "trials": [{"number": r["number"], **{a: metric_value(r["metrics"], a) for a in axes},
                          "params": r["params"]} for r in front]}
    atomic_write_json(out_dir / "pareto.json", pareto)
    atomic_write_text(out_dir / "pareto.csv", _csv([{"number": p["number"], **{a: p[a] for a in axes},
                                                     "params": json.dumps(p["params"])} for p in pareto["trials"]]))
    base = next((r for r in done if r["base_config"]), None)
    if points:
        plot_pareto_front([[metric_value(r["metrics"], a) for a in axes[:2]] for r in done],
                          [m for m in mask], axes[:2], out_dir / "pareto.png",
                          title=f"{study.study_name}: {len(done)} feasible trials",
                          highlight={"best": _index(done, best), "base config": _index(done, base)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    report = {"study": study.study_name, "objectives": objectives, "directions": directions, "counts": counts,
              "best": best, "base": base, "pareto": pareto}
    if best is not None:
        cfg = study.get_trials(deepcopy=False)[best["number"]].user_attrs["config"]
        atomic_write_text(out_dir / "best.yaml", f"# best trial {best['number']} of study {study.study_name}; "
                                                 f"reproduce with: rcc compress --config best.yaml\n"
                          + yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_json(out_dir / "search_results.json", report)
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return report


def _index(rows: list[dict[str, Any]], row: dict[str, Any] | None) -> int | None:
    return None if row is None else next(i for i, r in enumerate(rows) if r["number"] == row["number"])


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def _csv(rows: list[dict[str, Any]]) -> str:
    flat = []
    for r in rows:
        f: dict[str, Any] = {}
        _flat("", r, f)
        flat.append(f)
    cols = list(dict.fromkeys(k for f in flat for k in f))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def summary_markdown(report: dict[str, Any]) -> str:
    """The search in a few lines: trial counts, the best trial and its parameters, the base config's trial."""
    lines = [f"# Search {report['study']}", "",
             "Trials: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(report["counts"].items())), ""]
    objectives = report["objectives"]
    for label, row in (("best", report["best"]), ("base config", report["base"])):
        if row is None:
            continue
        vals = ", ".join(f"{o} {metric_value(row['metrics'], o):.4f}" for o in objectives)
        lines.append(f"- {label}: trial {row['number']}: {vals}, stored bytes {row['metrics'].get('stored_bytes')}")
    if report["best"] is not None:
        lines += ["", "Best parameters:", ""]
        lines += [f"- `{k}`: `{json.dumps(v)}`" for k, v in report["best"]["params"].items()]
        lines += ["", "Reproduce: `rcc compress --config best.yaml`"]
    return "\n".join(lines) + "\n"
