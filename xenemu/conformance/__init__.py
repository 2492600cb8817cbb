"""The conformance suite as a product: every rule of PROTOCOL.md checked against any daemon.

`xenemu conformance` speaks only the wire protocol: it is a client of the control and hypercall
sockets (``xenemu.client``, ``xenemu.wire``, ``xenemu.abi``) and never loads the core or the
server, so the same rules check xenemu or anyone else's implementation of the ABI. Each case
names the rule it checks (``rules``), with the PROTOCOL.md section that states it; the runner
gives each an honest verdict (pass, fail, or not checked and why) and the report renders them
as a table, JUnit XML or JSON. ``selftest`` starts deliberately broken xenemu daemons (as
``python -m xenemu serve`` processes) to show that each mutation is caught by some rule.
"""
