"""The suite proves it can fail: it runs against deliberately broken xenemu daemons.

Each mutant is ``python -m xenemu serve`` started with ``XENEMU_MUTANT=NAME`` (the daemon's
``xenemu.server.mutants`` applies it; no option or request reaches it). First the unbroken
daemon must pass every rule it can be checked on (a rule that fails on xenemu itself would
make any "catch" meaningless); then every mutant must fail at least one rule. A mutant no
rule catches is a gap in the suite, and the self-test fails.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from xenemu.conformance.launch import DaemonProcess
from xenemu.conformance.rules import Rule
from xenemu.conformance.runner import FAIL, Result, Sockets, run

#: What each mutation breaks (the implementations are in ``xenemu.server.mutants``).
MUTANTS: dict[str, str] = {
    "map-order-status": "map_page answers -EINVAL where the order check says -ENOSPC",
    "rmrr-status": "unmap_page answers -ENOSPC for a BFN in an RMRR region instead of -EACCES",
    "missed-iotlb-flush": "a modified flush no longer invalidates the IOTLB",
    "leaked-reference": "unmap_page of one page keeps its frame's reference",
    "invalidate-order": "a call's IOREQ invalidates go out last owed first",
    "swap-ignored": "a frame mapped only with swap_mfn is announced by invalidates, not re-pointed",
    "stalled-its-queue": "the vITS never moves CREADR on",
    "pending-lost": "an LPI that fires while in service is dropped, not delivered at its end",
    "no-in-service": "an LPI is delivered again while the guest has it in service",
    "grant-status": "a grant of an unpopulated GFN is GNTST_general_error, not GNTST_bad_page",
    "grant-readonly-writable": "a read-only grant is mapped writable in the IOMMU",
    "bad-token-kept": "a hello with a bad token is refused but the connection stays open",
    "dma-dirty-lost": "DMA writes set no IOMMU dirty bit: live migration loses them",
}
#: The machine every self-test daemon emulates (the mutants break the Python handlers).
FLAGS = ("--frames", "8192", "--dom0-memory", "512", "--fault-injection", "--no-fast-path")


@dataclass(frozen=True)
class Outcome:
    mutant: str  # "" for the unbroken daemon
    results: list[Result]

    @property
    def failed(self) -> list[str]:
        return [r.rule.id for r in self.results if r.verdict == FAIL]


def run_against(mutant: str, rules: Sequence[Rule], workdir: Path) -> Outcome:
    directory = Path(tempfile.mkdtemp(prefix=f"{mutant or 'xenemu'}-", dir=workdir))
    env = {"XENEMU_MUTANT": mutant} if mutant else {}
    daemon = DaemonProcess(directory, *FLAGS, env=env)
    try:
        results = run(rules, Sockets(daemon.control_path, daemon.hypercall_path))
    finally:
        daemon.stop()
    return Outcome(mutant, results)


def self_test(
    rules: Sequence[Rule], mutants: Sequence[str], done: Callable[[Outcome], None], jobs: int = 2
) -> tuple[Outcome, list[Outcome]]:
    """The unbroken daemon's outcome, then each mutant's (in ``mutants``' order)."""
    with tempfile.TemporaryDirectory(prefix="xenemu-self-test-") as tmp, ThreadPoolExecutor(jobs) as pool:
        workdir = Path(tmp)
        futures = [pool.submit(run_against, name, rules, workdir) for name in ["", *mutants]]
        outcomes = []
        for future in futures:
            outcome = future.result()
            done(outcome)
            outcomes.append(outcome)
    return outcomes[0], outcomes[1:]
