"""Build a pack: device.toml, the device part of the bundle, the wheelhouse, credentials, data,
the unit, the scripts, then pack.json over all of it; written to a staging folder and moved into
place only when complete."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tomtit.pack import PackError
from tomtit.pack.layout import BOARD
from tomtit.pack.unit import UnitLimits

# device.toml keys the pack sets itself (the board's layout and the files it carries)
PACKED_FILES = {"tls_ca": "tls-ca.crt", "tls_cert": "tls.crt", "tls_key": "tls.key"}


@dataclass(frozen=True)
class PackConfig:
    platform: str  # linux-aarch64 | linux-x86_64
    out: Path
    bundle: Path | None = None  # else the config's `bundle`
    python: str = "3.11"
    glibc: str = "2.28"  # the board's glibc is at least this: manylinux wheels up to it
    config: Path | None = None  # device.toml on this machine (its relative paths: to its folder)
    credentials: Path | None = None  # else the config's `credentials`
    data: Path | None = None  # else the config's `data`: a file here, packed; none: a placeholder path on the board
    board_data: str | None = None  # the examples' path ON the board (absolute, not packed), instead of data
    backend: str = "auto"  # auto (portable) | portable | ort-training | both (x86_64)
    tar: bool = False  # one OUT.tar.gz instead of the folder
    force: bool = False
    tomtit_wheel: Path | None = None  # else built from this checkout
    find_links: tuple[str, ...] = ()  # more wheel folders for pip download
    no_index: bool = False  # pip download from --find-links only (an air-gapped workstation)
    limits: UnitLimits = field(default_factory=UnitLimits)


def run_parser() -> argparse.ArgumentParser:
    """The parser of `tomtit device run`: what device.toml is checked against."""
    from tomtit.cli import config_file, device_cmd

    return config_file.verb_parser(device_cmd.register, "run")


def check_installed_config(path: str, *, data_packed: bool = False) -> None:
    """install.sh: the pack's device.toml works with the pack's tomtit (keys, types); checked
    before it replaces the one in use, so before the packed data is in place (`data_packed`)."""
    from tomtit.cli import config_file
    from tomtit.data import BUILTIN_DATASETS

    try:
        values = config_file.load_config(path, run_parser())
    except config_file.ConfigFileError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    data = values.get("data")
    if data is not None and not data_packed and data not in BUILTIN_DATASETS and not Path(data).is_file():
        print(f"install.sh: note: {data} does not exist yet: put the device's examples there (the service "
              f"fails, and retries every few seconds, until it does)")


def build_pack(cfg: PackConfig, *, log=print) -> dict:
    """Write the pack; returns its manifest (pack.json) with the archive's path when --tar."""
    from tomtit.fsutil import publish_dir, sha256_file, staging_dir
    from tomtit.pack.manifest import PACK_MANIFEST, write_archive, write_pack_manifest
    from tomtit.pack.wheelhouse import PLATFORMS, parse_python

    t0 = time.monotonic()
    if cfg.platform not in PLATFORMS:
        raise PackError(f"--platform must be one of {', '.join(PLATFORMS)}, not {cfg.platform!r}")
    parse_python(cfg.python)
    glibc = _parse_glibc(cfg.glibc)
    try:
        cfg.limits.check()
    except ValueError as e:
        raise PackError(str(e)) from None
    out = Path(cfg.out)
    archive = None
    if cfg.tar:
        archive = out if out.name.endswith((".tar.gz", ".tgz")) else out.with_name(out.name + ".tar.gz")
        out = archive.with_name(archive.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    final = archive or out
    if final.exists() and not cfg.force and (final.is_file() or any(final.iterdir())):
        raise PackError(f"{final} exists: give --force to replace it")
    if final.exists():
        check_replaceable(final, archive=archive is not None)
    final.parent.mkdir(parents=True, exist_ok=True)
    values, sources = _device_config(cfg)  # fails on a bad config before anything is downloaded
    tmp = staging_dir(out)
    try:
        facts = _fill(tmp, cfg, values, sources, glibc, log)
        manifest = write_pack_manifest(tmp, facts)
        manifest_sha256 = sha256_file(tmp / PACK_MANIFEST)
        if archive is not None:
            write_archive(tmp, archive)
            shutil.rmtree(tmp)
            manifest["archive"] = str(archive)
        else:
            publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(e["bytes"] for e in manifest["files"].values())
    log(f"pack for {cfg.platform} / Python {cfg.python} -> {final}: {len(manifest['files'])} files, "
        f"{total / 1e6:.1f} MB ({time.monotonic() - t0:.0f} s)")
    manifest["pack_sha256"] = manifest_sha256
    return manifest


def check_replaceable(final: Path, *, archive: bool) -> None:
    """--force replaces only what a pack build made: an empty folder, a pack folder (it has
    pack.json), or a pack archive (one folder with pack.json in it). Anything else is someone's
    data that a mistyped --out must not delete."""
    import tarfile

    from tomtit.pack.manifest import PACK_MANIFEST

    if final.is_symlink():
        raise PackError(f"{final} is a symbolic link: --force replaces only a pack; remove it yourself")
    if archive:
        if final.is_dir():
            raise PackError(f"{final} is a folder, not a pack archive: --force with --tar replaces only a previous "
                            f"pack archive; choose another --out, or remove it yourself")
        try:
            with tarfile.open(final) as tar:
                is_pack = any(len(Path(m.name).parts) == 2 and Path(m.name).name == PACK_MANIFEST for m in tar)
        except (tarfile.TarError, OSError, EOFError):
            is_pack = False
        if not is_pack:
            raise PackError(f"{final} is not a pack archive (no */{PACK_MANIFEST} in it): --force replaces only a "
                            f"previous pack; choose another --out, or remove it yourself")
        return
    if not final.is_dir():
        raise PackError(f"{final} is a file, not a pack folder: --force replaces only an empty folder or a previous "
                        f"pack; choose another --out, or remove it yourself")
    if any(final.iterdir()) and not (final / PACK_MANIFEST).is_file():
        raise PackError(f"{final} is not a pack (no {PACK_MANIFEST}) and not empty: --force replaces only an empty "
                        f"folder or a previous pack; choose another --out, or remove it yourself")


def _parse_glibc(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise PackError(f"--glibc must be like 2.28, not {text!r}") from None
    return major, minor


def _device_config(cfg: PackConfig) -> tuple[dict, dict]:
    """(device.toml values by key, files to pack by key) from --config and the pack's flags."""
    from tomtit.cli import config_file
    from tomtit.deploy._toml import read_toml
    from tomtit.deploy.errors import DeployError

    parser = run_parser()
    by_key = config_file.options_by_key(parser)
    key_of = {a.dest: k for k, a in by_key.items()}
    values: dict = {}
    raw: dict = {}
    if cfg.config is not None:
        try:
            raw = read_toml(Path(cfg.config), "--config file")
        except DeployError as e:
            raise PackError(str(e)) from None
        converted = config_file.load_config(cfg.config, parser)  # unknown keys and bad types fail here
        values = {key_of[dest]: v for dest, v in converted.items()}
    where = f"--config {cfg.config}"
    if "state_dir" in values:
        raise PackError(f"{where}: state_dir is the board's ({BOARD.state_dir}: the unit's only writable "
                        f"folder); leave it out")
    if "password" in values:
        # device.toml is 0644 in the pack (a 0755 folder) and travels with it: a password there is
        # readable by whoever can read the pack. credentials.toml is packed and installed 0600.
        raise PackError(f"{where}: password would be written into the pack's device.toml, readable by anyone who "
                        f"can read the pack: leave it out and give --credentials FILE (from `tomtit deploy init`; "
                        f"packed and installed with mode 0600)")
    sources: dict[str, Path] = {}
    for key, flag in (("bundle", cfg.bundle), ("credentials", cfg.credentials), ("data", cfg.data)):
        given = values.pop(key, None)
        if flag is not None and given is not None:
            raise PackError(f"--{key} and {key} in {where} both given: keep one")
        src = flag if flag is not None else given
        if src is not None:
            sources[key] = Path(src)
    for key in PACKED_FILES:
        if key in values:
            sources[key] = Path(values.pop(key))
    if "bundle" not in sources:
        raise PackError("give --bundle (or bundle in --config)")
    # Any other path option would name a file on this machine when relative: only board paths go.
    for key, value in list(values.items()):
        action = by_key[key]
        if config_file.is_path_option(action) and not Path(str(raw.get(key, value))).is_absolute():
            raise PackError(f"{where}: {key} = {raw.get(key)!r}: a packed config names files on the board; "
                            f"write it as an absolute path there (e.g. {BOARD.state}/{Path(str(value)).name})")
    if "summary" in values:  # the agent writes it: only its state folder is writable
        summary = str(raw.get("summary", values["summary"]))
        if not os.path.normpath(summary).startswith(BOARD.state + "/"):
            raise PackError(f"{where}: summary = {summary!r}: the unit lets the agent write only under "
                            f"{BOARD.state} (ProtectSystem=strict, ProtectHome, PrivateTmp); write it as "
                            f"{BOARD.state}/{Path(summary).name}")
    _board_data(cfg, values, sources, where)
    if "scheduler" in values:
        from device_runtime.scheduler import SchedulerConfigError, make_scheduler

        try:
            make_scheduler(values["scheduler"])
        except SchedulerConfigError as e:
            raise PackError(f"{where}: scheduler: {e}") from None
    if "credentials" not in sources:
        lacking = [k for k in ("broker", "id", "parent") if k not in values]
        if lacking:
            raise PackError(f"the board would not know its {', '.join(lacking)}: give them in --config, "
                            f"or --credentials FILE from `tomtit deploy init`")
    return values, sources


# Folders a file on the board cannot be read from by the unit: ProtectHome=yes hides the first
# three, PrivateTmp=yes gives the agent its own empty /tmp and /var/tmp.
_HIDDEN_FROM_UNIT = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")


def _board_data(cfg: PackConfig, values: dict, sources: dict, where: str) -> None:
    """Where the board's examples come from, decided here so that a board path is never mistaken
    for a file of this machine, nor the other way round:

    - a built-in data set name (`bbc-news`), in --config or --data: device.toml names it; nothing packed;
    - --board-data PATH: an absolute path on the board; device.toml names it; nothing packed;
    - --data FILE, or data in --config: a .jsonl or .csv file on THIS machine, packed; a path that
      does not exist here is an error pointing to --board-data (not silently a board path: a typo
      would otherwise give a pack whose board waits for a file no one will put there).
    """
    from tomtit.data import BUILTIN_DATASETS

    src = sources.get("data")
    given = "--data" if cfg.data is not None else f"data in {where}"
    if src is not None and str(src) in BUILTIN_DATASETS:  # the config loader leaves a data set's name as is
        del sources["data"]
        values["data"] = str(src)
        src = None
    if cfg.board_data is not None:
        if src is not None or "data" in values:
            raise PackError(f"--board-data and {given} both given: keep one (--board-data names a file on the "
                            f"board, {given} a file here that is packed)")
        path = os.path.normpath(str(cfg.board_data))
        if not path.startswith("/"):
            raise PackError(f"--board-data {path!r}: an absolute path on the board")
        if any(path == d or path.startswith(d + "/") for d in _HIDDEN_FROM_UNIT):
            raise PackError(f"--board-data {path}: the unit cannot read there (ProtectHome=yes hides /home, /root "
                            f"and /run/user; PrivateTmp=yes gives it its own /tmp); put the file under "
                            f"{BOARD.state} or e.g. /srv")
        values["data"] = path
        return
    if src is None:
        return
    if not src.is_file():
        raise PackError(f"{given} {src}: no such file here. {given} names a file on this machine, which is packed; "
                        f"to name a file that is already on the board, give --board-data PATH instead")
    if src.suffix.lower() not in (".jsonl", ".csv"):
        raise PackError(f"{given} {src}: a .jsonl or .csv file (or a built-in data set: "
                        f"{', '.join(BUILTIN_DATASETS)})")


def _fill(root: Path, cfg: PackConfig, values: dict, sources: dict, glibc: tuple[int, int], log) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from tomtit.cli import config_file
    from tomtit.pack import bundle as pack_bundle_mod
    from tomtit.pack import wheelhouse
    from tomtit.pack.scripts import render_install, render_uninstall
    from tomtit.pack.unit import render_backoff, render_unit

    platform = wheelhouse.PLATFORMS[cfg.platform]
    backends = pack_bundle_mod.choose_backends(cfg.platform, cfg.backend)
    extra = pack_bundle_mod.extra_for(backends)
    # 1. the bundle: the device part only
    log(f"bundle {sources['bundle']} -> bundle/ ({', '.join(backends)})")
    m = pack_bundle_mod.pack_bundle(sources["bundle"], root / "bundle", backends=backends, platform=cfg.platform)
    values["bundle"] = BOARD.bundle
    values["state_dir"] = BOARD.state_dir
    # 2. credentials (+ their CA) and TLS files, next to device.toml on the board
    if "credentials" in sources:
        _pack_credentials(sources["credentials"], root, values)
        values["credentials"] = "credentials.toml"  # relative to device.toml
    for key, name in PACKED_FILES.items():
        if key in sources:
            _copy_file(sources[key], root / name, secret=(key == "tls_key"), what=key)
            values[key] = name
    # 3. data: packed, a board path or a built-in data set (set by _board_data), or a placeholder path
    if "data" in sources:
        suffix = sources["data"].suffix.lower()
        name = f"data{suffix}"
        _copy_file(sources["data"], root / name, secret=False, what="--data")
        values["data"] = f"{BOARD.state}/{name}"
    elif "data" in values:
        log(f"data: device.toml names {values['data']} (not packed)")
    else:
        values["data"] = f"{BOARD.state}/data.jsonl"
        log(f"no --data: device.toml names {values['data']}; put the device's examples there on the board")
    # 4. device.toml
    try:
        tomtit_version = version("tomtit")
    except PackageNotFoundError:
        tomtit_version = "unknown"
    header = (f"tomtit device run --config {BOARD.config}: written by `tomtit device pack` for {cfg.platform}.\n"
              f"Keys are `tomtit device run`'s long options with _ for -; a flag on the command line overrides\n"
              f"a key. Relative paths are relative to this file's folder. Commented keys show the defaults.")
    parser = run_parser()
    text = config_file.render_config(parser, values, header=header)
    config_file.convert_values(config_file.read_toml_text(text), parser, base=None, where="device.toml")
    (root / "device.toml").write_text(text)
    # 5. the wheelhouse: tomtit, its extra for the platform's backend, pip
    wh = root / "wheelhouse"
    wh.mkdir()
    if cfg.tomtit_wheel is not None:
        own = wh / Path(cfg.tomtit_wheel).name
        shutil.copyfile(cfg.tomtit_wheel, own)
    else:
        own = wheelhouse.build_tomtit_wheel(wh, log=log)
    wheelhouse.download([f"{own}[{extra}]", "pip"], wh, platform=platform, python=cfg.python, glibc=glibc,
                        find_links=cfg.find_links, no_index=cfg.no_index, log=log)
    wheels = wheelhouse.list_wheels(wh)
    pip = wheelhouse.pip_wheel(wheels)
    if not any(w.name == "tomtit" for w in wheels):
        raise PackError("the wheelhouse has no tomtit wheel")
    (root / "requirements.txt").write_text(wheelhouse.render_lock(wheels, top=f"tomtit[{extra}]"))
    # 6. the unit and the scripts
    (root / BOARD.unit_name).write_text(render_unit(BOARD, cfg.limits))
    (root / f"{BOARD.unit_name}.d").mkdir()
    (root / f"{BOARD.unit_name}.d" / "backoff.conf").write_text(render_backoff())
    for name, text in (("install.sh", render_install(platform=cfg.platform, machine=platform.machine,
                                                     python=cfg.python, pip_wheel=pip.file,
                                                     version=tomtit_version)),
                       ("uninstall.sh", render_uninstall(BOARD))):
        (root / name).write_text(text)
        os.chmod(root / name, 0o755)
    return {
        "tomtit_version": tomtit_version,
        "tomtit_source": wheelhouse.source_revision(wheelhouse.source_root()) if cfg.tomtit_wheel is None else "",
        "platform": cfg.platform, "machine": platform.machine, "python": cfg.python,
        "glibc": f"{glibc[0]}.{glibc[1]}", "extra": extra, "backends": list(backends),
        "bundle_id": m.bundle_id, "base_model": m.base_model,
        "wheels": {w.name: w.version for w in wheels},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _copy_file(src: Path, dst: Path, *, secret: bool, what: str) -> None:
    if not Path(src).is_file():
        raise PackError(f"{what}: {src} is not a file")
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600 if secret else 0o644)


def _pack_credentials(src: Path, root: Path, values: dict) -> None:
    """credentials.toml (0600) with its CA as ca.crt beside it; the identity must be a device's and
    agree with the config's id, parent and job."""
    from tomtit.deploy.credentials import load_credentials, render_credentials
    from tomtit.deploy.errors import DeployError

    try:
        creds = load_credentials(src)
    except DeployError as e:
        raise PackError(f"--credentials: {e}") from None
    if creds.role != "device":
        raise PackError(f"--credentials {src} belong to a {creds.role}, not a device")
    for key, value in (("id", creds.id), ("parent", creds.parent), ("job", creds.job)):
        if key in values and values[key] != value:
            raise PackError(f"{key} {values[key]!r} in --config disagrees with --credentials {src} ({value!r})")
    text = render_credentials(creds, ca_file="ca.crt", hint="packed for the board by `tomtit device pack`")
    dst = root / "credentials.toml"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    _copy_file(creds.ca_file, root / "ca.crt", secret=False, what="the credentials' CA")
