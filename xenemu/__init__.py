"""xenemu: an emulated Xen-style hypervisor serving the PV IOMMU hypercall ABI."""

__version__ = "0.1.0"
