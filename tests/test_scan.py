"""`node-health scan` on saved logs as operators paste them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.scan import detect

KERNEL = Path(__file__).parent / "fixtures" / "kernel"
XID79 = "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."


def scan(cli_env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", "scan", *args],
        env=cli_env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def events(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("xid13-burst-gpud.log", "dmesg-T"),
        ("hung-task-logrotate.log", "dmesg-T"),
        ("nvme-removed-nvme-cli.log", "dmesg"),
        ("aer-fatal-returnn1500.log", "dmesg"),
        ("edac-ce-osm.log", "syslog"),
        ("io-ext4-sonic23146.log", "text"),
        ("xid71-nvlink-hyperpod-doc.log", "text"),
    ],
)
def test_layout_is_recognised(name: str, layout: str) -> None:
    assert detect((KERNEL / "faults" / name).read_bytes()) == layout


def test_iso_kmsg_and_journal_layouts() -> None:
    assert detect(b"2024-08-21T23:05:29,123456+00:00 " + XID79.encode() + b"\n") == "dmesg-iso"
    assert detect(b"3,812,1843308145,-;" + XID79.encode() + b"\n") == "kmsg"
    assert detect(json.dumps({"MESSAGE": XID79}).encode() + b"\n") == "journal-json"


def test_node_needing_out_exits_1_with_one_event_per_finding(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "faults" / "xid13-burst-gpud.log"), "--node", "gpu-7")
    assert out.returncode == 1
    got = events(out)
    assert [e["evidence"]["xid"] for e in got] == ["13", "109"]
    assert [(e["reason"], e["action"]) for e in got] == [
        ("XidUserAppError", "restart_app"),
        ("XidHardwareFailure", "reboot"),
    ]
    assert all(e["node"] == "gpu-7" and list(e)[:3] == ["level", "ts", "msg"] for e in got)
    err = out.stderr.decode()
    assert "(dmesg-T)" in err and "2 findings" in err
    assert "verdict: UnschedulablePendingReboot (needs the node out)" in err


def test_healthy_log_exits_0_and_prints_no_event(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "benign" / "gpu-node-journal-gpud1209.log"))
    assert out.returncode == 0 and out.stdout == b""
    assert "verdict: Schedulable (node fine)" in out.stderr.decode()


def test_events_only_are_no_reason_to_take_the_node_out(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "faults" / "conntrack-full-k8s71261.log"))
    assert out.returncode == 0 and len(events(out)) == 2


def test_standard_input_kmsg_and_journal(cli_env) -> None:
    raw = f"6,1,100,-;Linux version 6.8.0\n3,812,1843308145,-;{XID79}\n SUBSYSTEM=pci\n"
    out = scan(cli_env, "-", stdin=raw.encode())
    assert out.returncode == 1 and [(e["reason"], e["evidence"]["xid"]) for e in events(out)] == [
        ("XidHardwareFailure", "79")
    ]
    assert "(kmsg)" in out.stderr.decode()
    journal = json.dumps({"__REALTIME_TIMESTAMP": "1724281529000000", "MESSAGE": XID79}) + "\n"
    out = scan(cli_env, stdin=journal.encode())
    assert (
        out.returncode == 1 and events(out)[0]["details: "]["timestamp"] == "2024-08-21T23:05:29Z"
    )


def test_count_rules_run_on_the_logs_own_time(cli_env, tmp_path) -> None:
    # A site's count rule (three XID 13 on one GPU in ten minutes mean reboot): within ten
    # minutes of log time they count, spread out they do not.
    cfg = tmp_path / "count.yaml"
    cfg.write_text(
        "policy:\n  rules:\n    - {name: xid13-thrice, match: {xid: 13}, count: 3,"
        " window: 10m, action: reboot}\n"
    )
    line = "[{t:12.6f}] NVRM: Xid (PCI:0000:cb:00): 13, Graphics Exception\n"
    close = tmp_path / "close.log"
    close.write_text("".join(line.format(t=5 + 240 * i) for i in range(3)))
    apart = tmp_path / "apart.log"
    apart.write_text("".join(line.format(t=5 + 400 * i) for i in range(3)))
    assert scan(cli_env, str(close), "-c", str(cfg)).returncode == 1
    assert scan(cli_env, str(apart), "-c", str(cfg)).returncode == 0
    # The packaged table never reboots for application errors by their number.
    assert scan(cli_env, str(close)).returncode == 0


def test_settings_rules_apply_to_a_scan(cli_env, tmp_path) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "checks:\n  kernel_log:\n    disable_rules: [conntrack-full]\n"
        "policy:\n  rules:\n    - name: xid13-is-fatal-here\n"
        "      match: {xid: 13}\n      action: replace\n"
    )
    assert (
        events(
            scan(
                cli_env,
                str(KERNEL / "faults" / "conntrack-full-kube-aws.log"),
                "--config",
                str(cfg),
            )
        )
        == []
    )
    out = scan(cli_env, str(KERNEL / "faults" / "xid13-burst-gpud.log"), "-c", str(cfg))
    assert "UnschedulablePendingReplacement" in out.stderr.decode()


def test_bad_input_and_bad_settings_exit_2(cli_env, tmp_path) -> None:
    out = scan(cli_env, str(tmp_path / "nope.log"))
    assert out.returncode == 2 and "cannot read" in out.stderr.decode()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "checks:\n  kernel_log:\n    rules:\n      - {name: x, anchor: abc, "
        "pattern: '(', condition: C}\n"
    )
    out = scan(cli_env, str(KERNEL / "faults" / "xid43-dra-driver.log"), "-c", str(cfg))
    assert out.returncode == 2
    assert "configuration error" in out.stderr.decode() and "rule 'x'" in out.stderr.decode()


def test_garbage_input_is_not_a_crash_and_not_node_fine(cli_env) -> None:
    out = scan(cli_env, stdin=bytes(range(256)) * 1000)
    assert out.returncode == 2 and out.stdout == b""
    assert "verdict: unknown (could not judge: not a format I know; I read kernel logs" in (
        out.stderr.decode()
    )


FIXTURES = KERNEL.parent
FALLEN = KERNEL / "faults" / "gpu-fallen-off-bus-no-xid-nvsentinel.log"


def verdict_line(out: subprocess.CompletedProcess) -> str:
    return out.stderr.decode().splitlines()[-1]


@pytest.mark.parametrize(
    "path",
    [
        None,  # empty
        FIXTURES / "crictl" / "info-ready.json",
        FIXTURES / "hosts" / "kernel-doc" / "proc" / "meminfo",
    ],
)
def test_input_in_no_format_i_know_exits_2_never_node_fine(cli_env, path: Path | None) -> None:
    out = scan(cli_env, stdin=path.read_bytes() if path else b"")
    assert out.returncode == 2, out.stderr
    assert "not a format I know; I read kernel logs (/dev/kmsg, " in verdict_line(out)
    assert "tool outputs (dcgmi diag, " in verdict_line(out)


def test_an_nccl_init_failure_is_recognised_and_unknown(cli_env) -> None:
    out = scan(cli_env, str(FIXTURES / "nccl" / "init-failure.txt"))
    assert out.returncode == 2
    assert "(all_reduce_perf)" in out.stderr.decode()
    assert verdict_line(out).startswith(
        "verdict: unknown (could not judge: all_reduce_perf: the NCCL test could not run"
    )


def test_gzip_and_utf16_are_read(cli_env, tmp_path) -> None:
    import gzip

    raw = FALLEN.read_bytes()
    for data in (
        gzip.compress(raw),
        raw.decode().encode("utf-16"),  # with its byte-order mark
        b"\xef\xbb\xbf" + raw,  # UTF-8 with one (Windows editors write it)
        gzip.compress(raw.decode().encode("utf-16-be").join([b"\xfe\xff", b""])),
    ):
        saved = tmp_path / "saved"
        saved.write_bytes(data)
        for out in (scan(cli_env, str(saved)), scan(cli_env, stdin=data)):
            assert out.returncode == 1, out.stderr
            assert "(dmesg)" in out.stderr.decode()
    cut = gzip.compress(raw)[:-20]
    out = scan(cli_env, stdin=cut)
    assert out.returncode == 1  # what came before the cut still counts...
    out = scan(
        cli_env,
        stdin=gzip.compress((KERNEL / "benign" / "edac-probe-rebar.log").read_bytes())[:-20],
    )
    assert out.returncode == 2  # ...but a cut stream is no healthy node
    assert "the gzip data is cut off or corrupt" in verdict_line(out)


def test_a_kernel_fault_before_a_tool_output_is_not_lost(cli_env, tmp_path) -> None:
    # A tool output after the dmesg does not make the file that tool's: each is judged.
    passed = (FIXTURES / "nvidia-smi" / "nvlink-e-h100-elided.txt").read_bytes()
    both = tmp_path / "both.log"
    both.write_bytes(FALLEN.read_bytes() + passed)
    out = scan(cli_env, str(both))
    assert out.returncode == 1, out.stderr
    assert "(dmesg, nvidia-smi nvlink -e)" in out.stderr.decode()
    assert "needs the node out" in verdict_line(out)


def test_a_bug_report_shaped_bundle_is_judged_by_each_part(cli_env, tmp_path) -> None:
    # nvidia-bug-report.sh puts command outputs one after another: nvidia-smi -q, dmesg, ...
    bundle = tmp_path / "nvidia-bug-report.log"
    bundle.write_bytes(
        (FIXTURES / "nvidia-smi" / "q-a100-reset-status-cut.txt").read_bytes()
        + b"\n"
        + FALLEN.read_bytes()
        + (FIXTURES / "efa" / "fi_info-p4de-4-devices.txt").read_bytes()
    )
    out = scan(cli_env, str(bundle), "--instance-type", "p4de.24xlarge")
    assert out.returncode == 1, out.stderr
    assert "(dmesg, nvidia-smi -q, fi_info)" in out.stderr.decode()
    assert {e["reason"] for e in events(out)} >= {"GpuHealthy", "EfaDevicesPresent"}


def test_one_failed_row_does_not_make_a_dmesg_a_dcgmi_diag(cli_env, tmp_path) -> None:
    lines = (KERNEL / "benign" / "gpu-node-journal-gpud1209.log").read_bytes().splitlines(True)
    mixed = tmp_path / "mixed.log"
    mixed.write_bytes(
        b"".join(lines[:3]) + b"| x | Fail |\n" + b"".join(lines[3:]) + FALLEN.read_bytes()
    )
    out = scan(cli_env, str(mixed))
    assert out.returncode == 1, out.stderr
    assert [e["reason"] for e in events(out) if e["check"] == "dcgm"] == ["DcgmDiagCut"]
    assert "XidHardwareFailure" in {e["reason"] for e in events(out)}  # fallen off the bus


def test_newline_free_input_is_bounded_then_exit_2(cli_env) -> None:
    out = scan(cli_env, stdin=b"x" * (3 * 1024 * 1024))
    assert out.returncode == 2
    assert "a line longer than 1024 KiB: not text we read" in verdict_line(out)
    out = scan(cli_env, "/dev/zero")
    assert out.returncode == 2
    assert "a line longer than 1024 KiB" in verdict_line(out)


def test_a_fifo_without_a_writer_is_not_waited_on_forever(tmp_path, monkeypatch, capsys) -> None:
    import os

    from agent import scan as scan_module

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(scan_module, "FIFO_WAIT", 0.2)
    assert scan_module.main([str(fifo)]) == 2
    assert capsys.readouterr().err == (
        f"node-health: cannot read {fifo}: no writer on the FIFO in 0.2s\n"
    )


def test_a_closed_or_full_stdout_is_said_once_and_the_verdict_stands(cli_env) -> None:
    log = str(KERNEL / "faults" / "xid13-burst-gpud.log")
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [sys.executable, "-m", "agent", "scan", log],
            env=cli_env,
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err
    assert err.count("cannot write the events to stdout: No space left on device") == 1
    reader = subprocess.Popen(
        [sys.executable, "-m", "agent", "scan", log],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader.stdout.close()  # as `| head -0` does
    _, err_bytes = reader.communicate(timeout=60)
    assert reader.returncode == 1 and b"Traceback" not in err_bytes


def test_a_tool_output_across_two_pieces_of_a_stream_is_judged_whole(
    monkeypatch, tmp_path, capsys
) -> None:
    # A pipe is read a piece at a time: an output that runs past a piece's end is carried on.
    import io

    from agent import scan as scan_module
    from tests.conftest import whole_table

    monkeypatch.setattr(scan_module, "CHUNK", 2048)
    monkeypatch.setattr(scan_module, "READ", 512)
    benign = (KERNEL / "benign" / "gpu-node-journal-gpud1209.log").read_bytes()
    table = whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt").read_bytes()
    data = benign[:1500].rsplit(b"\n", 1)[0] + b"\n" + table + FALLEN.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert scan_module.main([]) == 1
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reasons = [e["reason"] for e in found]
    assert "DcgmDiagPassed" in reasons and "DcgmDiagCut" not in reasons
    assert "XidHardwareFailure" in reasons  # the GPU fallen off the bus


def bundle_of_three(tmp_path: Path) -> Path:
    """nvidia-smi -q and fi_info that pass, around a dmesg with a GPU fallen off the bus."""
    bundle = tmp_path / "bundle.log"
    bundle.write_bytes(
        (FIXTURES / "nvidia-smi" / "q-a100-reset-status-cut.txt").read_bytes()
        + b"\n"
        + FALLEN.read_bytes()
        + (FIXTURES / "efa" / "fi_info-p4de-4-devices.txt").read_bytes()
    )
    return bundle


def test_output_is_a_table_on_a_terminal_and_json_lines_when_piped(cli_env, tmp_path) -> None:
    from tests.test_cli_output import on_a_terminal

    bundle = str(bundle_of_three(tmp_path))
    it = ("--instance-type", "p4de.24xlarge")
    code, shown = on_a_terminal(cli_env | {"NO_COLOR": "1"}, "scan", bundle, *it)
    assert code == 1
    lines = shown.splitlines()
    assert lines[0].split() == ["TIME", "STATUS", "COMPONENT", "REASON", "ACTION", "MESSAGE"]
    rows = [line.split() for line in lines[1:] if not line.startswith(" ")]  # not wrapped
    assert [r[1] for r in rows] == ["fault", "fault", "ok", "ok"]  # the worst first
    assert rows[0][3:5] == ["XidHardwareFailure", "replace"] and rows[2][4] == "-"
    assert "\x1b[" not in shown
    code, as_json = on_a_terminal(cli_env, "scan", bundle, *it, "-o", "json")
    assert code == 1 and json.loads(as_json.splitlines()[0])["status"] == "fault"
    piped = scan(cli_env, bundle, *it)
    assert piped.returncode == 1 and {e["reason"] for e in events(piped)} >= {"GpuHealthy"}
    forced = scan(cli_env, bundle, *it, "-o", "table")
    assert forced.returncode == 1 and forced.stdout.decode().split()[:2] == ["TIME", "STATUS"]
    assert "verdict:" in forced.stderr.decode()  # the summary stays on stderr
    wide = scan(cli_env, bundle, *it, "--output", "wide").stdout.decode().splitlines()
    assert wide[0].split()[-1] == "EVIDENCE" and any('"pci":"0000:b3:00"' in line for line in wide)
    assert scan(cli_env, bundle, "-o", "yaml").returncode == 2


def test_the_table_puts_the_worst_first_whatever_the_order_found(cli_env, tmp_path) -> None:
    from agent.scan import table

    out = scan(cli_env, str(bundle_of_three(tmp_path)), "--instance-type", "p4de.24xlarge")
    found = out.stdout.decode().splitlines()
    rows = table("\n".join(reversed(found)), wide=False).splitlines()[1:]
    assert [r.split()[1] for r in rows] == sorted(
        (json.loads(e)["status"] for e in found), key=["fault", "unknown", "ok"].index
    )
    assert table("", wide=False) == "no events"
