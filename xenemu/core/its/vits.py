"""Transitional: the vITS now lives in the rooms of this package (see its ``__init__``)."""

from xenemu.core.its import DOORBELL_MFN, DOORBELL_OFFSET, Delivery, ItsHost, ItsOptions, audit_its

__all__ = ["DOORBELL_MFN", "DOORBELL_OFFSET", "Delivery", "ItsHost", "ItsOptions", "audit_its"]
