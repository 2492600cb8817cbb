"""Grant maps at caller-chosen BFNs (GNTMAP_request_bfn_map; PROTOCOL.md 7.3 and 12.6)."""

from __future__ import annotations

from xenemu.abi import grant_table as grants
from xenemu.abi.grant_table import MapGrant, UnmapGrant
from xenemu.client import SyncHypercallClient, XenError
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Target

S = "12.6"


class Pair:
    """A frontend (HVM, granting) and a backend (PV, mapping at BFNs it picks), each with a device."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.front_id = t.guest("hvm", 32, "00:03.0")
        self.back_id = t.guest("pv", 16, "00:06.0")
        self.front: SyncHypercallClient = t.client(self.front_id)
        self.back: SyncHypercallClient = t.client(self.back_id)

    def refs(self, gfn: int) -> tuple[int, int, int]:
        info = self.t.control.frame_info(domid=self.front_id, gfn=gfn)
        return info["count"], info["type_count"], info["grant_maps"]


def busy(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except XenError as exc:
        return exc.errno == 16
    return False


@rule("GRANT-MAP-STATUS", S, "grant map statuses in PROTOCOL.md 7.3's order of checks; references per mapping")
def map_status(t: Target) -> None:
    pair = Pair(t)
    f, b, fid, bid = pair.front, pair.back, pair.front_id, pair.back_id
    f.grant_access(1, bid, 2)
    f.grant_access(2, 0, 3)
    f.grant_access(3, bid, 500)
    f.grant_access(4, bid, 4, readonly=True)
    cases = [
        (MapGrant(fid, 1, 0), "GNTST_bad_gntref"),
        (grants.map_at_bfn(4000, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(bid, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(fid, 2000, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(fid, 2, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(fid, 3, 0x2000), "GNTST_bad_page"),
        (grants.map_at_bfn(fid, 4, 0x2000), "GNTST_permission_denied"),
        (MapGrant(fid, 1, grants.HOST_MAP), "GNTST_bad_virt_addr"),
        (MapGrant(fid, 1, grants.DEVICE_MAP | grants.REQUEST_BFN_MAP, dev_bus_addr=0x2000800), "GNTST_bad_dev_addr"),
        (grants.map_at_bfn(fid, 1, 0x2000), "GNTST_okay"),
        (grants.map_at_bfn(fid, 1, 0x2000), "GNTST_bad_dev_addr"),  # that BFN is now taken
        (grants.map_at_bfn(fid, 4, 0x2001, readonly=True), "GNTST_okay"),
    ]
    got = b.map_grant_refs([op for op, _ in cases])
    assert [g.status_name for g in got] == [want for _, want in cases], f"{[g.status_name for g in got]}"
    assert pair.refs(2) == (2, 1, 1) and pair.refs(4) == (2, 0, 1), f"{pair.refs(2)} {pair.refs(4)}"
    t.check()
    handles = [g.handle for g in got if g.status == 0]
    unmapped = b.unmap_grant_refs([UnmapGrant(h) for h in handles] + [UnmapGrant(handles[0])])
    assert [u.status_name for u in unmapped] == ["GNTST_okay", "GNTST_okay", "GNTST_bad_handle"]
    assert pair.refs(2) == (1, 0, 0) and pair.refs(4) == (1, 0, 0), "unmap did not release the references"


@rule("GRANT-DMA", S, "a grant mapped at a BFN is reached by the mapper's device; read-only grants deny writes")
def dma(t: Target) -> None:
    pair = Pair(t)
    f, b, fid, bid = pair.front, pair.back, pair.front_id, pair.back_id
    f.grant_access(1, bid, 2)
    f.grant_access(4, bid, 4, readonly=True)
    got = b.map_grant_refs([grants.map_at_bfn(fid, 1, 0x2000), grants.map_at_bfn(fid, 4, 0x2001, readonly=True)])
    assert [g.status_name for g in got] == ["GNTST_okay", "GNTST_okay"]
    f.guest_write(2, b"written by the front")
    f.guest_write(4, b"read me")
    assert b.device_dma("00:06.0", 0x2000 << 12, length=20)["data"] == b"written by the front"
    assert b.device_dma("00:06.0", 0x2001 << 12, length=7)["data"] == b"read me"
    denied = b.device_dma("00:06.0", 0x2001 << 12, b"overwrite")
    assert not denied["ok"] and denied["reason"] == "write denied", f"{denied}"
    assert f.guest_read(4, 7) == b"read me"
    b.unmap_grant_refs([UnmapGrant(g.handle) for g in got])
    assert not b.device_dma("00:06.0", 0x2000 << 12, length=1)["ok"], "the device still reaches an unmapped grant"


@rule("GRANT-REVOKE-BUSY", S, "grant_access or end_access on an entry in use is -EBUSY; after unmap it succeeds")
def revoke_busy(t: Target) -> None:
    pair = Pair(t)
    pair.front.grant_access(1, pair.back_id, 2)
    (done,) = pair.back.map_grant_refs([grants.map_at_bfn(pair.front_id, 1, 0x2000)])
    assert done.status == 0
    assert busy(lambda: pair.front.end_access(1)), "end_access of a mapped grant"
    assert busy(lambda: pair.front.grant_access(1, pair.back_id, 3)), "grant_access over a mapped grant"
    pair.back.unmap_grant_refs([UnmapGrant(done.handle)])
    pair.front.end_access(1)


@rule("GRANT-UNMAP-STATUS", S, "unmap checks host_addr and dev_bus_addr against the mapping's")
def unmap_status(t: Target) -> None:
    pair = Pair(t)
    pair.front.grant_access(1, pair.back_id, 2)
    flags = grants.DEVICE_MAP | grants.REQUEST_BFN_MAP | grants.HOST_MAP
    (done,) = pair.back.map_grant_refs(
        [MapGrant(pair.front_id, 1, flags, host_addr=0x10000, dev_bus_addr=0x3000 << 12)]
    )
    assert done.status == 0
    got = pair.back.unmap_grant_refs(
        [UnmapGrant(done.handle, host_addr=0x20000), UnmapGrant(done.handle, dev_bus_addr=0x3001 << 12)]
    )
    assert [g.status_name for g in got] == ["GNTST_bad_virt_addr", "GNTST_bad_dev_addr"]
    assert pair.back.unmap_grant_refs([UnmapGrant(done.handle, 0x10000, 0x3000 << 12)])[0].status_name == "GNTST_okay"


@rule(
    "GRANT-FAULT",
    S,
    "an injected IOMMU fault at the BFN is GNTST_general_error, for map and unmap",
    needs=("fault_injection",),
)
def fault(t: Target) -> None:
    pair = Pair(t)
    pair.front.grant_access(1, pair.back_id, 2)
    pair.t.inject_fault(pair.back_id, 0x4000)
    (failed,) = pair.back.map_grant_refs([grants.map_at_bfn(pair.front_id, 1, 0x4000)])
    assert failed.status_name == "GNTST_general_error"
    assert pair.refs(2) == (1, 0, 0)
    pair.t.inject_fault(pair.back_id, 0x4000, clear=True)
    (done,) = pair.back.map_grant_refs([grants.map_at_bfn(pair.front_id, 1, 0x4000)])
    assert done.status == 0
    pair.t.inject_fault(pair.back_id, 0x4000)
    assert pair.back.unmap_grant_refs([UnmapGrant(done.handle)])[0].status_name == "GNTST_general_error"
    pair.t.inject_fault(pair.back_id, 0x4000, clear=True)
    assert pair.back.unmap_grant_refs([UnmapGrant(done.handle)])[0].status_name == "GNTST_okay"


@rule("GRANT-CALL-ERRORS", S, "a buffer that is not count structs, or an unknown cmd, is -EINVAL")
def call_errors(t: Target) -> None:
    pair = Pair(t)
    reply = pair.back.call("grant_table_op", {"cmd": "map_grant_ref", "buf": b"\0" * 31, "count": 1})
    assert reply["ret"] == -22, f"{reply}"
    reply = pair.back.call("grant_table_op", {"cmd": "swap", "buf": b"", "count": 0})
    assert reply["ret"] == -22, f"{reply}"


@rule(
    "GRANT-MACHINE-ADDR",
    S,
    "without request_bfn_map dev_bus_addr is the frame's machine address and no IOMMU entry is written",
)
def machine_addr(t: Target) -> None:
    pair = Pair(t)
    pair.front.grant_access(1, pair.back_id, 2)
    (done,) = pair.back.map_grant_refs([MapGrant(pair.front_id, 1, grants.DEVICE_MAP)])
    mfn = t.mfn(pair.front_id, 2)
    assert done.status == 0 and done.dev_bus_addr == mfn << 12
    assert all(row["kind"] != "grant" for row in t.control.dump_mappings(pair.back_id, 0, 4096))
    pair.back.unmap_grant_refs([UnmapGrant(done.handle)])


@rule("GRANT-BALLOON", S, "grant mappings are not M2B entries: balloon-out keeps the frame until they are unmapped")
def grant_balloon(t: Target) -> None:
    pair = Pair(t)
    pair.front.grant_access(1, pair.back_id, 2)
    mfn = t.mfn(pair.front_id, 2)
    (done,) = pair.back.map_grant_refs([grants.map_at_bfn(pair.front_id, 1, 0x2000)])
    assert done.status == 0
    assert pair.front.decrease_reservation([2])["ret"] == 1
    info = t.control.frame_info(mfn=mfn)
    assert (info["count"], info["grant_maps"]) == (1, 1), f"{info}"
    assert pair.back.device_dma("00:06.0", 0x2000 << 12, length=1)["ok"]
    pair.back.unmap_grant_refs([UnmapGrant(done.handle)])
    info = t.control.frame_info(mfn=mfn)
    assert (info["count"], info["owner"]) == (0, None), f"not freed: {info}"
