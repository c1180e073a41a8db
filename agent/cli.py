"""`node-health`: the command line. Exit codes: 0 healthy, 1 fault, 2 could not decide or bad
configuration."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent import __version__

app = typer.Typer(
    help="Health agent for GPU and Trainium nodes in Kubernetes.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
checks_app = typer.Typer(help="Inspect the checks.", no_args_is_help=True)
app.add_typer(checks_app, name="checks")
logs_app = typer.Typer(help="The agent's events in CloudWatch Logs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="NODE_HEALTH_CONFIG",
        help="YAML settings file.",
        dir_okay=False,
        show_default=False,
    ),
]


class Output(enum.StrEnum):
    table = "table"
    json = "json"
    wide = "wide"


OutputOption = Annotated[
    Output | None,
    typer.Option(
        "--output",
        "-o",
        help="table (on a terminal), json (JSON; piped, where the command prints lines), or "
        "wide: the table with more columns.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Same as -o json.", hidden=True)]


def _output(output: Output | None, as_json: bool, lines_when_piped: bool) -> Output:
    """What -o asked (or the older --json); unasked, a table, or for the commands that print
    events, JSON lines when stdout is no terminal (a pipe, a file, a log collector)."""
    if as_json or output is Output.json:
        return Output.json
    if output is not None:
        return output
    return Output.json if lines_when_piped and not sys.stdout.isatty() else Output.table


def _version(value: bool) -> None:
    if value:
        typer.echo(f"node-health {__version__} (python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _top(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Health agent for GPU and Trainium nodes in Kubernetes."""


def _setup(config: Path | None, **overrides: object):
    """Settings, identity and planned checks; a configuration error exits 2 with its key."""
    from agent import identity, logs
    from agent.config import ConfigError, load_settings
    from agent.plan import plan
    from checks.api import CheckContext

    try:
        settings = load_settings(config, **overrides)
        logs.configure(settings.log_level)
        ident = identity.resolve(settings)
        ctx = CheckContext(
            host_root=settings.host_root,
            instance_type=ident.instance_type,
            state_dir=settings.state_dir,
        )
        planned = plan(settings, ctx)
    except ConfigError as exc:
        typer.echo(f"node-health: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings, ident, planned


@app.command()
def run(
    config: ConfigOption = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="Run every enabled check once, print the events and exit: "
            "0 healthy, 1 fault, 2 undecided.",
        ),
    ] = False,
    dry_run: Annotated[
        bool | None,
        typer.Option("--dry-run", help="Decide and report, but change nothing on the node."),
    ] = None,
    output: OutputOption = None,
) -> None:
    """Run the agent (the daemon), or one pass of every check with --once."""
    import asyncio

    if not once:
        _keep_unused_out()

    from agent.daemon import run_daemon, run_once

    settings, ident, planned = _setup(config, dry_run=dry_run)
    if once:
        shown = _output(output, False, lines_when_piped=True)
        if shown is Output.json:
            raise typer.Exit(asyncio.run(run_once(settings, ident, planned)))
        import io

        events = io.StringIO()
        code = asyncio.run(run_once(settings, ident, planned, events))
        typer.echo(_events_table(events.getvalue(), wide=shown is Output.wide))
        raise typer.Exit(code)
    from agent.config import ConfigError
    from agent.kube import connect

    try:
        kube = connect(settings)
        code = asyncio.run(run_daemon(settings, ident, planned, kube))
    except ConfigError as exc:  # also what the daemon finds at start (its port in use)
        typer.echo(f"node-health: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _keep_unused_out() -> None:
    """The daemon prints no table and decodes no text of unknown charset: keep rich (about
    5 MiB) and requests' charset detectors (charset_normalizer, 2 MiB) out of its resident
    memory (benchmarks/footprint.py). No structlog configuration can keep rich out: `import
    structlog` itself runs `structlog.dev` and `structlog.tracebacks`, each importing rich where
    it is installed (and typer installs it). requests comes with the kubernetes client, for one
    proxy helper; its detector only guesses the charset of a response read as text, which the
    agent never does (the API's JSON is UTF-8, read as bytes by urllib3). A None in sys.modules
    is Python's way to make an import fail; here once typer (whose help and usage errors use
    rich) has parsed the command line. structlog falls back to plain tracebacks, and the agent's
    logs are JSON anyway; requests' warning that it found no detector is silenced."""
    import warnings

    warnings.filterwarnings("ignore", "Unable to find acceptable character detection")
    for name in ("rich", "charset_normalizer", "chardet"):
        sys.modules.setdefault(name, None)  # type: ignore[assignment]


def _events_table(lines: str, wide: bool) -> str:
    """`run --once` for a person: one row per event, the worst first."""
    from agent import terminal

    order = {"fault": 0, "unknown": 1, "ok": 2}
    events = sorted(
        (json.loads(line) for line in lines.splitlines() if line.strip()),
        key=lambda e: (order.get(str(e.get("status")), 3), str(e.get("check", ""))),
    )
    heads = ["CHECK", "STATUS", "COMPONENT", "REASON", "MESSAGE"] + (["EVIDENCE"] if wide else [])
    rows = []
    for e in events:
        row = [str(e.get(k) or "-") for k in ("check", "status", "component", "reason", "msg")]
        if wide:
            row.append(json.dumps(e.get("evidence") or {}, separators=(",", ":")))
        rows.append(row)
    return terminal.table(heads, rows) if rows else "no events"


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    }
)
def scan(ctx: typer.Context) -> None:
    """Judge a saved kernel log: one event per finding, a summary, exit 1 if the node must go.
    (See `node-health scan --help`.)"""
    from agent.scan import main as scan_main

    raise typer.Exit(scan_main(ctx.args))


class Suite(enum.StrEnum):
    stress = "stress"
    all = "all"


@app.command("deep-check")
def deep_check(
    config: ConfigOption = None,
    suite: Annotated[
        Suite, typer.Option(help="stress: stress-ng, DCGM, NCCL; all: and EFA devices, loopback.")
    ] = Suite.stress,
    level: Annotated[int, typer.Option(min=1, max=4, help="dcgmi diag level (1-4).")] = 2,
    instance_type: Annotated[
        str | None,
        typer.Option(help="Thresholds and counts of this type (default: settings or IMDS)."),
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(min=1, help="GPUs for NCCL (default: the type's).")
    ] = None,
    deadline: Annotated[str, typer.Option(help="Time for the whole run (e.g. 90m, 4h).")] = "4h",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Run and judge, but change no node label.")
    ] = False,
    as_json: JsonOption = False,
    output: OutputOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Run even while processes use the accelerators.")
    ] = False,
    connectivity: Annotated[
        bool,
        typer.Option(
            "--connectivity",
            help="Instead: NCCL all-reduce across pairs of --nodes (MPIJobs in the cluster).",
        ),
    ] = False,
    nodes: Annotated[
        str, typer.Option(help="With --connectivity: the nodes, comma-separated.")
    ] = "",
    kubeconfig: Annotated[
        str | None,
        typer.Option(help="With --connectivity: a kubeconfig (default as kubectl's)."),
    ] = None,
) -> None:
    """Run the deep health check on this node, or with --connectivity across nodes of the
    cluster: exit 0 passed, 1 failed, 2 could not judge."""
    lines = _output(output, as_json, lines_when_piped=True) is Output.json
    if connectivity:
        _connectivity(config, nodes, kubeconfig, dry_run, lines)
    import asyncio

    from agent import deepcheck, deeprecord
    from agent.kube import in_cluster
    from agent.nodestate import LocalStateFile
    from checks.api import seconds

    settings, ident, _ = _setup(config, dry_run=dry_run or None)
    if instance_type:
        ident = dataclasses.replace(ident, instance_type=instance_type)
    try:
        limit = seconds(deadline, "--deadline")
    except ValueError as exc:
        typer.echo(f"node-health: {exc}", err=True)
        raise typer.Exit(2) from None
    opts = deepcheck.Options(
        suite=suite.value, level=level, instance_type=ident.instance_type, gpus=gpus
    )
    if not force and (busy := asyncio.run(deepcheck.accelerators_in_use())):
        typer.echo(f"node-health: not running the deep check: {busy} (--force to run)", err=True)
        raise typer.Exit(2)
    run_id = deepcheck.new_run_id()
    records = settings.state_dir / deeprecord.DIRECTORY
    lifecycle = None
    if not settings.dry_run:
        deeprecord.start_record(records, run_id, ident)
        if not in_cluster(settings):  # in a cluster the node's daemon labels it, from the record
            writer = LocalStateFile(settings.state_dir / "node-state.json")
            lifecycle = deepcheck.Lifecycle(writer, settings.node_keys)

    def progress(name: str, result: deepcheck.StepResult | None) -> None:
        if lines:
            if result is not None:
                typer.echo(json.dumps(result.line(), separators=(",", ":")))
        elif result is None:
            typer.echo(f"  ...  {name} running", err=True)
        else:
            typer.echo(f"  {result.outcome:<8} {name} ({result.seconds:.1f}s): {result.message}")

    try:
        status, code, results = asyncio.run(
            deepcheck.deep_check(opts, ident, lifecycle, limit, progress)
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not settings.dry_run:
            deeprecord.write_results(records, run_id, [deeprecord.stopped_line(ident, run_id)])
        typer.echo("node-health: deep check stopped; node labels put back", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # our own error: the record must not stay InProgress
        from agent.entry import describe

        why = describe(exc)
        if not settings.dry_run:
            line = deeprecord.stopped_line(ident, run_id, f"Deep health check stopped: {why}")
            deeprecord.write_results(records, run_id, [line])
        typer.echo(f"node-health: deep check stopped: {why}; node labels put back", err=True)
        raise typer.Exit(2) from None
    event = deepcheck.result_event(ident, status, results, run_id)
    if settings.dry_run:
        event["dry_run"] = True
    path = deeprecord.write_results(records, run_id, [*(r.line() for r in results), event])
    if lines:
        typer.echo(json.dumps(event, separators=(",", ":")))
    else:
        from agent import terminal

        rows = [[r.name, r.outcome, f"{r.seconds:.1f}s", r.message] for r in results]
        typer.echo("\n" + terminal.table(["TEST", "RESULT", "TIME", "MESSAGE"], rows))
        typer.echo(f"\ndeep-health-check-status: {status} ({event['msg']})")
        typer.echo(f"results: {path}")
    raise typer.Exit(code)


def _connectivity(
    config: Path | None, nodes: str, kubeconfig: str | None, dry_run: bool, lines: bool
) -> None:
    from agent import logs
    from agent.config import ConfigError, load_settings
    from agent.controller.connectivity import Connectivity, ConnectivityError
    from agent.controller.pairs import Verdict
    from agent.events import dumps
    from agent.kube.client import KubeClient, KubeError

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(f"node-health: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_level)
    names = [n.strip() for n in nodes.split(",") if n.strip()]

    def say(event: dict) -> None:
        typer.echo(dumps(event) if lines else f"{event['ts']} {event['level']:5} {event['msg']}")

    try:
        client = KubeClient(kubeconfig or settings.kubernetes.kubeconfig, operator=True)
        check = Connectivity(client, settings.controller.connectivity, settings.node_keys, say)
        verdicts = check.check(names, mark=not dry_run)
    except (ConnectivityError, KubeError) as exc:
        typer.echo(f"node-health: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # no kubeconfig, a bad one
        typer.echo(f"node-health: cannot reach the cluster: {exc}", err=True)
        raise typer.Exit(2) from None
    found = set(verdicts.values())
    raise typer.Exit(1 if Verdict.FAILED in found else 2 if Verdict.UNKNOWN in found else 0)


@app.command()
def status(
    config: ConfigOption = None,
    kubeconfig: Annotated[
        str | None,
        typer.Option(help="A kubeconfig (default: the settings', $KUBECONFIG, ~/.kube/config)."),
    ] = None,
    selector: Annotated[str, typer.Option(help="Only nodes with these labels.")] = "",
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """The cluster's nodes: health status, deep-check status, instance type, last reason; each
    node's performance against its peers, and the network nodes suspected."""
    import time

    from agent.kube.client import KubeClient, KubeError
    from agent.kube.status import counts, performance, render, render_fleet, rows, suspected

    settings, _, _ = _setup(config)
    try:
        client = KubeClient(kubeconfig or settings.kubernetes.kubeconfig, operator=True)
        nodes = client.list_nodes(selector)
    except KubeError as exc:
        typer.echo(f"node-health: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # no kubeconfig, a bad one
        typer.echo(f"node-health: cannot reach the cluster: {exc}", err=True)
        raise typer.Exit(2) from None
    table = rows(nodes, settings.node_keys)
    perf = performance(nodes, settings.node_keys, settings.controller)
    held = suspected(nodes, settings.node_keys, settings.controller, time.time())
    shown = _output(output, as_json, lines_when_piped=False)
    if shown is Output.json:
        doc = {"nodes": table, "counts": counts(table), "performance": perf, "suspected": held}
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(render(table, wide=shown is Output.wide))
        if fleet := render_fleet(perf, held):
            typer.echo(f"\n{fleet}")


@app.command()
def controller(config: ConfigOption = None) -> None:
    """Run the cluster controller: drain, then reboot or replace the nodes whose health label
    asks for it (one active replica, by a Lease). Settings: the `controller` section."""
    import asyncio
    import os

    from agent import logs
    from agent.config import ConfigError, load_settings
    from agent.controller.run import run_controller
    from agent.kube.client import KubeClient

    try:
        settings = load_settings(config)
        logs.configure(settings.log_level)
        if settings.controller.backend == "sagemaker" and not settings.cluster_name:
            raise ConfigError("controller.backend sagemaker needs cluster_name")
        cfg = settings.kubernetes
        outside = not os.environ.get("KUBERNETES_SERVICE_HOST")
        try:
            client = KubeClient(cfg.kubeconfig, cfg.request_timeout, operator=outside)
        except Exception as exc:
            raise ConfigError(f"kubernetes: cannot load a kubeconfig: {exc}") from None
    except ConfigError as exc:
        typer.echo(f"node-health: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(run_controller(settings, client)))


class Format(enum.StrEnum):
    short = "short"
    detailed = "detailed"
    json = "json"


class Color(enum.StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


_FORMAT_OF = {Output.table: Format.short, Output.wide: Format.detailed, Output.json: Format.json}


@logs_app.command("tail")
def logs_tail(
    config: ConfigOption = None,
    cluster: Annotated[str | None, typer.Option(help="Cluster name (default: settings).")] = None,
    cluster_id: Annotated[str | None, typer.Option(help="Cluster id (default: settings).")] = None,
    log_group: Annotated[
        str | None, typer.Option(help="The log group (instead of --cluster/--cluster-id).")
    ] = None,
    node: Annotated[str | None, typer.Option(help="Only this node's events.")] = None,
    instance_id: Annotated[str | None, typer.Option(help="Only this instance's stream.")] = None,
    deep_health: Annotated[
        bool, typer.Option("--deep-health", help="The deep health check results instead.")
    ] = False,
    since: Annotated[
        str,
        typer.Option(
            help="From 5m, 1.5h, 2d, 1w ago, epoch seconds, or an ISO 8601 time "
            "(an offset, or UTC).",
        ),
    ] = "10m",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    filter_pattern: Annotated[
        str | None, typer.Option("--filter", help="A CloudWatch Logs filter pattern.")
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="short (the default), detailed or json.", show_default=False),
    ] = None,
    output: Annotated[
        Output | None,
        typer.Option(
            "--output",
            "-o",
            help="As --format: table is short, wide detailed, json json.",
            show_default=False,
        ),
    ] = None,
    stream_names: Annotated[
        list[str] | None,
        typer.Option(
            "--log-stream-names",
            help="Only these streams (repeat the option), instead of the agent's.",
            show_default=False,
        ),
    ] = None,
    stream_prefix: Annotated[
        str | None,
        typer.Option(
            "--log-stream-name-prefix",
            help="Only streams with this prefix, instead of the agent's.",
            show_default=False,
        ),
    ] = None,
    color: Annotated[
        Color, typer.Option("--color", help="Levels in colour: auto (a terminal, no NO_COLOR).")
    ] = Color.auto,
    interval: Annotated[float, typer.Option(help="Seconds between polls with --follow.")] = 5.0,
    region: Annotated[str | None, typer.Option(help="AWS region (default: boto3's).")] = None,
) -> None:
    """Print the agent's events from CloudWatch Logs, like `aws logs tail`."""
    from agent import logs_tail as lt
    from agent import terminal
    from agent.sinks.cloudwatch import log_group as hyperpod_log_group

    if fmt is not None and output is not None and _FORMAT_OF[output] is not fmt:
        typer.echo("node-health: --format and --output disagree: give one", err=True)
        raise typer.Exit(2)
    if stream_names and stream_prefix is not None:
        typer.echo(
            "node-health: --log-stream-names and --log-stream-name-prefix exclude each other",
            err=True,
        )
        raise typer.Exit(2)
    fmt = fmt or (_FORMAT_OF[output] if output else Format.short)
    settings, _, _ = _setup(config)
    cluster, cluster_id = cluster or settings.cluster_name, cluster_id or settings.cluster_id
    given = log_group or settings.cloudwatch.log_group
    if not given and not (cluster and cluster_id):
        typer.echo("node-health: give --log-group, or --cluster and --cluster-id", err=True)
        raise typer.Exit(2)
    group = hyperpod_log_group(given, cluster, cluster_id)
    try:
        start = lt.since_ms(since)
    except ValueError as exc:
        typer.echo(f"node-health: {exc}", err=True)
        raise typer.Exit(2) from None
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

    try:
        client = boto3.client(
            "logs", region_name=lt.region(region, settings.cloudwatch.region, settings.region)
        )
    except NoRegionError:
        typer.echo(
            "node-health: no AWS region: give --region, set cloudwatch.region or AWS_REGION",
            err=True,
        )
        raise typer.Exit(2) from None
    q = lt.Query(
        group,
        deep_health,
        instance_id,
        node,
        filter_pattern,
        tuple(stream_names or ()),
        stream_prefix,
    )
    try:
        lt.tail(
            client, q, start, follow, interval, lt.printer(fmt.value, terminal.color(color.value))
        )
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except (ClientError, BotoCoreError) as exc:
        typer.echo(f"node-health: {exc}", err=True)
        raise typer.Exit(2) from None


@checks_app.command("list")
def checks_list(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Each check: enabled or not, how often it runs, and what it needs that is missing."""
    _, _, planned = _setup(config)
    rows = []
    for pc in planned:
        if pc.error:
            state = f"error: {pc.error}"
        elif not pc.enabled:
            state = "disabled"
        elif pc.missing:
            state = "skipped: " + ", ".join(pc.missing)
        else:
            state = "enabled"
        every = "streams" if pc.interval is None else f"every {pc.interval:g}s"
        rows.append(
            {
                "check": pc.name,
                "state": state,
                "enabled": pc.enabled,
                "runs": every if pc.check else "-",
                "timeout_s": pc.timeout,
                "missing": pc.missing,
                "description": pc.description,
            }
        )
    shown = _output(output, as_json, lines_when_piped=False)
    if shown is Output.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from agent import terminal

    wide = shown is Output.wide
    heads = ["CHECK", "RUNS", "TIMEOUT", "STATE"] + (["DESCRIPTION"] if wide else [])
    cells = [
        [r["check"], r["runs"], f"{r['timeout_s']:g}", r["state"]]
        + ([r["description"] or "-"] if wide else [])
        for r in rows
    ]
    typer.echo(terminal.table(heads, cells))


@app.command()
def version(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Accepted as by every command; the version does not depend on it.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    output: OutputOption = None,
) -> None:
    """Print the agent's version."""
    python = sys.version.split()[0]
    if output is Output.json:
        typer.echo(json.dumps({"version": __version__, "python": python}))
    else:
        typer.echo(f"node-health {__version__} (python {python})")


def main() -> None:
    app()
