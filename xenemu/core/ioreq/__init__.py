"""IOREQ servers and ballooning: how emulators learn that a guest's frame went away.

- ``servers``: an IOREQ server, its real ``buffered_iopage_t`` ring and synchronous
  requests, and the registry of server ids.
- ``emulators``: creating a server for a guest, ownership checks, and tearing one down with
  its M2B and scratch entries.
- ``balloon``: ``decrease_reservation`` and ``populate_physmap``, the
  ``IOREQ_TYPE_INVALIDATE``s they owe (or the swap to the scratch frame) and the wait for
  synchronous answers, as an effect the shell runs.
"""
