"""Saving and restoring a domain: its whole state as one versioned, checksummed image.

Pure and synchronous, like the rest of the core: the serializer turns a live domain into bytes,
the restorer turns bytes into a new live domain; files and sockets are the shell's and the
CLI's. The rooms, in dependency order:

``image``
    The format (PROTOCOL.md, "Save images"): a header, typed records, a SHA-256 trailer; the
    decoder checks every field and every cross-reference before anything is allocated.
``save``
    What a domain is, read into an ``Image``: its p2m and memory, its IOMMU context entry by
    BFN (the GFN behind each, since machine frames differ after a restore), quotas, devices,
    grant entries and its vITS registers; and what cannot be saved yet (refused, with why).
``restore``
    The host-dependent checks (room, devices, CPUs), then the build of a new domain with a new
    id and token, preemptible while its memory is copied, rolled back on any failure.
``store``
    Images being read out or written in over the control socket, in bounded chunks.
``stream``
    A live migration's state between requests, and its pre-copy sections' format.
``outgoing`` and ``incoming``
    Live migration's source (log-dirty, pre-copy rounds, the stop) and receiver (the domain
    built section by section); ``live`` is what the control requests call.
``dm``
    A device-model domain saved with its guest and restored against the restored guest: its
    own image plus its IOREQ servers and its foreign and scratch entries by the guest's GFN.
"""
