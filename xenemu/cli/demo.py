"""``xenemu demo``: a daemon of its own, dom0 plus an HVM guest with a device, the guest program
mapping all of its memory through the PV IOMMU, and the audit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from xenemu import programs_dir
from xenemu.cli.output import say
from xenemu.cli.params import FRAMES_PER_MIB, POSITIVE, SIZE_MIB
from xenemu.cli.root import Refused, Usage, main

#: The most guest memory the demo will map (it maps every frame, one op each): 4 GiB.
MAX_DEMO_FRAMES = 1 << 20


@main.command()
@click.option("--memory", type=SIZE_MIB, default="4", show_default=True, help="The guest's memory in MiB (as xl).")
@click.option("--frames", type=POSITIVE, default=None, help="The guest's memory in 4 KiB frames instead.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="warning")
def demo(memory: int, frames: int | None, log_level: str) -> None:
    """Start a daemon, create dom0 plus an HVM guest with a device, and run the guest program."""
    import trio

    from xenemu.logs import configure

    memory = frames if frames is not None else memory
    if memory > MAX_DEMO_FRAMES:
        raise Usage(f"the demo maps at most {MAX_DEMO_FRAMES // FRAMES_PER_MIB} MiB")
    configure(level=log_level)
    guest_program = programs_dir() / "pv_iommu_guest.py"
    if not guest_program.is_file():
        raise Refused(f"{guest_program} not found (a broken install: reinstall xenemu)")

    async def scenario(directory: Path) -> int:
        from xenemu.client import ControlClient
        from xenemu.core.host import Host
        from xenemu.core.options import HostOptions
        from xenemu.server.daemon import run_daemon

        status = 1

        async def started(daemon: Any) -> None:
            nonlocal status
            async with await ControlClient.connect(directory / "control.sock") as ctl:
                await ctl.assign_device(0, "0000:00:02.0")
                guest = await ctl.create_domain("hvm", memory, name="demo-guest")
                await ctl.assign_device(guest["domid"], "0000:00:03.0")
                size = f"{memory} frames ({memory / FRAMES_PER_MIB:g} MiB)"
                say(f"guest d{guest['domid']}: HVM, {size}, device 0000:00:03.0")
                argv = [
                    sys.executable,
                    str(guest_program),
                    "--socket",
                    str(directory / "hypercall.sock"),
                    "--token",
                    guest["token"],
                    "--bdf",
                    "0000:00:03.0",
                ]
                proc = await trio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
                violations = await ctl.audit()
                for line in violations:
                    say(f"violation {line}", "red")
                say("audit clean", "green") if not violations else say("audit failed", "red")
                status = 0 if proc.returncode == 0 and not violations else 1
            daemon.shutdown()

        await run_daemon(Host(HostOptions(nr_frames=max(1 << 16, memory * 2 + 8192))), directory, started=started)
        return status

    with tempfile.TemporaryDirectory(prefix="xenemu-demo-") as tmp:
        raise SystemExit(trio.run(scenario, Path(tmp)))
