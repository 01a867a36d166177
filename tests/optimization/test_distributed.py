"""Two workers share one study on a real PostgreSQL server; one is killed with SIGKILL in the middle of a trial.

The study still ends with the requested number of complete trials (one more at most, when both
workers race for the last one): the killed trial is marked FAIL once its heartbeats stop, its
parameters run again exactly once, and nothing is lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import write_search

TRIALS = 4


def _worker(spec: Path, url: str, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[2] / "src"),
                                                                  os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen([sys.executable, "-m", "rcc_compression", "search", "--config", str(spec), "--storage",
                             url, "--study", "shared", "--output", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
def test_killed_worker_loses_and_duplicates_nothing(postgres_url: str, tmp_path: Path) -> None:
    import optuna

    spec = write_search(tmp_path / "spec", {
        "compression.dare.pruning_rate": {"low": 0.2, "high": 0.8},
        "compression.dare.scorer": {"choices": ["magnitude", "random"]},
    }, {"name": "shared", "trials": TRIALS, "pruner": "none", "heartbeat_interval": 1, "grace_period": 3,
        "poll_interval": 0.5, "max_retry": 2})
    victim = _worker(spec, postgres_url, tmp_path / "worker-a")
    survivor = None
    try:
        storage = optuna.storages.RDBStorage(postgres_url)
        deadline = time.time() + 300
        killed_number = None
        while time.time() < deadline and killed_number is None:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name="shared", storage=storage)
            except KeyError:
                continue
            if survivor is None:
                survivor = _worker(spec, postgres_url, tmp_path / "worker-b")
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}"):
                    victim.send_signal(signal.SIGKILL)
                    killed_number = t.number
                    break
            assert victim.poll() is None or killed_number is not None, victim.stdout.read()
        assert killed_number is not None, "the first worker never started a trial"
        victim.wait(30)
        assert survivor is not None
        out, _ = survivor.communicate(timeout=600)
        assert survivor.returncode == 0, out
    finally:
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.kill()
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    complete = states.count("COMPLETE")
    assert TRIALS <= complete <= TRIALS + 1  # none lost; at most one extra from the race for the last trial
    assert states.count("FAIL") == 1 and len(trials) == complete + 1
    killed = trials[killed_number]
    assert killed.state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"  # rerun exactly once ...
    assert retries[0].params == killed.params  # ... with the same parameters
    dirs = [t.user_attrs["trial_dir"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(dirs)) == complete
