"""Domain verbs after xl: ``create`` (options or an xl.cfg file), ``destroy``, ``list``,
``vcpu-list``, ``mem-set``, ``token``. Sizes are MiB as in xl; ``--frames`` gives 4 KiB frames instead."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from xenemu.cli.output import emit_json, show_table
from xenemu.cli.params import DOMAIN, FRAMES_PER_MIB, POSITIVE, SIZE_MIB, BasedInt, resolve
from xenemu.cli.root import Usage, echo_err, main, run_control

if TYPE_CHECKING:
    from xenemu.cli.xlcfg import DomainSpec
    from xenemu.client import SyncControlClient

json_flag = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON, for programs.")


def mib(frames: int) -> str:
    """Frames as xl shows memory: whole MiB, or a fraction when it is not whole."""
    return str(frames // FRAMES_PER_MIB) if frames % FRAMES_PER_MIB == 0 else f"{frames / FRAMES_PER_MIB:.2f}"


def spec_from(ctx: click.Context, config: Path | None, kw: dict[str, Any]) -> DomainSpec:
    """The file's settings, then each option given on the command line over them."""
    from xenemu.cli.xlcfg import ConfigError, DeviceSpec, DomainSpec, domain_spec, parse

    spec = DomainSpec()
    if config is not None:
        try:
            text = config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Usage(f"cannot read {config}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            spec = domain_spec(parse(text, str(config)))
        except ConfigError as exc:
            raise Usage(str(exc)) from None
        except ValueError as exc:
            raise Usage(f"{config}: {exc}") from None
    given = {name for name in kw if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if {"memory", "frames"} <= given:
        raise Usage("give --memory (MiB) or --frames, not both")
    for name, attr in (("kind", "kind"), ("name", "name"), ("vcpus", "vcpus"), ("max_mappings", "max_mappings")):
        if name in given or config is None:
            setattr(spec, attr, kw[name])
    if "memory" in given or (config is None and "frames" not in given):
        spec.frames = kw["memory"]
    if "frames" in given:
        spec.frames = kw["frames"]
    if "maxmem" in given:
        spec.max_pages = kw["maxmem"]
    if "target" in given:
        spec.target = kw["target"]
    if kw["pin"]:
        try:
            spec.pin = [int(c, 0) for c in kw["pin"].split(",")]
        except ValueError:
            raise Usage(f"--pin {kw['pin']!r}: want CPU[,CPU...], one per vCPU") from None
    if spec.pin is not None and len(spec.pin) == 1 and spec.vcpus > 1:
        spec.pin = spec.pin * spec.vcpus
    spec.devices += [DeviceSpec(bdf) for bdf in kw["pci"]]
    return spec


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--type", "kind", type=click.Choice(["pv", "hvm"]), default="hvm", show_default=True)
@click.option("--memory", type=SIZE_MIB, default="1", show_default=True, help="Memory in MiB as xl (or 512k, 2g).")
@click.option("--frames", type=POSITIVE, default=None, help="Memory in 4 KiB frames instead of --memory.")
@click.option("--maxmem", type=SIZE_MIB, default=None, help="The most it may populate, MiB (default: --memory).")
@click.option("--vcpus", type=BasedInt(1, 64), default=1, show_default=True)
@click.option("--pin", default="", help="The physical CPU of each vCPU: CPU[,CPU...] (one CPU pins them all).")
@click.option("--target", type=DOMAIN, default=None, help="Make it a device model for this domain (id or name).")
@click.option("--name", default="", help="Its name, shown by 'list' and usable for its id.")
@click.option("--pci", multiple=True, metavar="BDF", help="Assign this device too (repeatable); see pci-attach.")
@click.option("--max-mappings", type=BasedInt(0), default=None, help="Its quota of mappings (default: the host's).")
@json_flag
@click.pass_context
def create(ctx: click.Context, /, config: Path | None, as_json: bool, **kw: Any) -> None:
    """Create a domain from options or an xl-style CONFIG file (name=, type=, memory= MiB, maxmem=,
    vcpus=, cpus=[...], pci=["BDF,its_devid=N,its_events=N,pits=N,rmrr=START:COUNT"], target=);
    options override the file. Prints its id and the token its programs connect with."""
    spec = spec_from(ctx, config, kw)
    for key in spec.ignored:
        echo_err(f"{config}: ignoring {key!r} (xenemu has nothing to emulate for it)")
    directory: Path = ctx.obj

    def run(ctl: SyncControlClient) -> dict[str, Any]:
        target = None if spec.target is None else resolve(ctl, spec.target)
        reply = ctl.create_domain(
            spec.kind, spec.frames, target, spec.name, spec.max_mappings, spec.vcpus, spec.pin, spec.max_pages
        )
        devices = []
        try:
            for dev in spec.devices:
                got = ctl.assign_device(reply["domid"], dev.bdf, dev.rmrr, dev.its_devid, dev.its_events, dev.pits)
                devices.append({k: v for k, v in got.items() if k not in ("id", "ret")})
        except Exception:
            ctl.destroy_domain(reply["domid"])  # as xl: a domain whose devices failed is not left behind
            raise
        return {"domid": reply["domid"], "token": reply["token"], "name": spec.name, "devices": devices}

    created = run_control(directory, run)
    if as_json:
        emit_json(created)
        return
    click.echo(f"domid {created['domid']} token {created['token']}")
    for dev in created["devices"]:
        extra = f" vdevid {dev['vdevid']}" if "vdevid" in dev else ""
        click.echo(f"  {dev['bdf']}{extra}")


@main.command()
@click.argument("domain", type=DOMAIN)
@json_flag
@click.pass_obj
def destroy(directory: Path, domain: int | str, as_json: bool) -> None:
    """Destroy a domain (by id or name), releasing everything it holds."""
    domid = run_control(directory, lambda c: (d := resolve(c, domain), c.destroy_domain(d))[0])
    if as_json:
        emit_json({"domid": domid, "destroyed": True})


def state_flags(d: dict[str, Any]) -> str:
    """xl's six state letters (r b p s c d): running while a program of its is connected,
    blocked otherwise, paused while a migration has it stopped or is receiving it, dying while
    its ITS is torn down."""
    if d.get("paused"):
        return "--p---"
    running = d.get("connections", 0) > 0
    return ("r" if running else "-") + ("-" if running else "b") + "---" + ("d" if d.get("dying") else "-")


LONG_HEADERS = ("Type", "Target", "Devices", "MaxMem", "map_cap", "Flushes a/m", "M2B", "Mappings", "Faults")


@main.command("list")
@click.argument("domains", type=DOMAIN, nargs=-1)
@click.option("--long", "-l", "long_", is_flag=True, help="Also xenemu's columns: devices, IOMMU and M2B counters.")
@json_flag
@click.pass_obj
def list_(directory: Path, domains: tuple[int | str, ...], long_: bool, as_json: bool) -> None:
    """List domains as xl list does (Name ID Mem VCPUs State Time(s); Mem in MiB, Time the
    hypervisor's seconds on its requests); --long adds xenemu's columns."""

    def run(ctl: SyncControlClient) -> list[dict[str, Any]]:
        everyone: list[dict[str, Any]] = ctl.list_domains()
        if not domains:
            return everyone
        wanted = {resolve(ctl, ref) for ref in domains}
        return [d for d in everyone if d["domid"] in wanted]

    listed = run_control(directory, run)
    if as_json:
        emit_json(listed)
        return
    headers = ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    rows = []
    for d in listed:
        row = [
            d["name"] or ("Domain-0" if d["hwdom"] else f"d{d['domid']}"),
            str(d["domid"]),
            mib(d["pages"]),
            str(d.get("vcpus", 1)),
            state_flags(d),
            f"{d.get('time_s', 0.0):.1f}",
        ]
        if long_:
            flushes = d["flushes"]
            row += [
                d["type"] + ("(hw)" if d["hwdom"] else ""),
                "" if d["target"] is None else str(d["target"]),
                " ".join(d["devices"]),
                mib(d["max_pages"]),
                "yes" if d["map_cap"] else "no",
                f"{flushes.get('added', 0)}/{flushes.get('modified', 0)}" if flushes else "",
                str(d["m2b_entries"]),
                str(d["mappings"]),
                str(d["dma_faults"]),
            ]
        rows.append(row)
    show_table(
        headers + (list(LONG_HEADERS) if long_ else []),
        rows,
        right=("ID", "Mem", "VCPUs", "Time(s)", "MaxMem", "M2B", "Mappings", "Faults"),
    )


@main.command("mem-set")
@click.argument("domain", type=DOMAIN)
@click.argument("size", type=SIZE_MIB)
@json_flag
@click.pass_obj
def mem_set(directory: Path, domain: int | str, size: int, as_json: bool) -> None:
    """Set the most DOMAIN may populate (its max_pages) to SIZE, MiB as xl (or 512k, 2g)."""
    domid = run_control(directory, lambda c: (d := resolve(c, domain), c.set_max_pages(d, size))[0])
    if as_json:
        emit_json({"domid": domid, "max_pages": size})


@main.command()
@click.argument("domain", type=DOMAIN)
@json_flag
@click.pass_obj
def token(directory: Path, domain: int | str, as_json: bool) -> None:
    """Print the token a program uses to speak for DOMAIN."""
    got = run_control(directory, lambda c: (d := resolve(c, domain), c.domain_token(d)))
    if as_json:
        emit_json({"domid": got[0], "token": got[1]})
    else:
        click.echo(got[1])


@main.command("vcpu-list")
@click.argument("domains", type=DOMAIN, nargs=-1)
@json_flag
@click.pass_obj
def vcpu_list(directory: Path, domains: tuple[int | str, ...], as_json: bool) -> None:
    """Each vCPU and the physical CPU it is pinned to, as xl vcpu-list (Name ID VCPU CPU)."""

    def run(ctl: SyncControlClient) -> list[dict[str, Any]]:
        wanted = {resolve(ctl, ref) for ref in domains}
        return [d for d in ctl.list_domains() if not wanted or d["domid"] in wanted]

    rows = [
        {"name": d["name"], "domid": d["domid"], "vcpu": v, "cpu": cpu}
        for d in run_control(directory, run)
        for v, cpu in enumerate(d.get("pin") or [0] * d.get("vcpus", 1))
    ]
    if as_json:
        emit_json(rows)
        return
    show_table(
        ["Name", "ID", "VCPU", "CPU"],
        [[r["name"] or f"d{r['domid']}", str(r["domid"]), str(r["vcpu"]), str(r["cpu"])] for r in rows],
    )
