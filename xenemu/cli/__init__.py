"""``xenemu``: the daemon (``serve``), toolstack verbs after Xen's ``xl``, a demo and the bench.

People get tables (plain columns when piped), programs get ``--json``; every failure is one
line and an exit status (0 done, 1 refused by the daemon, 2 usage). The package is one module
per family of verbs, each registering its commands on the one group in ``root``:

- ``root``: the ``main`` group, ``--dir``, reaching the daemon, errors and exit codes
- ``params``: what arguments accept (sizes in MiB, BDFs, a domain by id or name)
- ``output``: tables, plain columns and JSON
- ``xlcfg``: xl.cfg files for ``create``
- ``domains``: create, destroy, list, vcpu-list, mem-set, token
- ``devices``: pci-attach, mappings, its, inject-fault
- ``hostinfo``: info, stats, audit, dmesg
- ``migration``: save, restore, migrate
- ``serve``, ``demo``, ``benchmark``: the daemon, the demo, ``bench``

Nothing here imports the server or the hypervisor until a verb that needs them runs. Another
package adds a verb with one line here: ``main.add_command(its_click_command)``.
"""

from __future__ import annotations

from xenemu.cli import benchmark, demo, devices, domains, hostinfo, migration, serve
from xenemu.cli.root import main
from xenemu.conformance.cli import conformance

#: The modules whose import registers their verbs on ``main``.
VERB_MODULES = (domains, devices, hostinfo, migration, serve, demo, benchmark)

main.add_command(conformance)

__all__ = ["VERB_MODULES", "main"]
