"""The Python client as a host program sees it: typed methods, OSError refusals, ConnectionLost."""

from __future__ import annotations

import errno
import inspect
import os
import pickle
import pydoc
import typing
from pathlib import Path

import pytest
import trio

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import (
    ConnectionLost,
    ControlApi,
    ControlClient,
    HypercallApi,
    HypercallClient,
    SyncControlClient,
    SyncHypercallClient,
    XenError,
)
from xenemu.client.api import request


@pytest.fixture
def daemon(tmp_path: Path) -> typing.Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "256")
    yield proc
    proc.stop()


def test_a_refusal_is_an_oserror_with_its_errno_and_name(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        with pytest.raises(OSError) as info:
            ctl.destroy_domain(4242)
        exc = info.value
        assert isinstance(exc, XenError)
        assert exc.errno == errno.ESRCH and exc.ret == -errno.ESRCH and exc.name == "ESRCH"
        assert exc.strerror == os.strerror(errno.ESRCH)
        assert str(exc).startswith("destroy_domain failed: ESRCH") and exc.op == "destroy_domain"
        guest = ctl.create_domain("hvm", 16)
        with pytest.raises(XenError) as info:
            ctl.create_domain("vm", 16)
        assert info.value.errno == errno.EINVAL and "EINVAL" in str(info.value)
        copy = pickle.loads(pickle.dumps(info.value))
        assert (copy.errno, copy.message, copy.op) == (info.value.errno, info.value.message, info.value.op)
    with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc, pytest.raises(XenError) as info:
        xc.guest_read(1 << 30, 8)
    assert info.value.errno == errno.EINVAL


def test_constructed_like_oserror() -> None:
    exc = XenError(errno.EBUSY, "entry mapped", "end_access")
    assert (exc.errno, exc.strerror, exc.name) == (errno.EBUSY, os.strerror(errno.EBUSY), "EBUSY")
    assert str(exc) == "end_access failed: EBUSY (entry mapped)"
    assert XenError(200).name == "200"


def test_a_dead_daemon_is_connection_lost_not_a_socket_error(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 16)
        waiting = SyncHypercallClient.connect(daemon.hypercall_path, guest["token"])
        sending = SyncHypercallClient.connect(daemon.hypercall_path, guest["token"])
        daemon.proc.kill()
        daemon.proc.wait()
        with pytest.raises(ConnectionLost):  # the read side: EOF or ECONNRESET
            waiting.next_event(timeout=10)
        with pytest.raises(ConnectionLost):  # the send side: EPIPE
            sending.iommu_op([ops.query_caps()])
        with pytest.raises(ConnectionLost):
            ctl.list_domains()
        assert issubclass(ConnectionLost, ConnectionError)
        waiting.close()
        sending.close()


async def test_the_async_client_says_connection_lost_too(daemon: DaemonProcess) -> None:
    async with await ControlClient.connect(daemon.control_path) as ctl:
        guest = await ctl.create_domain("hvm", 16)
        async with await HypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            assert [op.status for op in await xc.iommu_op([ops.query_caps()])] == [0]
            daemon.proc.kill()
            daemon.proc.wait()
            with pytest.raises(ConnectionLost):
                await xc.next_event()
            with pytest.raises(ConnectionLost):
                for _ in range(3):  # the first send may still land in the socket buffer
                    await xc.iommu_op([ops.query_caps()])
                    await trio.sleep(0.05)


@pytest.mark.parametrize("api", [HypercallApi, ControlApi])
def test_every_request_has_a_docstring_and_a_real_return_type(api: type) -> None:
    methods = {name: value for name, value in vars(api).items() if isinstance(value, request)}
    assert len(methods) >= 15
    for name, method in methods.items():
        assert method.__doc__ and method.__doc__.strip(), name
        hints = typing.get_type_hints(method._build)
        returned = hints["return"]
        assert typing.get_origin(returned).__name__ == "Request", name
        (result,) = typing.get_args(returned)
        assert result is not typing.Any, name
        assert "self" in inspect.signature(method._build).parameters


def test_methods_keep_their_names_and_docstrings_on_an_instance(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        assert ctl.list_domains.__name__ == "list_domains"
        assert ctl.list_domains.__doc__ == ControlApi.list_domains.__doc__
        assert [d["domid"] for d in ctl.list_domains()] == [0]
        assert SyncControlClient.list_domains(ctl) == ctl.list_domains()  # as an unbound method
        assert "list_domains(self)" in pydoc.render_doc(SyncControlClient.list_domains, renderer=pydoc.plaintext)


def test_an_op_prints_by_its_subop_name() -> None:
    assert repr(ops.map_page(0x1000, 5)) == "Op(map_page, flags=0x3, bfn=0x1000, gfn=0x5, status=OK)"
    assert repr(ops.query_caps()) == "Op(query_caps, status=OK)"
    assert (
        repr(ops.unmap_foreign_page(0x20, 3).with_status(-22))
        == "Op(unmap_foreign_page, bfn=0x20, ioserver=0x3, status=-EINVAL)"
    )
    assert repr(ops.Op(77)) == "Op(subop=77, status=OK)"
    assert (
        str([ops.lookup_foreign_page(4, 1, 2)])
        == "[Op(lookup_foreign_page, gfn=0x4, domid=0x1, ioserver=0x2, status=OK)]"
    )


def test_state_does_not_survive_a_daemon_restart(tmp_path: Path) -> None:
    """What README and PROTOCOL.md say: a restarted daemon has dom0 alone, and old tokens are refused."""
    first = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "256")
    try:
        with SyncControlClient.connect(first.control_path) as ctl:
            guest = ctl.create_domain("hvm", 16, name="before")
        xc = SyncHypercallClient.connect(first.hypercall_path, guest["token"])
    finally:
        first.stop()
    with pytest.raises(ConnectionLost):
        xc.domain_info()
    xc.close()
    second = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "256")
    try:
        with SyncControlClient.connect(second.control_path) as ctl:
            assert [d["domid"] for d in ctl.list_domains()] == [0]
        with pytest.raises(XenError) as info:
            SyncHypercallClient.connect(second.hypercall_path, guest["token"])
        assert info.value.errno == errno.EACCES
    finally:
        second.stop()
