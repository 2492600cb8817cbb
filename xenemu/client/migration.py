"""The toolstack's half of a live migration (``xl migrate``): it carries sections from the
source daemon to the receiver and decides when to stop.

The daemons do the work (PROTOCOL.md section 14): the source logs what its domain writes and
copies pages in sections; the receiver builds the domain as they arrive. What is left to the
toolstack is the policy, as QEMU's and Xen's savers have it: send rounds while the domain dirties
less than the link carries, and stop it once the last round's dirty pages would cross within the
downtime budget (at the link's measured rate), or after ``max_rounds``. If the stop is refused
for now (an operation of many pages in flight), one more round is sent and the stop retried. On
any failure before the receiver has the domain, the receiver drops what it got and the source's
domain runs on; the report says where the domain is.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from xenemu.client.errors import XenError
from xenemu.client.transport import IMAGE_CHUNK, SyncControlClient

EBUSY = 16
PAGE = 4096


@dataclass
class Policy:
    #: The longest stop the toolstack aims for (QEMU's downtime-limit), in seconds.
    downtime: float = 0.03
    #: Rounds before the domain is stopped whatever it dirties (Xen's max_iters is 5; QEMU has
    #: none and throttles the guest instead; a hostile guest must not keep a migration going).
    max_rounds: int = 30
    #: Rounds in a row whose dirty pages did not shrink before the domain is stopped anyway (a
    #: guest that dirties, or churns GFNs, faster than the link carries gains nothing from more).
    stall_rounds: int = 3
    #: Pages per section (the daemons' limit is 8,192).
    section: int = 8192
    #: Tries at the stop before giving up (each after one more pre-copy round).
    stop_tries: int = 10


@dataclass
class Report:
    """What ``xl migrate`` and QEMU's ``info migrate`` tell: rounds, pages, rates, downtime."""

    domid: int = 0
    new_domid: int = 0
    token: str = ""
    rounds: int = 0
    #: Pages the domain has, and pages sent in all (a page sent again counts again).
    pages: int = 0
    pages_sent: int = 0
    #: Bytes that crossed (sections, framing included).
    bytes_sent: int = 0
    #: Pages the last pre-copy round found dirty, and the rate they were dirtied at (pages/s).
    last_dirty: int = 0
    dirty_rate: float = 0.0
    #: Pages in the last section (sent while the domain was stopped).
    final_pages: int = 0
    downtime_ms: float = 0.0
    total_s: float = 0.0
    #: With ``--with-dm``: each device model's new ``domid``, ``token``, ``pages`` and
    #: ``servers`` ([old, new] IOREQ server ids).
    device_models: list[dict[str, Any]] = field(default_factory=list)
    #: Per pre-copy round: (round, pages it sent, seconds it took, pages dirtied meanwhile).
    history: list[tuple[int, int, float, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = [list(h) for h in self.history]
        out.pop("token")
        out["device_models"] = [{k: v for k, v in d.items() if k != "token"} for d in self.device_models]
        return out


class MigrationFailed(Exception):
    """The migration did not complete; ``where`` says where the domain runs now."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(f"{message} ({where})")
        self.where = where


def copy_image(src: SyncControlClient, dst: SyncControlClient, image: int, size: int) -> int:
    """A transfer read out of the source and written into the receiver (chunks of at most 1 MiB):
    the receiver's transfer id."""
    target: int = dst.restore_begin(size)
    try:
        for offset in range(0, size, IMAGE_CHUNK):
            chunk = src.image_read(image, offset, min(IMAGE_CHUNK, size - offset))
            dst.image_write(target, offset, chunk)
    finally:
        src.image_close(image)
    return target


def carry(src: SyncControlClient, dst: SyncControlClient, reply: dict[str, Any], incoming: int) -> dict[str, Any]:
    """One section from the source into the receiver, applied there (with the last one, its
    device models' images if the reply has them)."""
    dm_images = [copy_image(src, dst, d["image"], d["size"]) for d in reply.get("dm_images", [])]
    target = copy_image(src, dst, reply["image"], reply["size"])
    got: dict[str, Any] = dst.migrate_receive(target, incoming, dm_images or None)
    return got


def migrate(
    src: SyncControlClient,
    dst: SyncControlClient,
    domid: int,
    policy: Policy | None = None,
    progress: Callable[[Report, dict[str, Any]], None] | None = None,
    with_dm: bool = False,
) -> Report:
    """Migrate ``domid`` from ``src``'s daemon to ``dst``'s; the report of a completed migration.
    Raises ``MigrationFailed`` (the domain still runs on the source) or ``XenError``."""
    policy = policy or Policy()
    report = Report(domid=domid)
    started = time.perf_counter()
    begun = src.migrate_begin(domid, with_dm)
    mig, report.pages = begun["migration"], begun["pages"]
    incoming = 0
    received = False
    try:
        round_started, round_bytes, round_sent, rate = started, 0, 0, 0.0
        tries = 0
        while True:
            reply = src.migrate_send(mig, policy.section)
            got = carry(src, dst, reply, incoming)
            incoming = got["incoming"]
            report.bytes_sent += reply["size"]
            round_bytes += reply["size"]
            round_sent += reply["pages"]
            report.rounds, report.pages_sent = reply["round"], reply["sent"]
            if progress is not None:
                progress(report, reply)
            if reply["left"]:
                continue
            now = time.perf_counter()
            took = max(now - round_started, 1e-6)
            rate = round_bytes / took  # what the link carried this round, bytes/s
            # The next round begins (one page, so the logs are read now): what this one left dirty.
            pending = src.migrate_send(mig, 1)
            got = carry(src, dst, pending, incoming)
            report.history.append((reply["round"], round_sent, round(took, 4), pending["dirtied"]))
            round_started, round_bytes, round_sent = time.perf_counter(), pending["size"], pending["pages"]
            report.bytes_sent += pending["size"]
            report.pages_sent = pending["sent"]
            report.rounds = pending["round"]
            report.last_dirty = pending["dirtied"]
            report.dirty_rate = round(pending["dirtied"] / took, 1)
            if progress is not None:
                progress(report, pending)
            budget = rate * policy.downtime / (PAGE + 16)
            dirt = [h[3] for h in report.history[-(policy.stall_rounds + 1) :]]
            stalled = len(dirt) > policy.stall_rounds and all(b >= a for a, b in itertools.pairwise(dirt))
            if pending["dirtied"] <= budget or pending["round"] >= policy.max_rounds or stalled:
                try:
                    final_started = time.perf_counter()
                    final = src.migrate_suspend(mig)
                except XenError as exc:
                    tries += 1
                    if exc.errno != EBUSY or tries >= policy.stop_tries:
                        raise
                    continue
                got = carry(src, dst, final, incoming)  # complete there, and paused
                report.new_domid = got["domid"]
                models = {m["domid"]: m for m in got.get("device_models", [])}
                src.migrate_commit(mig)  # the source's copy will never run again
                received = True
                resumed = dst.migrate_resume(incoming)  # the copy takes its token and runs
                report.downtime_ms = round((time.perf_counter() - final_started) * 1000, 2)
                report.final_pages, report.pages_sent = final["pages"], final["sent"]
                report.bytes_sent += final["size"]
                report.rounds = final["round"]
                report.token = resumed["token"]
                report.device_models = [models[m["domid"]] | m for m in resumed.get("device_models", [])]
                break
        src.migrate_finish(mig, True)
    except BaseException as exc:
        _undo(src, dst, mig, incoming, received)
        if received:
            raise MigrationFailed(
                f"committed, then: {exc}",
                f"the domain is the receiver's d{report.new_domid} (migrate_resume {incoming} there runs it if it"
                f" is still paused; migrate_finish {mig} here destroys the source's stopped copy)",
            ) from exc
        if isinstance(exc, XenError):
            raise MigrationFailed(str(exc), f"d{domid} runs on at the source") from exc
        raise
    report.total_s = round(time.perf_counter() - started, 3)
    return report


def _undo(src: SyncControlClient, dst: SyncControlClient, mig: int, incoming: int, received: bool) -> None:
    """Best effort after a failure: the receiver drops a half-received domain, the source's runs on."""
    if received:
        return
    if incoming:
        with contextlib.suppress(XenError, OSError):
            dst.migrate_drop(incoming)
    with contextlib.suppress(XenError, OSError):
        src.migrate_finish(mig, False)
