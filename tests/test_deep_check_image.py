"""The Dockerfile's `deep-check` target, checked statically (the images cannot be built here: no
registry for their bases): the target exists and the default build stays the agent's; every
tool `node-health deep-check` calls, and what the Job's start runs, is installed by that
stage and on its PATH; its bases are pinned by digest, its sources by version (and checksum
where the vendor's is published)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from agent import deepcheck
from agent.controller import deepjob
from tests.conftest import REPO

DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    base: str
    name: str | None
    lines: list[str] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each instruction on one line."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].lines.append(line)
        elif word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args, stages


ARGS, STAGES = parse(REPO / "Dockerfile")
BY_NAME = {s.name: s for s in STAGES if s.name}
DEEP = BY_NAME.get("deep-check")


def resolved(base: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], base)


def installed(stage: Stage) -> set[str]:
    """The packages its `apt-get install` lines name."""
    out: set[str] = set()
    for line in stage.lines:
        for cmd in re.split(r"&&|\|", line):
            words = shlex.split(cmd.replace("RUN ", "", 1))
            if words[:2] == ["apt-get", "install"]:
                out |= {w for w in words[2:] if not w.startswith("-")}
    return out


def path_dirs(stage: Stage) -> list[str]:
    env = " ".join(line for line in stage.lines if line.startswith("ENV "))
    m = re.search(r"PATH=(\S+)", env)
    return m.group(1).split(":") if m else []


# Each tool: the package or build that brings it, and the directory it lands in.
PROVIDES = {
    "stress-ng": ("stress-ng", "/usr/bin"),
    "dcgmi": ("datacenter-gpu-manager-4-cuda12", "/usr/bin"),
    "nv-hostengine": ("datacenter-gpu-manager-4-cuda12", "/usr/bin"),
    "all_reduce_perf": ("COPY --from=nccl-tests", "/usr/local/bin"),
    "fi_info": ("efa_installer.sh", "/opt/amazon/efa/bin"),
    "fi_pingpong": ("efa_installer.sh", "/opt/amazon/efa/bin"),
    "nccom-test": ("aws-neuronx-tools", "/opt/aws/neuron/bin"),
    "neuron-ls": ("aws-neuronx-tools", "/opt/aws/neuron/bin"),
}


def tools_the_deep_check_calls() -> set[str]:
    """Every executable the deep check plans, on a GPU node with EFA and on a Trainium node,
    the suite `all`; with `neuron-ls` (the busy check) and what the Job's start runs."""
    which = lambda tool: f"/bin/{tool}"  # noqa: E731
    names = set()
    for itype in ("p5.48xlarge", "trn1.32xlarge"):
        opts = deepcheck.Options(suite="all", instance_type=itype)
        steps, _ = deepcheck.plan(opts, which=which)
        names |= {Path(s.argv[0]).name for s in steps}
    return names | {"fi_info", "neuron-ls", "nv-hostengine"}


def test_the_deep_check_target_exists_and_the_default_build_stays_the_agents() -> None:
    assert DEEP is not None and "nccl-tests" in BY_NAME
    default = STAGES[-1]
    assert default.base == "${PYTHON_IMAGE}" and 'CMD ["run"]' in default.lines
    assert 'ENTRYPOINT ["node-health"]' in DEEP.lines
    assert deepjob.START.endswith('exec "$0" "$@"')  # the Job runs node-health after it


def test_every_tool_the_deep_check_calls_is_installed_by_its_stage() -> None:
    assert DEEP is not None
    tools = tools_the_deep_check_calls()
    assert {"stress-ng", "dcgmi", "all_reduce_perf", "nccom-test", "fi_pingpong"} <= tools
    assert tools <= set(PROVIDES), f"no source in the image known for {tools - set(PROVIDES)}"
    packages, text, dirs = installed(DEEP), "\n".join(DEEP.lines), path_dirs(DEEP)
    for tool in sorted(tools):
        source, where = PROVIDES[tool]
        assert source in packages or source in text, f"{tool}: {source} not in the stage"
        assert where in dirs or where in ("/usr/bin", "/usr/local/bin"), f"{tool}: {where}"
    assert "/opt/node-health/bin" in dirs  # node-health itself
    nccl = "\n".join(BY_NAME["nccl-tests"].lines)
    assert "/opt/nccl-tests/bin/all_reduce_perf" in nccl
    assert "COPY --from=nccl-tests /opt/nccl-tests/bin/all_reduce_perf /usr/local/bin/" in text


def test_the_stage_runs_where_the_job_puts_the_state() -> None:
    assert DEEP is not None
    env = " ".join(line for line in DEEP.lines if line.startswith("ENV "))
    assert f"NODE_HEALTH_STATE_DIR={deepjob.STATE_DIR}" in env
    assert "NODE_HEALTH_HOST_ROOT=/host" in env


def test_bases_are_pinned_by_digest_and_sources_by_version() -> None:
    for name in ("nccl-tests", "deep-check"):
        base = resolved(BY_NAME[name].base)
        assert DIGEST.match(base), f"{name}: {base} is not pinned by digest"
    nccl = "\n".join(BY_NAME["nccl-tests"].lines)
    assert re.search(r"ARG NCCL_TESTS_VERSION=v\d+\.\d+\.\d+$", nccl, re.M)
    assert "/archive/refs/tags/${NCCL_TESTS_VERSION}.tar.gz" in nccl
    assert DEEP is not None
    text = "\n".join(DEEP.lines)
    assert re.search(r"ARG EFA_INSTALLER_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert re.search(r"ARG EFA_INSTALLER_SHA256=[0-9a-f]{64}$", text, re.M)
    assert "sha256sum -c" in text
