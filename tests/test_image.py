"""The image builds from what the Dockerfile says, reproducibly: a base pinned by digest,
every Python package pinned by constraints.txt, a build context with nothing else in it.
(No image is built here: CI has no registry to pull the base from. README, Container image,
says how the image is checked.)"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_base_image_is_pinned_by_digest() -> None:
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE, re.M))
    assert "PYTHON_IMAGE" in bases
    for image in bases.values():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    stages = re.findall(r"^FROM (\S+)(?: AS ([\w-]+))?$", DOCKERFILE, re.M)
    assert stages[-1] == ("${PYTHON_IMAGE}", "")  # the default target: the agent's image
    for image, _ in stages:
        assert image.startswith("${") and image[2:-1] in bases, image


def in_context(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last match wins)."""
    keep = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            keep = negate
    return keep


def test_every_file_the_build_copies_is_in_the_context_and_nothing_else() -> None:
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
        for src in line.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert in_context(src), src
    for left_out in ("tests/conftest.py", "benchmarks/harness.py", ".venv", ".git", "deploy"):
        assert not in_context(left_out), left_out


def test_constraints_pin_every_dependency_within_its_range() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version
    assert all(pins.values())
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


def test_the_license_is_the_one_the_package_declares() -> None:
    assert pyproject()["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in DOCKERFILE


def test_the_dockerfile_passes_hadolint() -> None:
    """Every stage, with the rules .hadolint.yaml leaves out and why (a shell without pipefail
    let a failed download through a pipe)."""
    hadolint = Path(sys.executable).with_name("hadolint")
    run = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_holds_bytecode_at_the_level_the_daemonset_runs_the_daemon() -> None:
    """With PYTHONDONTWRITEBYTECODE and a read-only root, a module without bytecode at the
    daemon's level (-OO in deploy/daemonset.yaml) is compiled again at every start, and the
    compiler's memory counts in the daemon's."""
    import yaml

    [ds] = [d for d in yaml.safe_load_all((REPO / "deploy/daemonset.yaml").read_text()) if d]
    [agent] = ds["spec"]["template"]["spec"]["containers"]
    python, flag, *_ = agent["command"]
    assert (python, flag) == ("python", "-OO")
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    build = next(s for s in stages if s.startswith("${PYTHON_IMAGE} AS build"))
    image = stages[-1]  # the agent's (the default target)
    for stage, what in ((build, "/opt/node-health/lib"), (image, "sysconfig.get_path")):
        [line] = [ln for ln in stage.splitlines() if "compileall" in ln and ln[:1] != "#"]
        assert "-o 0 -o 2" in line and what in line, line
