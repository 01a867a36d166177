"""Search fixtures: a tiny-CLIP base config and search files written into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

BASE = {
    "experiment": {"name": "search-test", "seed": 0},
    "model": {"name": "tiny-clip"},
    "calibration": {"source": "synthetic", "num_batches": 3, "batch_size": 4, "holdout_batches": 1},
    "compression": {
        "dare": {"pruning_rate": 0.5, "iterations": 2, "fine_tune_epochs": 0},
        "nullu": {"rank_reduction": 0.25, "energy_threshold": None},
        "alphaedit": {"num_epochs": 0},
        "cascade": {"stages": ["dare", "nullu"], "validation_threshold": 0.0},
    },
    "evaluation": {"benchmarks": []},
}


def write_search(root: Path, space: dict, study: dict, objectives: list | None = None, **extra) -> Path:
    """A base config and a search file over it in ``root``; returns the search file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {"config": "base.yaml", "space": space, "study": study,
            "objectives": objectives or [{"metric": "gate_retention"}], **extra}
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def search_dir(tmp_path: Path) -> Path:
    return tmp_path


# ------------------------------------------------------------------------------ a throwaway PostgreSQL
def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")  # one cluster for every module that needs it
def postgres_url():
    """A PostgreSQL cluster in a temporary directory on 127.0.0.1 and its own port; removed afterwards.

    initdb refuses to run as root, so as root the server runs as the unprivileged ``postgres``
    user (created by Debian's ``postgresql`` package, which ``.ci/run`` installs). Skipped, with
    the reason, where the server or the driver is missing.
    """
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl); .ci/run installs Debian's postgresql package")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL driver psycopg2 is not installed (pip install 'rcc-compression[search]')")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no unprivileged 'postgres' user for initdb")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as 'postgres'")
        prefix = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="rcc-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", _free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, cwd=base)

    res = run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-N")
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {(res.stderr or res.stdout).strip()[-300:]}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    res = run(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-o", opts, "-w", "-t", "60", "start")
    if res.returncode != 0:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {(res.stderr + log).strip()[-300:]}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
