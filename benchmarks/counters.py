"""The cost of the counter checks per poll on a p5.48xlarge-sized host.

    python benchmarks/counters.py [--polls 200] [--busy]

Builds a fixture tree in the kernel's sysfs layout: 32 EFA devices
(`/sys/class/infiniband/rdmap*/ports/1/{state,hw_counters/*}`), the PCI devices of a p5 with
their `aer_dev_correctable` (8 GPUs, 32 EFA, 8 NVMe, 4 switches' ports above each: 80), and
the NVML fake of tests/test_nvml.py's shape with 8 GPUs x 18 NVLinks x 3 error counters and a
PCIe replay counter. Each poll runs the efa check's sysfs part (port state and counters; fi_info
is a separate process and not a counter check), the link_counters check and the nvml check on
the fake (NVML's own time on a GPU is not in this figure: it is the driver's). It reports the
CPU time per poll (process time, median and p95) and the files opened per poll (counted by an
audit hook in polls of their own after the timed ones, so that the hook's Python call on every
open is not in the time). With --busy every counter grows every poll (by one: within every
limit, so no finding is a fault) and the state files are written each poll too; without, the
counters are quiet, as on a healthy node. The tree is in /dev/shm where there is one: sysfs is
in memory, and a file just rewritten on a disk filesystem costs its next read more (about
0.7 ms a busy poll on ext4), which a sysfs counter does not; the state files are in the
temporary directory, on a disk as the host's state dir is. Goal: <= 5 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checks.api import CheckContext, Status  # noqa: E402
from checks.efa import EfaCheck  # noqa: E402
from checks.link_counters import LinkCountersCheck  # noqa: E402
from checks.nvidia.check import NvmlCheck  # noqa: E402
from checks.nvidia.nvml import GpuReading, Snapshot  # noqa: E402

EFA_COUNTERS = (
    "rdma_read_wr_err",
    "rdma_write_wr_err",
    "unresponsive_remote_events",
    "impaired_remote_conn_events",
    "retrans_timeout_events",
    "rx_drops",
    "tx_pkts",
    "rx_pkts",
    "lifespan",
)
AER = (
    Path(__file__).resolve().parent.parent / "tests/fixtures/sysfs/aer_dev_correctable"
).read_text()


def build(root: Path) -> list[Path]:
    """The tree; the counter files a busy poll bumps."""
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("bench-boot\n")
    files = []
    for i in range(32):
        dev = root / "sys/class/infiniband" / f"rdmap{16 + i}s27"
        (dev / "device").mkdir(parents=True)
        (dev / "device/vendor").write_text("0x1d0f\n")
        port = dev / "ports/1"
        (port / "hw_counters").mkdir(parents=True)
        (port / "state").write_text("4: ACTIVE\n")
        for name in EFA_COUNTERS:
            (port / "hw_counters" / name).write_text("1000\n")
            files.append(port / "hw_counters" / name)
    for i in range(80):
        dev = root / "sys/bus/pci/devices" / f"0000:{0x10 + i:02x}:00.0"
        dev.mkdir(parents=True)
        (dev / "aer_dev_correctable").write_text(AER)
    return files


def snapshot(value: int) -> Snapshot:
    gpus = [
        GpuReading(
            index=i,
            pci=f"0000:{0x53 + i:02x}:00",
            name="NVIDIA H100 80GB HBM3",
            nvlinks_active=18,
            pcie_width=16,
            pcie_max_gen=5,
            clock_event_reasons=0,
            utilization=97,
            temperature=52,
            slowdown_temperature=87,
            pcie_replays=value,
            nvlink_errors={
                n: {"replay": value, "recovery": value, "crc": value} for n in range(18)
            },
        )
        for i in range(8)
    ]
    return Snapshot(8, gpus, "550.90.07")


class Fake:
    def __init__(self) -> None:
        self.value = 0

    def snapshot(self) -> Snapshot:
        return snapshot(self.value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--busy", action="store_true", help="every counter grows every poll")
    args = ap.parse_args()
    opened = [0]
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=shm) as tree:
        root = Path(tree) / "host"
        files = build(root)
        ctx = CheckContext(host_root=root, instance_type="p5.48xlarge", state_dir=Path(tmp) / "s")
        efa, links, fake = EfaCheck(ctx), LinkCountersCheck(ctx), Fake()
        gpu = NvmlCheck(ctx, backend=fake)
        t = [0.0]
        for check in (efa, links, gpu):
            check.clock = lambda: t[0]
        cpu, opens, findings, faults = [], [], 0, 0
        hooked = 5  # polls counting the files opened, after the timed ones
        for poll in range(args.polls + hooked):
            if poll == args.polls:
                sys.addaudithook(
                    lambda event, _: event == "open" and opened.__setitem__(0, opened[0] + 1)
                )
            t[0] = poll * 60.0
            if args.busy and poll:
                fake.value = poll
                for f in files:
                    f.write_text(f"{1000 + poll}\n")
            before, start = opened[0], time.process_time()
            found = efa._sysfs(efa.options) + links.collect() + gpu.collect()
            if poll < args.polls:
                cpu.append((time.process_time() - start) * 1000)
            else:
                opens.append(opened[0] - before)
            findings, faults = len(found), sum(f.status is Status.FAULT for f in found)
    cpu.sort()
    print(
        f"p5 tree, {'busy' if args.busy else 'quiet'} counters, {args.polls} polls:"
        f" CPU per poll median {statistics.median(cpu):.2f} ms,"
        f" p95 {cpu[int(len(cpu) * 0.95) - 1]:.2f} ms, max {cpu[-1]:.2f} ms;"
        f" files opened per poll {statistics.median(opens):.0f}; findings per poll {findings}"
        f" ({faults} faults); tree {'in ' + shm if shm else 'on the temporary directory'}"
    )


if __name__ == "__main__":
    main()
