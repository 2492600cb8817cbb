"""What every benchmark section measures with: a daemon of its own, guests, timers, percentiles.

The daemon runs as a subprocess and is reached over its real sockets, as guests reach it, so
the figures include the wire; ``echo`` batches of the same size give the baseline.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient

BATCHES = (1, 16, 256, 4096)


@dataclass
class Scale:
    """How much work each figure does; ``quick`` is for tests and smoke runs."""

    ops_per_batch_size: int = 65536
    latency_samples: int = 2000
    live: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    m2b_entries: int = 10_000
    untouched_frames: int = 4 * 1024 * 1024  # a 16 GiB guest
    fairness_samples: int = 300
    balloon_frames: int = 4096
    #: The guest's dirty rates (MiB/s) the live migration is measured at.
    live_rates: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0, 40.0)

    @classmethod
    def quick(cls) -> Scale:
        return cls(4096, 200, (1_000, 10_000, 50_000), 1_000, 65536, 50, 1024, (0.0, 10.0))


@dataclass
class Daemon:
    directory: Path
    frames: int
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenemu",
                "--dir",
                str(self.directory),
                "serve",
                "--frames",
                str(self.frames),
                "--dom0-memory",
                "1024",
                "--log-level",
                "error",
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (self.directory / "hypercall.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's daemon did not start")
            time.sleep(0.02)

    @property
    def control(self) -> Path:
        return self.directory / "control.sock"

    @property
    def hypercall(self) -> Path:
        return self.directory / "hypercall.sock"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def guest(ctl: SyncControlClient, daemon: Daemon, memory: int, bdf: str, **kw: Any) -> tuple[int, SyncHypercallClient]:
    reply = ctl.create_domain("hvm", memory, **kw)
    if bdf:
        ctl.assign_device(reply["domid"], bdf)
    return reply["domid"], SyncHypercallClient.connect(daemon.hypercall, reply["token"])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def map_unmap_frames(batch: int, base: int, memory: int) -> tuple[bytes, bytes]:
    maps = ops.pack([ops.map_page(base + i, i % memory) for i in range(batch)])
    unmaps = ops.pack([ops.unmap_page(base + i) for i in range(batch)])
    return bytes(maps), bytes(unmaps)


def single_op_call(victim: SyncHypercallClient, memory: int) -> Callable[[], None]:
    """A victim's one-op call, mapping and unmapping one page in turn, for latency samples."""
    toggle = list(map_unmap_frames(1, 0x3000000, memory))

    def single() -> None:
        victim.iommu_op_raw(toggle[0], 1)
        toggle.reverse()

    return single


def throughput(xc: SyncHypercallClient, batch: int, total: int, base: int, memory: int, echo: bool) -> float:
    """Ops per second of map+unmap batches (or their echo), ``total`` ops in all; the best of
    three runs, since a noisy machine only ever makes a run slower."""
    return max(_throughput(xc, batch, total, base, memory, echo) for _ in range(3))


def _throughput(xc: SyncHypercallClient, batch: int, total: int, base: int, memory: int, echo: bool) -> float:
    maps, unmaps = map_unmap_frames(batch, base, memory)
    rounds = max(total // (2 * batch), 1)

    def run() -> None:
        for _ in range(rounds):
            for buf in (maps, unmaps):
                if echo:
                    xc.echo(buf, batch)
                else:
                    ret, _ = xc.iommu_op_raw(buf, batch)
                    assert ret == 0

    return 2 * rounds * batch / timed(run)


def repeat(times: int, fn: Callable[..., object], *args: object) -> float:
    """Seconds for ``times`` calls of ``fn(*args)``."""
    start = time.perf_counter()
    for _ in range(times):
        fn(*args)
    return time.perf_counter() - start


def latencies(call: Callable[[], Any], samples: int) -> tuple[float, float]:
    return percentiles([sample(call) for _ in range(samples)])


def paired_latencies(
    call: Callable[[], Any], baseline: Callable[[], Any], samples: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Both calls' p50/p99, sampled alternately so a burst of machine noise hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(samples):
        times[0].append(sample(call))
        times[1].append(sample(baseline))
    return percentiles(times[0]), percentiles(times[1])


def sample(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return times[len(times) // 2] * 1e6, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6
