"""The pure hypervisor core: every hypercall's effect on the host, with no I/O."""
