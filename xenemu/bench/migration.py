"""The migration sections, over two daemons' control sockets: how long ``xenemu save`` and
``xenemu restore`` take per GiB of guest memory (the image in 1 MiB chunks), and a live migration's
downtime and pages sent against the rate the guest dirties its memory (``live_migration_section``),
for a guest whose every page has contents (all-zero pages are left out of an image, and cross a
live migration as a GFN alone, so they would flatter both).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from xenemu.bench.harness import Daemon, Scale
from xenemu.client import ConnectionLost, SyncControlClient, SyncHypercallClient, XenError
from xenemu.client.migration import Policy, migrate

GIB = 1 << 30


def migration_section(directory: Path, scale: Scale) -> dict[str, Any]:
    frames = scale.balloon_frames * 16  # 256 MiB, or 64 MiB for --quick
    source = Daemon(directory / "source", frames + 4096)
    target = Daemon(directory / "target", frames + 4096)
    try:
        with SyncControlClient.connect(source.control) as ctl:
            reply = ctl.create_domain("hvm", frames)
            ctl.assign_device(reply["domid"], "00:05.0")
            with SyncHypercallClient.connect(source.hypercall, reply["token"]) as xc:
                for gfn in range(frames):
                    xc.guest_write(gfn, gfn.to_bytes(8, "little") * 512)
            start = time.perf_counter()
            data = ctl.save_image(reply["domid"])
            saved = time.perf_counter() - start
            clean = ctl.audit() == []
        with SyncControlClient.connect(target.control) as ctl:
            start = time.perf_counter()
            restored = ctl.restore_image(data)
            elapsed = time.perf_counter() - start
            clean = clean and ctl.audit() == [] and restored["pages"] == frames
    finally:
        source.stop()
        target.stop()
    gib = frames * 4096 / GIB
    return {
        "migration": {
            "guest_mib": frames * 4096 >> 20,
            "image_mib": round(len(data) / (1 << 20), 1),
            "save_s_per_gib": round(saved / gib, 2),
            "restore_s_per_gib": round(elapsed / gib, 2),
            "audit_clean": clean,
        }
    }


# -- live migration ----------------------------------------------------------------------------
EBUSY, ESRCH = 16, 3
PAGE = 4096
#: The issue's targets, for a 256 MiB guest dirtying 10 MiB/s.
TARGET_RATE_MIB_S = 10.0
TARGET_DOWNTIME_MS = 50.0
TARGET_PAGES_RATIO = 1.5


#: A cycle of the writer: one DMA write of this many contiguous pages, then as many CPU writes of
#: one whole page each (guest_write reaches one page at a time; a device writes runs, as a NIC or
#: a disk does). Every page is written whole.
DMA_RUN, CPU_PAGES = 16, 4


def _writer(paths: list[str], token: str, bdf: str, pages: int, rate: float, stop: Any, count: Any, out: Any) -> None:
    """The guest dirtying its memory at ``rate`` MiB/s at random pages: whole-page CPU writes, and
    runs of whole pages written by its device's DMA (through its 1:1 default entries), four
    fifths of the bytes by DMA. It follows its domain from daemon to daemon with its token, as
    the scenario's guest does, and counts the pages of acknowledged writes in ``count``. ``out``
    gets the pauses it saw between two acknowledged writes: the longest across the stop (its
    writes refused meanwhile: the stop, the move and its reconnection) and the longest other
    one (its requests waiting behind the migration's work in the daemons, or for a CPU)."""
    rng = random.Random(rate)
    page = bytes(range(256)) * (PAGE // 256)
    run = page * DMA_RUN
    where = 0
    xc = SyncHypercallClient.connect(paths[where], token)
    per_s = rate * (1 << 20) / PAGE
    done = step = 0
    started = last = time.perf_counter()
    longest = stopped = 0.0
    refused = False
    while not stop.is_set():
        dma = step % (CPU_PAGES + 1) == 0
        try:
            if dma:
                gfn = rng.randrange(pages // DMA_RUN) * DMA_RUN
                if not xc.device_dma(bdf, gfn * PAGE, run)["ok"]:
                    raise RuntimeError(f"the device's DMA to GFN {gfn} faulted")
            else:
                xc.guest_write(rng.randrange(pages), page)
        except XenError as exc:
            refused = True
            if exc.errno == EBUSY:  # stopped for the last section, or not yet resumed: not done
                time.sleep(0.0005)
                continue
            if exc.errno != ESRCH:
                raise
            xc.close()
            where = 1 - where
            xc = _follow(paths[where], token)
            continue
        except ConnectionLost:
            refused = True
            xc.close()
            where = 1 - where
            xc = _follow(paths[where], token)
            continue
        now = time.perf_counter()
        if refused:
            stopped, refused = max(stopped, now - last), False
        else:
            longest = max(longest, now - last)
        last = now
        done += DMA_RUN if dma else 1
        step += 1
        count.value = done
        delay = started + done / per_s - now
        if delay > 0:
            time.sleep(delay)
    xc.close()
    out.put({"stop_pause_ms": round(stopped * 1000, 2), "other_pause_ms": round(longest * 1000, 2)})


def _follow(path: str, token: str) -> SyncHypercallClient:
    """The domain's new home: it has the token once the migration's last section is in."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return SyncHypercallClient.connect(path, token)
        except (OSError, XenError, ConnectionLost):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def live_migration_section(directory: Path, scale: Scale) -> dict[str, Any]:
    """Live migration over two daemons while a writer process dirties the guest at each rate of
    ``scale.live_rates`` (MiB/s): the toolstack's downtime (the stop-and-copy, from the stop to the
    receiver's reply) and the pages sent in all, against the guest's pages; also the rate the
    writer reached during the migration and the pauses it saw (across the stop, and otherwise).
    The guest migrates back and forth, one migration per rate, every page with contents (zero
    pages cross as a GFN alone, which would flatter the figures)."""
    frames = scale.balloon_frames * 16  # 256 MiB, or 64 MiB for --quick
    daemons = [Daemon(directory / "a", frames + 4096), Daemon(directory / "b", frames + 4096)]
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    try:
        ctls = [SyncControlClient.connect(d.control) for d in daemons]
        reply = ctls[0].create_domain("hvm", frames, name="live")
        domid, token = reply["domid"], reply["token"]
        ctls[0].assign_device(domid, "00:05.0")
        with SyncHypercallClient.connect(daemons[0].hypercall, token) as xc:
            for gfn in range(0, frames, 256):  # every page written, 1 MiB per DMA
                xc.device_dma(
                    "0000:00:05.0", gfn * PAGE, b"".join(g.to_bytes(8, "little") * 512 for g in range(gfn, gfn + 256))
                )
        here = 0
        paths = [str(d.hypercall) for d in daemons]
        for rate in scale.live_rates:
            stop, count, out = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
            writer = None
            if rate > 0:
                order = [paths[here], paths[1 - here]]
                writer = ctx.Process(
                    target=_writer, args=(order, token, "0000:00:05.0", frames, rate, stop, count, out), daemon=True
                )
                writer.start()
                deadline = time.monotonic() + 30
                while count.value < 100 and time.monotonic() < deadline:  # connected and writing
                    time.sleep(0.01)
                time.sleep(0.3)
            before, started = count.value, time.perf_counter()  # pages the writer has written
            report = migrate(ctls[here], ctls[1 - here], domid, Policy())
            elapsed, after = time.perf_counter() - started, count.value
            time.sleep(0.2 if writer else 0)
            pauses: dict[str, Any] = {"stop_pause_ms": None, "other_pause_ms": None}
            if writer is not None:
                stop.set()
                pauses = out.get(timeout=30)
                writer.join(30)
            domid, here = report.new_domid, 1 - here
            rows.append(
                {
                    "rate_mib_s": rate,
                    "achieved_mib_s": round((after - before) * PAGE / (1 << 20) / elapsed, 1),
                    "rounds": report.rounds,
                    "pages_sent": report.pages_sent,
                    "sent_ratio": round(report.pages_sent / report.pages, 3),
                    "final_pages": report.final_pages,
                    "downtime_ms": report.downtime_ms,
                    "guest_pause_ms": pauses["stop_pause_ms"],
                    "guest_other_pause_ms": pauses["other_pause_ms"],
                    "total_s": report.total_s,
                }
            )
        clean = all(ctl.audit() == [] for ctl in ctls)
        for ctl in ctls:
            ctl.close()
    finally:
        for daemon in daemons:
            daemon.stop()
    at_target = next((r for r in rows if r["rate_mib_s"] == TARGET_RATE_MIB_S), None)
    return {
        "live_migration": {
            "guest_mib": frames * PAGE >> 20,
            "pages": frames,
            "rates": rows,
            "targets": {
                "rate_mib_s": TARGET_RATE_MIB_S,
                "downtime_ms": TARGET_DOWNTIME_MS,
                "sent_ratio": TARGET_PAGES_RATIO,
                "downtime_met": at_target is not None and at_target["downtime_ms"] <= TARGET_DOWNTIME_MS,
                "sent_ratio_met": at_target is not None and at_target["sent_ratio"] <= TARGET_PAGES_RATIO,
            },
            "audit_clean": clean,
        }
    }
