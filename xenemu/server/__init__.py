"""The trio shell: sockets, sessions, identity, and the scheduling of continuations.

It owns no hypervisor semantics. A frame becomes a message (``wire``), a message becomes a
typed action (``dispatch.parse``), and the action's generator is driven here: at each
continuation point the shell yields to trio, so every other connection with a request ready
gets a turn before a long batch resumes.

The rooms, each importing only those listed before it:

- ``session``: one connection's session: reading and decoding its frames, sending its
  replies and events (a task of its own, so a peer that stops reading stalls only itself),
  refusals, and the end of the connection.
- ``admission``: accepting and admission: the state directory and its lock, the listening
  sockets and their files, connection caps (control, awaiting hello, past hello), the hello
  deadline and handshake, token -> domain, and the registry of live sessions.
- ``scheduler``: the scheduling of preempted requests: driving an action's generator,
  yielding to trio at continuation points, parking a request on ``WaitForIoreqs``.
- ``daemon``: the daemon composing them: startup and shutdown, signals, answering a request,
  the pITS ticker, notifications after state changes, ``run_daemon``.
- ``limits``: what a peer may consume (no trio: the CLI reads its defaults cheaply).

Import the room you need (``from xenemu.server.daemon import run_daemon``): this package's
``__init__`` loads nothing, so ``xenemu.server.limits`` costs no trio and no hypervisor.
"""
