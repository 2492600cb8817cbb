"""The save/restore section: how long ``xenemu save`` and ``xenemu restore`` take per GiB of guest
memory, end to end over two daemons' control sockets (the image in 1 MiB chunks), for a guest
whose every page has contents (all-zero pages are left out of an image, so they would flatter it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from xenemu.bench.harness import Daemon, Scale
from xenemu.client import SyncControlClient, SyncHypercallClient

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
