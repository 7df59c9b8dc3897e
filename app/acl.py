"""``fogsplit acl``: the broker's access control list, generated from an inventory of the fleet.

Mosquitto's acl_file can only substitute a whole user name (``%u``) into a topic, so rules that
scope an account to its fleet and cell cannot be written as patterns; they are written out per
account instead, from an inventory (docs/access.md)::

    [fleets.demo]                       # operator, cloud: on by default
    sites = { site0 = ["cell0"] }       # a site broker's bridge carries these cells

    [fleets.demo.cells.cell0]
    gateways = ["gw0"]
    devices = ["cam0", "cam1"]

Accounts are named after their place, so every name is unique on the broker and a log line that
names the account says where it belongs:

==============================  ==================================================
``<fleet>.<cell>.<device>``     a device agent
``<fleet>.<cell>.<gateway>``    the gateway (fog node) of a cell
``<fleet>.cloud``               the cloud workers of a fleet (one account, many replicas)
``<fleet>.operator``            operators, dashboards, ``fogsplit watch``, Home Assistant
``<fleet>.<site>.bridge``       a site broker's bridge on the central broker
==============================  ==================================================
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from fogsplit.core.discovery import slug
from fogsplit.core.topics import PREFIX, check_name

__all__ = ["Account", "Inventory", "InventoryError", "accounts", "load_inventory", "render", "write_acl"]

SYS_TOPICS = "$SYS/#"


class InventoryError(ValueError):
    """The inventory is not a valid description of a fleet; the message names the key."""


class Cell(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    devices: list[str] = []
    gateways: list[str] = []


class Fleet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cells: dict[str, Cell] = {}
    cloud: bool = True
    operator: bool = True
    sites: dict[str, list[str]] = {}
    discovery_prefix: str = "homeassistant"


class Inventory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fleets: dict[str, Fleet]


@dataclass(frozen=True)
class Account:
    """One broker account: its name, what it is, and the topics it may write and read."""

    name: str
    role: str
    where: str
    write: tuple[str, ...]
    read: tuple[str, ...]


def load_inventory(path: Path) -> Inventory:
    """Read and check an inventory file; InventoryError names the file and the bad key."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise InventoryError(f"inventory {path}: cannot read it: {exc.strerror}") from None
    try:
        inventory = msgspec.toml.decode(text, type=Inventory)
    except msgspec.ValidationError as exc:
        raise InventoryError(f"inventory {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InventoryError(f"inventory {path}: not TOML: {exc}") from None
    check(inventory, str(path))
    return inventory


def check(inventory: Inventory, where: str = "inventory") -> None:
    if not inventory.fleets:
        raise InventoryError(f"{where}: no fleet under [fleets]")
    for fleet_name, fleet in inventory.fleets.items():
        at = f"{where}: fleets.{fleet_name}"
        _name(at, "fleet", fleet_name)
        if not fleet.cells:
            raise InventoryError(f"{at}: no cell under [fleets.{fleet_name}.cells]")
        for cell_name, cell in fleet.cells.items():
            _name(f"{at}.cells", "cell", cell_name)
            for kind, names in (("device", cell.devices), ("gateway", cell.gateways)):
                for name in names:
                    _name(f"{at}.cells.{cell_name}.{kind}s", kind, name)
        for site, cells in fleet.sites.items():
            _name(f"{at}.sites", "site", site)
            unknown = sorted(set(cells) - set(fleet.cells))
            if not cells or unknown:
                raise InventoryError(f"{at}.sites.{site}: a bridge carries cells of its fleet; "
                                     f"{'no cell given' if not cells else f'not a cell of {fleet_name}: {unknown}'}")
        if not all(part.isascii() and part and "+" not in part and "#" not in part
                   for part in fleet.discovery_prefix.split("/")):
            raise InventoryError(f"{at}.discovery_prefix: {fleet.discovery_prefix!r} is not a topic prefix")
    seen: dict[str, str] = {}
    for account in accounts(inventory):
        if account.name in seen:
            raise InventoryError(f"{where}: the account name {account.name!r} stands for both {seen[account.name]} "
                                 f"and {account.where}; rename one (names with '.' can collide)")
        seen[account.name] = account.where


def _name(at: str, what: str, value: str) -> None:
    try:
        check_name(what, value)
    except ValueError as exc:
        raise InventoryError(f"{at}: {exc}") from None


def accounts(inventory: Inventory) -> list[Account]:
    """Every account of the inventory with its rights, in file order."""
    out: list[Account] = []
    for f, fleet in inventory.fleets.items():
        root = f"{PREFIX}/{f}"
        for c, cell in fleet.cells.items():
            base = f"{root}/cell/{c}"
            node = slug("fogsplit", f, c)
            for d in cell.devices:
                out.append(Account(
                    f"{f}.{c}.{d}", "device", f"device {d} of cell {c} in fleet {f}",
                    write=(*(f"{base}/device/{d}/{leaf}" for leaf in ("scores", "feature", "late", "raw", "status",
                                                                       "stats")),
                           f"{root}/model/cell/{c}/status/device/{d}", f"{root}/error"),
                    read=(f"{base}/request", f"{base}/ack", f"{base}/gateway/+/status", f"{base}/result",
                          f"{base}/cmd/+", *_rollout_reads(root, c))))
            for g in cell.gateways:
                out.append(Account(
                    f"{f}.{c}.{g}", "gateway", f"gateway {g} of cell {c} in fleet {f}",
                    write=(f"{base}/request", f"{base}/ack", f"{base}/forward", f"{base}/result", f"{base}/replay/+",
                           f"{base}/gateway/{g}/status", f"{base}/gateway/{g}/stats",
                           f"{root}/model/cell/{c}/status/gateway/{g}",
                           f"{root}/error", f"{fleet.discovery_prefix}/+/{node}/+/config"),
                    read=(*(f"{base}/device/+/{leaf}" for leaf in ("scores", "feature", "late", "status")),
                          f"{base}/cmd/+", f"{base}/cloud/result", f"{base}/replay", *_rollout_reads(root, c))))
        if fleet.cloud:
            out.append(Account(
                f"{f}.cloud", "cloud", f"the cloud workers of fleet {f}",
                write=(f"{root}/cell/+/cloud/result", f"{root}/cell/+/result", f"{root}/cloud/+/status",
                       f"{root}/cloud/+/stats",
                       f"{root}/model/cell/+/status/cloud/+", f"{root}/error"),
                read=(f"{root}/cell/+/forward", f"{root}/cell/+/device/+/raw", f"{root}/cell/+/device/+/status",
                      *_rollout_reads(root, "+"))))
        if fleet.operator:
            out.append(Account(
                f"{f}.operator", "operator", f"the operators of fleet {f}",
                write=(f"{root}/cell/+/cmd/+", f"{root}/cell/+/replay", f"{root}/model/cell/+/rollout",
                       f"{root}/model/+/shard/+/+"),
                read=(f"{root}/#", SYS_TOPICS,
                      *(f"{fleet.discovery_prefix}/+/{slug('fogsplit', f, c)}/+/config" for c in fleet.cells))))
        for site, cells in fleet.sites.items():
            name = f"{f}.{site}.bridge"
            up = [f"{root}/cell/{c}/{leaf}" for c in cells for leaf in (
                "forward", "result", "replay/+", "device/+/status", "device/+/stats", "gateway/+/status",
                "gateway/+/stats")]
            out.append(Account(
                name, "bridge", f"the bridge of site {site} ({', '.join(cells)}) in fleet {f}",
                write=(*up, *(f"{root}/model/cell/{c}/status/+/+" for c in cells), f"{root}/error",
                       f"$SYS/broker/connection/{name}/state"),
                read=(*(f"{root}/cell/{c}/{leaf}" for c in cells for leaf in ("cmd/+", "cloud/result", "replay")),
                      *(f"{root}/model/cell/{c}/rollout" for c in cells),
                      f"{root}/model/+/shard/+/+")))
    return out


def _rollout_reads(root: str, cell: str) -> tuple[str, ...]:
    """What a tier reads of a rollout (docs/rollout.md): its cell's offer, the shards' chunks (the
    chunk topics name a shard, not a cell, so any shard of the fleet), its cell's tier statuses."""
    return (f"{root}/model/cell/{cell}/rollout", f"{root}/model/+/shard/+/+", f"{root}/model/cell/{cell}/status/+/+")


HEADER = """\
# fogsplit access control list (Mosquitto 2.x acl_file), GENERATED: do not edit.
# Edit the inventory and run:  fogsplit acl --inventory {inventory} --out {out}
# then reload the broker:      docker compose kill -s HUP broker
#
# Every account may publish and read exactly what its role needs in its own fleet and cell
# (docs/access.md): a device only its own topics in its cell, a gateway only its cell, cloud
# workers and operators only their fleet, a site's bridge only its site's cells. No `pattern`
# line: a name that is not in this file may connect (if it has a password) and do nothing.
# Mosquitto checks read rights on delivery, so a client may subscribe to a broad filter and
# receives only what it may read. With MQTT 5 a refused QoS 1 publish is answered with PUBACK
# reason 0x87 (not authorized), which fogsplit logs and counts; a refused QoS 0 publish is
# dropped without an answer.

"""


def render(inventory: Inventory, *, inventory_name: str = "fleet.toml", out_name: str = "mosquitto/acl") -> str:
    """The acl_file text: a header, then one ``user`` section per account."""
    lines = [HEADER.format(inventory=inventory_name, out=out_name)]
    fleet = None
    for account in accounts(inventory):
        this_fleet = account.name.split(".", 1)[0]
        if this_fleet != fleet:
            fleet = this_fleet
            lines.append(f"# --- fleet {fleet} " + "-" * max(3, 80 - len(fleet)) + "\n")
        lines.append(f"# {account.role}: {account.where}\n")
        lines.append(f"user {account.name}\n")
        lines.extend(f"topic write {topic}\n" for topic in account.write)
        lines.extend(f"topic read {topic}\n" for topic in account.read)
        lines.append("\n")
    return "".join(lines)


def write_acl(inventory_path: Path, out: Path | None) -> str:
    """Render the inventory; write it to ``out`` (atomically) or return it."""
    text = render(load_inventory(inventory_path), inventory_name=Path(inventory_path).name,
                  out_name=str(out) if out else "FILE")
    if out is not None:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("acl", help="write the broker's ACL (Mosquitto acl_file) from an inventory of the fleet")
    p.add_argument("--inventory", type=Path, required=True, help="TOML inventory: fleets, cells, devices, gateways")
    p.add_argument("--out", type=Path, help="the acl_file to write (default: print it)")
    p.add_argument("--accounts", action="store_true", help="print the account names only, one a line")


def run(args: argparse.Namespace) -> int:
    if args.accounts:
        print("\n".join(a.name for a in accounts(load_inventory(args.inventory))))
        return 0
    text = write_acl(args.inventory, args.out)
    if args.out is None:
        print(text, end="")
    else:
        print(f"wrote {args.out}: {text.count(chr(10) + 'user ')} accounts", file=sys.stderr)
    return 0
