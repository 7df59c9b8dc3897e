"""``fogsplit pack device``: one archive that installs a device agent on a board with no network.

    fogsplit pack device --bundle DIR --device cam0 --platform aarch64 --python 3.11 \\
        [--replay cam0.npz] [--trusted-key KEY.pub | --allow-unsigned] --out cam0-aarch64.tar.gz

The archive holds the fogsplit wheel, a wheelhouse of its dependencies built for the target
(pip resolves them for that platform and Python from the wheel's own metadata), the device's
shard with the manifest (and its signature and the public key that checks it), the replay
file, a device.toml, the systemd unit and ``install.sh``. pip does the work (download,
resolution, install): the packer only chooses the platform tags and lays the files out.

Downloads are cached (``--cache``, default ``~/.cache/fogsplit-pack``): a pack whose
dependencies the cache already resolves does not touch the network (``--refresh`` asks PyPI
again for newer versions). docs/device.md has the layout and the armv7 statement.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fogsplit.core.errors import FogsplitError
from fogsplit.core.manifest import load_bundle
from fogsplit.core.signing import SIGNATURE, load_public_key
from fogsplit.core.topics import check_name

log = logging.getLogger(__name__)

# onnxruntime publishes its aarch64 wheels as manylinux_2_28 only, and some packages (cffi 2,
# which PyNaCl needs) only as manylinux2014 (glibc 2.17). pip takes a --platform as that exact
# tag (pip 23 does not widen manylinux_2_28 to the older tags), so both are named: a target
# with glibc 2.28 runs either.
PLATFORMS = {"x86_64": ("manylinux_2_28_x86_64", "manylinux2014_x86_64"),
             "aarch64": ("manylinux_2_28_aarch64", "manylinux2014_aarch64")}
ARMV7 = ("armv7", "armv7l", "armhf", "arm")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
UNIT = "fogsplit-device.service"
ENV_EXAMPLE = "fogsplit-device.env.example"
DEFAULT_CACHE = Path.home() / ".cache" / "fogsplit-pack"


class PackError(FogsplitError):
    """A pack that cannot be made as asked; the message says which input and why."""


@dataclass(frozen=True)
class PackRequest:
    bundle: Path
    device: str
    platform: str
    python: str
    out: Path
    replay: Path | None = None
    trusted_key: Path | None = None
    allow_unsigned: bool = False
    source: Path | None = None
    wheel: Path | None = None
    cache: Path = DEFAULT_CACHE
    refresh: bool = False
    broker: str = "mqtts://site-gateway.lan:8883"
    fleet: str = "demo"
    cell: str = "cell0"


def check_platform(platform: str) -> str:
    if platform in ARMV7:
        raise PackError(f"--platform {platform}: PyPI has no 32-bit ARM (armv7l) wheels of numpy, onnxruntime, "
                        "msgpack, msgspec or pynacl, and onnxruntime has no source release to build one from; "
                        "install a 64-bit OS on the board (Raspberry Pi OS 64-bit runs on a Pi 3, 4, 5 and "
                        "Zero 2 W) and pack with --platform aarch64")
    if platform not in PLATFORMS:
        raise PackError(f"--platform {platform!r} is not one of {sorted(PLATFORMS)} (armv7: see docs/device.md)")
    return platform


def check_request(req: PackRequest):
    """Refuse bad input before anything is built or downloaded; the device's shard spec."""
    check_platform(req.platform)
    if req.python not in PYTHONS:
        raise PackError(f"--python {req.python!r} is not one of {PYTHONS}")
    check_name("device", req.device)
    out_dir = req.out.parent if str(req.out.parent) else Path(".")
    if not out_dir.is_dir():
        raise PackError(f"--out {req.out}: folder {out_dir} does not exist")
    if req.out.is_dir():
        raise PackError(f"--out {req.out}: is a folder; give the archive's file name, e.g. {req.device}.tar.gz")
    probe = _partial(req.out)
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise PackError(f"--out {req.out}: cannot write there ({exc.strerror})") from None
    if req.wheel is not None and not (req.wheel.is_file() and req.wheel.name.startswith("fogsplit-")
                                      and req.wheel.suffix == ".whl"):
        raise PackError(f"--wheel {req.wheel}: not a fogsplit wheel file (fogsplit-*.whl)")
    if not req.bundle.is_dir():
        raise PackError(f"--bundle {req.bundle}: no such bundle directory")
    if req.trusted_key is not None:
        load_public_key(req.trusted_key)
    elif (req.bundle / SIGNATURE).exists():
        raise PackError(f"--bundle {req.bundle} is signed: give --trusted-key, the public key its devices trust")
    elif not req.allow_unsigned:
        raise PackError(f"--bundle {req.bundle} has no {SIGNATURE}: sign it (fogsplit sign) and give "
                        "--trusted-key, or give --allow-unsigned to ship it unsigned")
    probe = load_bundle(req.bundle, shards=[], trusted_keys=[req.trusted_key] if req.trusted_key else [],
                        allow_unsigned=req.allow_unsigned)
    shard = probe.manifest.device_shard(req.device)     # names the sensors when the device is not one
    load_bundle(req.bundle, shards=[shard.name], trusted_keys=[req.trusted_key] if req.trusted_key else [],
                allow_unsigned=req.allow_unsigned)
    if req.replay is not None:
        from fogsplit.core.dataset import load_sensor
        samples = load_sensor(req.replay, req.device)
        sensor = next(s for s in probe.manifest.sensors if s.name == req.device)
        if tuple(samples.shape[1:]) != tuple(sensor.shape):
            raise PackError(f"--replay {req.replay}: samples of shape {list(samples.shape[1:])}, but the bundle's "
                            f"{req.device} takes {list(sensor.shape)}")
    return shard


# -- the wheels --------------------------------------------------------------------------------

def source_tree() -> Path:
    """The checkout fogsplit runs from (an editable install), which holds pyproject.toml and compose/."""
    import fogsplit
    root = Path(fogsplit.__file__).resolve().parent.parent
    if not _is_checkout(root):
        raise PackError("fogsplit pack builds from the fogsplit source tree (pyproject.toml, compose/), and this "
                        f"fogsplit is installed from {root}: give --source DIR (a checkout)")
    return root


def check_source(root: Path) -> Path:
    if not _is_checkout(root):
        raise PackError(f"--source {root}: not a fogsplit checkout (no pyproject.toml or compose/{UNIT})")
    return root


def _is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "compose" / UNIT).is_file()


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def top_folder(req: PackRequest) -> str:
    """The one folder the archive unpacks to."""
    return f"fogsplit-device-{req.device}-{req.platform}-py{req.python}"


def build_wheel(source: Path, dest: Path) -> Path:
    """``pip wheel --no-deps`` of the package, built from a copy so the checkout gets no build/."""
    try:
        import tomllib
    except ImportError:     # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((source / "pyproject.toml").read_text())
    dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    with tempfile.TemporaryDirectory(prefix="fogsplit-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (source / name).exists():
                shutil.copy2(source / name, copy / name)
        for d in sorted(dirs):
            shutil.copytree(source / d, copy / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(copy)], "build the fogsplit wheel")
    [wheel] = dest.glob("fogsplit-*.whl")
    return wheel


def _target(platform: str, python: str) -> list[str]:
    abi = "cp" + python.replace(".", "")
    return [*(flag for tag in PLATFORMS[platform] for flag in ("--platform", tag)), "--python-version", python, "--implementation", "cp", "--abi", abi,
            "--only-binary=:all:"]


def resolve(wheel: Path, platform: str, python: str, links: list[Path], report: Path) -> list[Path] | None:
    """The wheels pip would install for the target from ``links`` alone, or None if they do not resolve."""
    with tempfile.TemporaryDirectory(prefix="fogsplit-resolve-") as target:
        argv = ["--isolated", "install", "--dry-run", "--no-index", "--ignore-installed", "--target", target,
                "--report", str(report), *_target(platform, python), str(wheel), "pip"]
        for link in links:
            argv += ["--find-links", str(link)]
        done = subprocess.run([sys.executable, "-m", "pip", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        log.debug("offline resolution failed: %s", done.stderr[-2000:])
        return None
    chosen = json.loads(report.read_text())["install"]
    return [Path(item["download_info"]["url"].removeprefix("file://")) for item in chosen]


def wheelhouse(wheel: Path, platform: str, python: str, cache: Path, dest: Path, refresh: bool = False) -> list[Path]:
    """Fill ``dest`` with ``wheel`` and every wheel it needs on the target (and pip, to install with)."""
    store = cache / f"{platform}-py{python}"
    store.mkdir(parents=True, exist_ok=True)
    report = dest.parent / "resolve.json"
    found = None if refresh else resolve(wheel, platform, python, [store, wheel.parent], report)
    if found is None:
        print(f"downloading the {platform} Python {python} wheels into {store} ...", flush=True)
        _pip(["download", "-d", str(store), *_target(platform, python), str(wheel), "pip"],
             f"download the dependencies for {platform}, Python {python}")
        for stale in store.glob("fogsplit-*.whl"):     # pip copies the wheel in; its deps change between builds
            stale.unlink()
        found = resolve(wheel, platform, python, [store, wheel.parent], report)
        if found is None:
            raise PackError(f"the wheels for {platform}, Python {python} do not resolve offline from {store}")
    report.unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for file in found:
        shutil.copy2(file, dest / file.name)
    return sorted(dest.iterdir())


def _pip(args: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise PackError(f"could not {what}: pip {' '.join(args[:1])} failed:\n{done.stderr.strip()[-3000:]}")


# -- the archive -------------------------------------------------------------------------------

def device_toml(req: PackRequest, replay: str | None, key: str | None) -> str:
    """The device's settings as installed (docs/configuration.md has every key)."""
    lines = [
        "# /etc/fogsplit/device.toml, written by `fogsplit pack device` (docs/device.md, docs/configuration.md).",
        "# Mode 0644: no secret here; the broker password is /etc/fogsplit/broker.password (fogsplit-device.service).",
        f"name = {json.dumps(req.device)}",
        'bundle = "/var/lib/fogsplit/bundle"',
        f"fleet = {json.dumps(req.fleet)}",
        f"cell = {json.dumps(req.cell)}",
    ]
    lines.append(f"data = {json.dumps(replay)}" if replay else
                 "# data = \"/var/lib/fogsplit/replay.npz\"   # a replay file: fogsplit data replay --sensor ...")
    if key:
        lines.append(f"trusted_keys = [{json.dumps(key)}]")
    else:
        lines.append("allow_unsigned = true   # packed with --allow-unsigned")
    lines += ["", "[broker]", f"url = {json.dumps(req.broker)}", f"username = {json.dumps(req.device)}",
              'ca_file = "/etc/fogsplit/ca.crt"', "", "[device]", 'policy = "request"', "rate = 10.0", ""]
    return "\n".join(lines)


INSTALL = r"""#!/bin/sh
# Installs this fogsplit device agent with no network (docs/device.md). Run as root:
#   sudo ./install.sh                # the whole install: user, folders, venv, files, systemd unit
#   ./install.sh --venv-only DIR     # only the virtual environment, in DIR (no root needed)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
want_python="@PYTHON@"
want_machine="@MACHINE@"
prefix=/opt/fogsplit
venv_only=0
if [ "${1:-}" = "--venv-only" ]; then venv_only=1; prefix=${2:?--venv-only needs a folder}; fi

have_python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have_python" != "$want_python" ]; then
    echo "install.sh: this pack holds wheels for Python $want_python, but $PYTHON is $have_python;" \
         "set PYTHON=python$want_python or pack with --python $have_python" >&2
    exit 2
fi
if [ "$(uname -m)" != "$want_machine" ]; then
    echo "install.sh: this pack is for $want_machine, this machine is $(uname -m)" >&2
    exit 2
fi

# The venv gets pip from the wheelhouse (run from its wheel): no ensurepip, no python3-venv needed.
"$PYTHON" -m venv --without-pip "$prefix"
pip_wheel=$(ls "$here"/wheelhouse/pip-*.whl | head -n 1)
"$prefix/bin/python" "$pip_wheel/pip" --isolated install --no-index --only-binary=:all: \
    --find-links "$here/wheelhouse" pip fogsplit
if [ "$venv_only" = 1 ]; then exit 0; fi

id fogsplit >/dev/null 2>&1 || useradd --system --home-dir /var/lib/fogsplit --shell /usr/sbin/nologin fogsplit
install -d -m 0755 /etc/fogsplit /etc/fogsplit/trusted
install -d -o root -g fogsplit -m 0750 /var/lib/fogsplit
rm -rf /var/lib/fogsplit/bundle.new
cp -r "$here/bundle" /var/lib/fogsplit/bundle.new
rm -rf /var/lib/fogsplit/bundle && mv /var/lib/fogsplit/bundle.new /var/lib/fogsplit/bundle
if [ -d "$here/replay" ] && ls "$here"/replay/*.npz >/dev/null 2>&1; then
    install -d -m 0755 /var/lib/fogsplit/replay
    install -m 0644 "$here"/replay/*.npz /var/lib/fogsplit/replay/
fi
if [ -d "$here/trusted" ]; then install -m 0644 "$here"/trusted/*.pub /etc/fogsplit/trusted/; fi
chgrp -R fogsplit /var/lib/fogsplit && chmod -R g+rX /var/lib/fogsplit
if [ -e /etc/fogsplit/device.toml ]; then
    install -m 0644 "$here/config/device.toml" /etc/fogsplit/device.toml.new
    echo "kept /etc/fogsplit/device.toml; this pack's settings are in /etc/fogsplit/device.toml.new"
else
    install -m 0644 "$here/config/device.toml" /etc/fogsplit/device.toml
fi
install -m 0644 "$here/systemd/fogsplit-device.service" /etc/systemd/system/fogsplit-device.service
systemctl daemon-reload 2>/dev/null || true
echo "installed. Still to do: the broker CA in /etc/fogsplit/ca.crt, this device's MQTT password in"
echo "/etc/fogsplit/broker.password (root, mode 0600), then: systemctl enable --now fogsplit-device"
"""


def pack_device(req: PackRequest) -> Path:
    """Build the archive of ``req``; returns its path. Bad input raises :class:`PackError` first."""
    shard = check_request(req)
    source = check_source(req.source) if req.source else source_tree()
    top = top_folder(req)
    with tempfile.TemporaryDirectory(prefix="fogsplit-pack-") as tmp:
        root = Path(tmp) / top
        root.mkdir()
        built = Path(tmp) / "built"
        built.mkdir()
        wheel = shutil.copy2(req.wheel, built) if req.wheel else build_wheel(source, built)
        wheels = wheelhouse(Path(wheel), req.platform, req.python, req.cache, root / "wheelhouse", req.refresh)

        bundle = root / "bundle"
        bundle.mkdir()
        for name in ("manifest.json", SIGNATURE, shard.file):
            if (req.bundle / name).exists():
                shutil.copy2(req.bundle / name, bundle / name)
        key = None
        if req.trusted_key:
            (root / "trusted").mkdir()
            shutil.copy2(req.trusted_key, root / "trusted" / req.trusted_key.name)
            key = f"/etc/fogsplit/trusted/{req.trusted_key.name}"
        (root / "replay").mkdir()
        replay = None
        if req.replay:
            shutil.copy2(req.replay, root / "replay" / f"{req.device}.npz")
            replay = f"/var/lib/fogsplit/replay/{req.device}.npz"
        else:
            (root / "replay" / "NOTE").write_text(
                f"No replay file was packed. Make one where the data is:\n  fogsplit data replay --data images "
                f"--sensor {req.device} --out {req.device}.npz\ncopy it to /var/lib/fogsplit/replay/ and set "
                f"data in /etc/fogsplit/device.toml.\n")
        (root / "config").mkdir()
        (root / "config" / "device.toml").write_text(device_toml(req, replay, key))
        (root / "systemd").mkdir()
        for name in (UNIT, ENV_EXAMPLE):
            shutil.copy2(source / "compose" / name, root / "systemd" / name)
        install = root / "install.sh"
        install.write_text(INSTALL.replace("@PYTHON@", req.python).replace("@MACHINE@", req.platform))
        install.chmod(0o755)
        partial = _partial(req.out)
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=top)
        os.replace(partial, req.out)
    log.info("packed %s for %s, Python %s: %d wheels, shard %s", req.device, req.platform, req.python,
             len(wheels), shard.file)
    return req.out


# -- the command -------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("pack", help="pack a device agent for an offline install (docs/device.md)",
                       description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["device"])
    p.add_argument("--bundle", type=Path, required=True, help="the exported bundle")
    p.add_argument("--device", required=True, help="the device's sensor in the bundle, e.g. cam0")
    p.add_argument("--platform", required=True, help="aarch64 (64-bit Raspberry Pi OS) or x86_64; armv7 is refused")
    p.add_argument("--python", required=True, help=f"the board's Python, one of {', '.join(PYTHONS)}")
    p.add_argument("--out", type=Path, required=True, help="the archive to write (.tar.gz)")
    p.add_argument("--replay", type=Path, help="the device's replay file (fogsplit data replay)")
    p.add_argument("--trusted-key", type=Path, help="public key (.pub) that checks the bundle's signature")
    p.add_argument("--allow-unsigned", action="store_true", help="ship an unsigned bundle (the device accepts it)")
    p.add_argument("--broker", default=PackRequest.broker, help="broker URL written into device.toml")
    p.add_argument("--fleet", default="demo", help="fleet written into device.toml")
    p.add_argument("--cell", default="cell0", help="cell written into device.toml")
    p.add_argument("--source", type=Path, help="the fogsplit checkout to build from (default: this one)")
    p.add_argument("--wheel", type=Path, help="a fogsplit wheel to ship instead of building one from --source")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("FOGSPLIT_PACK_CACHE", DEFAULT_CACHE)),
                   help="where downloaded wheels are kept between packs (default ~/.cache/fogsplit-pack, "
                        "or FOGSPLIT_PACK_CACHE)")
    p.add_argument("--refresh", action="store_true", help="ask PyPI again instead of reusing cached wheels")


def run(args: argparse.Namespace) -> int:
    req = PackRequest(bundle=args.bundle, device=args.device, platform=args.platform, python=args.python,
                      out=args.out, replay=args.replay, trusted_key=args.trusted_key,
                      allow_unsigned=args.allow_unsigned, source=args.source, wheel=args.wheel, cache=args.cache,
                      refresh=args.refresh, broker=args.broker, fleet=args.fleet, cell=args.cell)
    out = pack_device(req)
    print(f"wrote {out}; on the board: tar xzf {out.name} && sudo ./{top_folder(req)}/install.sh")
    return 0
