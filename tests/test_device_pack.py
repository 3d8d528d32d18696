"""`tomtit device run --config` and `tomtit device pack`: a board goes into service from one
offline pack.

- config: round trip, flags over the file over defaults, unknown keys and wrong types named,
  paths relative to the file, options added to the parser later covered too (no network).
- the unit: `systemd-analyze verify` (where it exists).
- a pack for linux-x86_64 made here (the package registry is needed), verified, tampered with;
  installed with install.sh into a temporary prefix with this machine's python, trained with,
  uninstalled.
- the acceptance test: a pack for linux-aarch64 installed by its install.sh under the emulated
  aarch64 python (.ci/prepare-arm64), with no index and no network, into a fresh venv; the
  installed `tomtit device run --config` then federates with a node on this machine through a
  Mosquitto until its update is acknowledged.

Without the registry, the emulated python or Mosquitto these skip on a developer's machine and
fail in CI (CI=true).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, spawn_tomtit, wait_for
from tomtit.cli import build_parser, config_file, main

ARM64 = Path(os.environ.get("TOMTIT_ARM64_DIR", ROOT / ".ci" / "arm64"))
HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
HOST_PLATFORM = "linux-x86_64"


def _unavailable(msg: str):
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def tomtit(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def parse_run(*argv: str) -> argparse.Namespace:
    """`tomtit device run ARGV` parsed and resolved as the verb does, without running it."""
    full = ["device", "run", *argv]
    args = build_parser(full).parse_args(full)
    return config_file.resolve(args)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- device.toml ------------------------------------------------------------------------------

def test_config_round_trip_gives_the_same_arguments_as_the_flags(tmp_path):
    flags = ["--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "d.jsonl"), "--parent", "e0", "--id", "d1",
             "--broker", "mqtt://10.0.0.5:1883", "--job", "j", "--mqtt-protocol", "5", "--scheduler", "fixed:7",
             "--energy", "model:rpi4", "--threads", "3", "--lr", "0.02", "--batch", "4", "--state-dir",
             str(tmp_path / "s"), "--memory", "fast", "--max-steps", "9", "--no-serve", "--reference-step", "0.1"]
    by_flags = vars(parse_run(*flags))
    from tomtit.cli import device_cmd

    parser = config_file.verb_parser(device_cmd.register, "run")
    keys = {a.dest: k for k, a in config_file.options_by_key(parser).items()}
    values = {keys[d]: v for d, v in by_flags.items() if d in keys and v is not None}
    assert set(values) >= {"bundle", "threads", "lr", "no_serve", "mqtt_protocol", "state_dir", "reference_step"}
    cfg = write(tmp_path / "device.toml", config_file.render_config(parser, values, header="test"))
    by_file = vars(parse_run("--config", str(cfg)))
    for d in by_flags:
        if d not in ("config", "_config_spec"):
            assert by_file[d] == by_flags[d], d
    assert by_file["threads"] == 3 and by_file["lr"] == 0.02 and by_file["no_serve"] is True
    assert by_file["bundle"] == tmp_path / "b" and isinstance(by_file["bundle"], Path)


def test_a_flag_overrides_the_file_even_when_it_repeats_the_default(tmp_path):
    cfg = write(tmp_path / "device.toml", 'bundle = "b"\ndata = "d.jsonl"\nthreads = 4\nlr = 0.01\n'
                                          'energy = "model:rpi4"\n')
    args = parse_run("--config", str(cfg), "--threads", "1", "--energy", "auto")  # both are the defaults
    assert args.threads == 1 and args.energy == "auto"  # the flags win
    assert args.lr == 0.01  # the file wins over the default
    assert args.batch == 8 and args.config_timeout == 120.0 and args.no_serve is False  # defaults, unwrapped
    assert type(args.batch) is int and args.id is None


def test_unknown_key_is_an_error_naming_it(tmp_path):
    cfg = write(tmp_path / "device.toml", 'bundle = "b"\ndata = "d.jsonl"\nthread = 4\n')
    rc, _, err = tomtit("device", "run", "--config", str(cfg))
    assert rc == 2
    assert "unknown key 'thread'" in err and "did you mean 'threads'" in err and str(cfg) in err


@pytest.mark.parametrize("line, expected", [
    ('threads = "4"', "threads (--threads) must be an integer, not \"4\""),
    ("threads = 2.5", "threads (--threads) must be an integer"),
    ("threads = true", "threads (--threads) must be an integer, not true"),
    ("lr = true", "lr (--lr) must be a number"),
    ('mqtt_protocol = "4"', "mqtt_protocol (--mqtt-protocol) must be one of '3.1.1', '5'"),
    ('no_serve = "yes"', "no_serve (--no-serve) must be true or false"),
    ("id = 7", "id (--id) must be a string, not 7"),
    ("[mqtt]\nbroker = 'x'", "mqtt (--"),  # a table is no option: named as unknown
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, line, expected):
    cfg = write(tmp_path / "device.toml", f'bundle = "b"\ndata = "d.jsonl"\n{line}\n')
    rc, _, err = tomtit("device", "run", "--config", str(cfg))
    assert rc == 2
    if line.startswith("[mqtt]"):
        assert "unknown key 'mqtt'" in err
    else:
        assert expected in err, err


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path / "etc" / "device.toml",
                'bundle = "../opt/bundle"\ndata = "data.jsonl"\nstate_dir = "state"\ncredentials = "c.toml"\n'
                'tls_ca = "/abs/ca.crt"\nsummary = "~/s.json"\n')
    args = parse_run("--config", "etc/device.toml", "--id", "x")
    etc = (tmp_path / "etc").resolve()
    assert args.bundle == etc / "../opt/bundle"
    assert args.data == str(etc / "data.jsonl") and args.credentials == str(etc / "c.toml")
    assert args.state_dir == etc / "state"
    assert args.tls_ca == "/abs/ca.crt"
    assert args.summary == Path("~/s.json").expanduser()
    # a flag's relative path stays relative to the working folder, as always
    assert parse_run("--config", str(cfg), "--data", "here.jsonl").data == "here.jsonl"
    # a built-in data set is no path
    write(cfg, 'bundle = "b"\ndata = "bbc-news"\n')
    assert parse_run("--config", str(cfg)).data == "bbc-news"


def test_required_options_come_from_the_file_or_are_named(tmp_path):
    cfg = write(tmp_path / "device.toml", 'bundle = "b"\n')
    rc, _, err = tomtit("device", "run", "--config", str(cfg))
    assert rc == 2 and "give --data (or data in a --config file)" in err
    rc, _, err = tomtit("device", "run")
    assert rc == 2 and "give --bundle, --data" in err
    assert parse_run("--config", str(cfg), "--data", "x.jsonl").bundle == tmp_path / "b"


def test_options_added_after_enable_are_covered(tmp_path):
    p = argparse.ArgumentParser(prog="verb")
    config_file.enable(p)
    p.add_argument("--late", type=int, default=3)
    p.add_argument("--name", required=True)
    p.add_argument("--tags", action="append", default=[])
    cfg = write(tmp_path / "c.toml", 'late = 5\nname = "n"\ntags = ["a", "b"]\n')
    assert vars(config_file.resolve(p.parse_args(["--config", str(cfg)])))["late"] == 5
    args = config_file.resolve(p.parse_args(["--config", str(cfg), "--late", "3", "--tags", "c"]))
    assert args.late == 3 and args.name == "n" and args.tags == ["c"]
    args = config_file.resolve(p.parse_args(["--name", "m"]))
    assert args.late == 3 and args.tags == []
    write(cfg, 'tags = "a"\nname = "n"\n')
    with pytest.raises(config_file.ConfigFileError, match="tags .--tags. must be a list"):
        config_file.resolve(p.parse_args(["--config", str(cfg)]))
    with pytest.raises(Exception, match="give --name"):
        config_file.resolve(p.parse_args([]))


# -- the unit ---------------------------------------------------------------------------------

def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("no systemd-analyze here")
    return exe


def _systemd_version() -> int:
    r = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True)
    return int(r.stdout.split()[1]) if r.returncode == 0 else 0


def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = _systemd_analyze()
    from tomtit.pack.layout import BOARD
    from tomtit.pack.unit import UnitLimits, render_backoff, render_unit

    # verify checks that ExecStart's program exists: put one where a relocated install would
    fake = tmp_path / "opt" / "tomtit" / "venv" / "bin" / "tomtit"
    write(fake, "#!/bin/sh\n").chmod(0o755)
    text = render_unit(BOARD, UnitLimits(nice=5, memory_max="700M", cpu_quota="200%"))
    assert "ExecStart=/opt/tomtit/venv/bin/tomtit device run --config /etc/tomtit/device.toml" in text
    assert "Restart=on-failure" in text and "ProtectSystem=strict" in text and "StateDirectory=tomtit" in text
    assert "MemoryMax=700M" in text and "CPUQuota=200%" in text and "Nice=5" in text
    unit = write(tmp_path / "tomtit-device.service", text.replace("/opt/tomtit", str(tmp_path / "opt" / "tomtit")))
    r = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    if _systemd_version() >= 254:  # the back-off drop-in's keys are known from 254 on
        write(tmp_path / "tomtit-device.service.d" / "backoff.conf", render_backoff())
        r = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    with pytest.raises(ValueError, match="memory max"):
        render_unit(BOARD, UnitLimits(memory_max="lots"))


def test_unit_takes_away_what_the_agent_does_not_need():
    """The sandbox beyond ProtectSystem: each key read back from the rendered unit (the agent
    needs IPv4/IPv6 for MQTT, Unix sockets, /sys readable, its state folder writable)."""
    from tomtit.pack.layout import BOARD
    from tomtit.pack.unit import render_unit

    lines = render_unit(BOARD).splitlines()
    keys: dict[str, list[str]] = {}
    for line in lines:
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    assert set(keys["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert keys["CapabilityBoundingSet"] == [""]  # empty: no capability at all
    assert keys["UMask"] == ["0077"] and keys["SystemCallArchitectures"] == ["native"]
    for key in ("ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictNamespaces", "LockPersonality",
                "ProtectKernelTunables", "NoNewPrivileges"):
        assert keys[key] == ["yes"], key
    # ProtectClock's implied device allow-list must not close the Pi 5 meter's mailbox
    assert "/dev/vcio rw" in keys["DeviceAllow"]
    assert keys["ReadWritePaths"] == [BOARD.state] and keys["ProtectSystem"] == ["strict"]


# -- packs ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """The package registry answers (pip download needs it to make a pack)."""
    d = tmp_path_factory.mktemp("registry-probe")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(d), "paho-mqtt==2.2.0"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        _unavailable(f"the package registry does not answer (pip download: {r.stderr.strip()[-300:]})")


class WheelCache:
    """Wheels downloaded once per platform in a session; later packs take them with --no-index."""

    def __init__(self, root: Path):
        self.root = root

    def pack(self, platform: str, out: Path, *args: str) -> Path:
        cache = self.root / platform
        extra = []
        if cache.is_dir():
            own = next(cache.glob("tomtit-*.whl"))
            extra = ["--find-links", str(cache), "--no-index", "--tomtit-wheel", str(own)]
        rc, stdout, err = tomtit("device", "pack", "--platform", platform, "--out", str(out), *args, *extra)
        assert rc == 0, err
        # the sha256 to send to the board's installer by another channel, and the check of a copy with it
        sha = _sha256(out / "pack.json")
        assert f"pack.json sha256 {sha}\n" in stdout and f"--verify {out} --expect {sha}" in stdout, stdout
        if not cache.is_dir():
            shutil.copytree(out / "wheelhouse", cache)
        return out


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory, registry) -> WheelCache:
    return WheelCache(tmp_path_factory.mktemp("wheel-cache"))


@pytest.fixture(scope="session")
def credentials(tmp_path_factory) -> Path:
    dep = tmp_path_factory.mktemp("deployment") / "dep"
    rc, _, err = tomtit("deploy", "init", "--out", str(dep), "--devices", "1", "--edges", "1",
                        "--host", "127.0.0.1", "--port", "8883", "--job", "packjob")
    assert rc == 0, err
    return dep / "credentials" / "d00.toml"


@pytest.fixture(scope="session")
def x86_pack(tmp_path_factory, wheel_cache, tiny_bundle, tiny_data, credentials) -> Path:
    work = tmp_path_factory.mktemp("x86-pack")
    cfg = write(work / "device.toml", 'scheduler = "fixed:5"\nthreads = 2\nenergy = "model:rpi4"\nlr = 0.01\n'
                                      'summary = "/var/lib/tomtit/summary.json"\n')
    return wheel_cache.pack(HOST_PLATFORM, work / "pack", "--python", HOST_PY, "--bundle", str(tiny_bundle),
                            "--config", str(cfg), "--credentials", str(credentials), "--data", str(tiny_data),
                            "--memory-max", "700M")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_x86_pack_holds_what_a_board_needs_and_verifies(x86_pack, tiny_bundle):
    from device_runtime.bundle import open_bundle
    from device_runtime.trainer import open_training_bundle
    from tomtit.deploy._toml import tomllib

    rc, out, err = tomtit("device", "pack", "--verify", str(x86_pack))
    assert rc == 0 and "OK" in out, err
    manifest = json.loads((x86_pack / "pack.json").read_text())
    assert manifest["platform"] == HOST_PLATFORM and manifest["python"] == HOST_PY
    assert manifest["backends"] == ["portable"] and manifest["extra"] == "device"
    # every file as listed, computed here independently
    on_disk = sorted(p.relative_to(x86_pack).as_posix() for p in x86_pack.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "pack.json"]) == on_disk
    for rel, e in manifest["files"].items():
        assert e["sha256"] == _sha256(x86_pack / rel) and e["bytes"] == (x86_pack / rel).stat().st_size
    # the wheelhouse: tomtit, the stock onnxruntime (never the training build), pip; the lock pins each
    wheels = {p.name for p in (x86_pack / "wheelhouse").iterdir()}
    assert any(w.startswith("tomtit-") for w in wheels) and any(w.startswith("pip-") for w in wheels)
    assert any(w.startswith("onnxruntime-1.23.2-") for w in wheels)
    assert not any(w.startswith("onnxruntime_training") for w in wheels)
    lock = (x86_pack / "requirements.txt").read_text()
    for w in wheels:
        assert f"--hash=sha256:{_sha256(x86_pack / 'wheelhouse' / w)}" in lock, w
    assert "tomtit[device]==" in lock
    # the bundle: the portable step, inference, tokenizer, initial adapter; no ORT training files
    b = x86_pack / "bundle"
    assert sorted(p.name for p in b.iterdir()) == ["adapter_init.safetensors", "inference.onnx", "manifest.json",
                                                   "tokenizer.json", "train_step.onnx"]
    opened = open_bundle(b)  # every remaining file's hash checked
    assert opened.bundle_id == open_bundle(tiny_bundle).bundle_id
    assert open_training_bundle(b, "auto")[1] == "portable"
    # device.toml: the board's paths, the credentials beside it, and what the user gave
    cfg = tomllib.loads((x86_pack / "device.toml").read_text())
    assert cfg["bundle"] == "/opt/tomtit/bundle" and cfg["state_dir"] == "/var/lib/tomtit/state"
    assert cfg["data"] == "/var/lib/tomtit/data.jsonl" and cfg["credentials"] == "credentials.toml"
    assert cfg["scheduler"] == "fixed:5" and cfg["threads"] == 2
    assert stat.S_IMODE((x86_pack / "credentials.toml").stat().st_mode) == 0o600
    assert "ca_file = \"ca.crt\"" in (x86_pack / "credentials.toml").read_text()
    assert (x86_pack / "ca.crt").is_file()
    assert "MemoryMax=700M" in (x86_pack / "tomtit-device.service").read_text()


def test_verify_names_the_first_damaged_missing_or_extra_file(x86_pack, tmp_path):
    bad = tmp_path / "pack"
    shutil.copytree(x86_pack, bad)
    wheel = next((bad / "wheelhouse").glob("numpy-*.whl"))
    with wheel.open("r+b") as fh:  # one byte flipped, same size
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    rc, _, err = tomtit("device", "pack", "--verify", str(bad))
    assert rc == 2 and f"wheelhouse/{wheel.name}: damaged: sha256" in err
    shutil.copyfile(x86_pack / "wheelhouse" / wheel.name, wheel)
    (bad / "bundle" / "train_step.onnx").unlink()
    rc, _, err = tomtit("device", "pack", "--verify", str(bad))
    assert rc == 2 and "bundle/train_step.onnx: missing" in err
    shutil.copyfile(x86_pack / "bundle" / "train_step.onnx", bad / "bundle" / "train_step.onnx")
    write(bad / "wheelhouse" / "evil-1.0-py3-none-any.whl", "x")
    rc, _, err = tomtit("device", "pack", "--verify", str(bad))
    assert rc == 2 and "wheelhouse/evil-1.0-py3-none-any.whl: not part of the pack" in err
    (bad / "wheelhouse" / "evil-1.0-py3-none-any.whl").unlink()
    # and as one archive
    from tomtit.pack.manifest import write_archive

    write_archive(bad, tmp_path / "board.tar.gz")
    rc, out, err = tomtit("device", "pack", "--verify", str(tmp_path / "board.tar.gz"))
    assert rc == 0 and "OK" in out, err


def test_pack_refuses_what_a_board_cannot_use(tmp_path, tiny_bundle):
    """Checked before anything is downloaded: no registry needed."""
    cfg = write(tmp_path / "device.toml", 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\n')
    common = ["device", "pack", "--bundle", str(tiny_bundle), "--config", str(cfg), "--out", str(tmp_path / "p")]
    rc, _, err = tomtit(*common, "--platform", "linux-aarch64", "--backend", "ort-training")
    assert rc == 2 and "linux-aarch64 boards run only portable" in err
    write(cfg, 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\nstate_dir = "/x"\n')
    rc, _, err = tomtit(*common, "--platform", "linux-x86_64")
    assert rc == 2 and "state_dir is the board's" in err
    write(cfg, 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\nsumary = "/x"\n')
    rc, _, err = tomtit(*common, "--platform", "linux-x86_64")
    assert rc == 2 and "unknown key 'sumary'" in err
    write(cfg, 'broker = "mqtt://h:1"\nid = "d"\n')
    rc, _, err = tomtit(*common, "--platform", "linux-x86_64")
    assert rc == 2 and "would not know its parent" in err
    write(cfg, 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\nsummary = "s.json"\n')
    rc, _, err = tomtit(*common, "--platform", "linux-x86_64")
    assert rc == 2 and "summary" in err and "absolute path" in err
    write(cfg, 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\nscheduler = "sometimes"\n')
    rc, _, err = tomtit(*common, "--platform", "linux-x86_64")
    assert rc == 2 and "scheduler" in err
    assert not (tmp_path / "p").exists()


def test_pack_refuses_a_password_in_the_config(tmp_path, tiny_bundle):
    """device.toml is world-readable in the pack: a password goes in --credentials (0600) only."""
    cfg = write(tmp_path / "device.toml", 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\nusername = "d"\n'
                                          'password = "hunter2"\n')
    rc, _, err = tomtit("device", "pack", "--bundle", str(tiny_bundle), "--config", str(cfg), "--platform",
                        "linux-x86_64", "--out", str(tmp_path / "p"))
    assert rc == 2 and "password" in err and "--credentials" in err, err
    assert not (tmp_path / "p").exists()


def test_pack_archive_is_readable_by_its_owner_only(tmp_path):
    """--tar: the archive holds credentials.toml; created 0600 whatever the umask."""
    from tomtit.pack.manifest import write_archive

    folder = tmp_path / "d00"
    write(folder / "credentials.toml", "password = 'x'\n").chmod(0o600)
    old = os.umask(0o022)
    try:
        write_archive(folder, tmp_path / "d00.tar.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d00.tar.gz").stat().st_mode) == 0o600


def _small_pack(root: Path) -> Path:
    """A pack folder with two files and its manifests, as the builder writes them."""
    from tomtit.pack.manifest import write_pack_manifest

    write(root / "device.toml", 'threads = 2\n')
    write(root / "bundle" / "manifest.json", "{}\n")
    write_pack_manifest(root, {"platform": "linux-x86_64"})
    return root


def test_verify_refuses_a_hostile_manifest_and_checks_the_expected_sha256(tmp_path):
    pack = _small_pack(tmp_path / "pack")
    good = (pack / "pack.json").read_text()
    sha = _sha256(pack / "pack.json")
    rc, out, err = tomtit("device", "pack", "--verify", str(pack), "--expect", sha.upper())
    assert rc == 0 and f"pack.json sha256 {sha}: as expected" in out, err
    rc, out, _ = tomtit("device", "pack", "--verify", str(pack))
    assert rc == 0 and f"pack.json sha256 {sha}" in out
    rc, _, err = tomtit("device", "pack", "--verify", str(pack), "--expect", "0" * 64)
    assert rc == 2 and f"sha256 {sha}, not the expected {'0' * 64}" in err
    rc, _, err = tomtit("device", "pack", "--verify", str(pack), "--expect", "abc")
    assert rc == 2 and "64 hex digits" in err

    def with_files(**changes) -> None:
        m = json.loads(good)
        m["files"].update(changes)
        (pack / "pack.json").write_text(json.dumps(m))

    with_files(**{"device.toml": "not an entry"})  # was: AttributeError ('str' has no 'get')
    rc, _, err = tomtit("device", "pack", "--verify", str(pack))
    assert rc == 2 and "files['device.toml'] is not" in err
    # entries that lead out of the pack: refused even when their size and hash are right
    outside = write(tmp_path / "secret.txt", "outside the pack\n")
    entry = {"bytes": outside.stat().st_size, "sha256": _sha256(outside)}
    for name in ("../secret.txt", str(outside), "bundle/../../secret.txt", "./device.toml"):
        with_files(**{name: entry})
        rc, _, err = tomtit("device", "pack", "--verify", str(pack))
        assert rc == 2 and "not a relative path inside the pack" in err, (name, err)
    (pack / "pack.json").write_text(good)
    # a listed file that is a symbolic link out of the pack
    (pack / "device.toml").unlink()
    (pack / "device.toml").symlink_to(outside)
    m = json.loads(good)
    m["files"]["device.toml"] = entry
    (pack / "pack.json").write_text(json.dumps(m))
    rc, _, err = tomtit("device", "pack", "--verify", str(pack))
    assert rc == 2 and "device.toml: a symbolic link" in err


def test_force_replaces_only_an_empty_folder_or_a_previous_pack(tmp_path, tiny_bundle):
    from tomtit.pack import PackError
    from tomtit.pack.builder import check_replaceable
    from tomtit.pack.manifest import write_archive

    cfg = write(tmp_path / "device.toml", 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\n')
    precious = write(tmp_path / "home" / "thesis.tex", "years of work\n")
    rc, _, err = tomtit("device", "pack", "--bundle", str(tiny_bundle), "--config", str(cfg), "--platform",
                        "linux-x86_64", "--out", str(precious.parent), "--force")
    assert rc == 2 and "not a pack (no pack.json)" in err and "--force replaces only" in err, err
    assert precious.read_text() == "years of work\n"
    notes = write(tmp_path / "notes.tar.gz", "not an archive")
    rc, _, err = tomtit("device", "pack", "--bundle", str(tiny_bundle), "--config", str(cfg), "--platform",
                        "linux-x86_64", "--out", str(notes), "--tar", "--force")
    assert rc == 2 and "not a pack archive" in err and notes.read_text() == "not an archive"
    # what --force does replace: an empty folder, a pack folder, a pack archive
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", archive=False)
    pack = _small_pack(tmp_path / "d00")
    check_replaceable(pack, archive=False)
    write_archive(pack, tmp_path / "d00.tar.gz")
    check_replaceable(tmp_path / "d00.tar.gz", archive=True)
    with pytest.raises(PackError, match="is a folder, not a pack archive"):
        check_replaceable(pack, archive=True)


def test_board_paths_in_the_pack_config(tmp_path, tiny_bundle, tiny_data):
    """A data path on this machine is packed; a board path is named with --board-data (never
    packed); a built-in data set stays a name; summary only where the unit lets the agent write."""
    from tomtit.pack import PackError
    from tomtit.pack.builder import PackConfig, _device_config

    base = 'broker = "mqtt://h:1"\nid = "d"\nparent = "e"\n'
    cfg = write(tmp_path / "device.toml", base + 'data = "/srv/sensor/x.jsonl"\n')
    common = ["device", "pack", "--bundle", str(tiny_bundle), "--platform", "linux-x86_64", "--out",
              str(tmp_path / "p")]
    rc, _, err = tomtit(*common, "--config", str(cfg))
    assert rc == 2 and "/srv/sensor/x.jsonl: no such file here" in err and "--board-data PATH" in err, err

    def decide(text: str, **kw) -> tuple[dict, dict]:
        write(cfg, base + text)
        return _device_config(PackConfig(platform="linux-x86_64", out=tmp_path / "p", bundle=tiny_bundle,
                                         config=cfg, **kw))

    values, sources = decide("", board_data="/srv/sensor/x.jsonl")
    assert values["data"] == "/srv/sensor/x.jsonl" and "data" not in sources
    values, sources = decide('data = "bbc-news"\n')
    assert values["data"] == "bbc-news" and "data" not in sources
    values, sources = decide("", data=Path("bbc-news"))
    assert values["data"] == "bbc-news" and "data" not in sources
    values, sources = decide(f'data = "{tiny_data}"\n')
    assert sources["data"] == tiny_data and "data" not in values  # a file here: packed
    for kw, match in ((dict(board_data="/home/pi/x.jsonl"), "cannot read there"),
                      (dict(board_data="/tmp/x.jsonl"), "cannot read there"),
                      (dict(board_data="x.jsonl"), "an absolute path on the board"),
                      (dict(board_data="/srv/x.jsonl", data=tiny_data), "--board-data and --data both given")):
        with pytest.raises(PackError, match=match):
            decide("", **kw)
    with pytest.raises(PackError, match="write only under /var/lib/tomtit"):
        decide('summary = "/srv/summary.json"\n')
    with pytest.raises(PackError, match="write only under /var/lib/tomtit"):
        decide('summary = "/var/lib/tomtit/../../etc/summary.json"\n')
    assert decide('summary = "/var/lib/tomtit/s.json"\n')[0]["summary"] == Path("/var/lib/tomtit/s.json")


def _render_scripts(folder: Path) -> Path:
    """install.sh and uninstall.sh alone in a folder (no pack: anything past the argument checks fails)."""
    from tomtit.pack.scripts import render_install, render_uninstall

    write(folder / "install.sh", render_install(platform=HOST_PLATFORM, machine="x86_64", python=HOST_PY,
                                                pip_wheel="pip-0-py3-none-any.whl", version="0"))
    write(folder / "uninstall.sh", render_uninstall())
    return folder


def _not_root_env(tmp_path: Path) -> dict:
    """PATH with an `id` that says uid 1000: should a prefix check fail, the scripts stop at their
    root check instead of touching this machine's /opt, /etc and /var/lib."""
    bin_ = tmp_path / "fakebin"
    write(bin_ / "id", "#!/bin/sh\necho 1000\n").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}


@pytest.mark.parametrize("prefix, message", [
    ("", "--prefix is empty"), ("/", "--prefix names /"), ("//", "--prefix names /"),
    ("/tmp/..", "must not contain . or .. components"), ("relative/dir", "must be an absolute path"),
])
def test_scripts_refuse_an_empty_or_root_prefix(tmp_path, prefix, message):
    scripts = _render_scripts(tmp_path / "pack")
    env = _not_root_env(tmp_path)
    for script, extra in (("install.sh", ["--python", sys.executable]), ("uninstall.sh", ["--purge"])):
        for argv in (["--prefix", prefix], [f"--prefix={prefix}"]):
            r = subprocess.run(["sh", str(scripts / script), *argv, *extra], capture_output=True, text=True,
                               env=env, timeout=60)
            assert r.returncode != 0 and message in r.stderr, (script, argv, r.stderr)
    # a symbolic link to / is / too
    (tmp_path / "root-link").symlink_to("/")
    r = subprocess.run(["sh", str(scripts / "uninstall.sh"), "--prefix", str(tmp_path / "root-link"), "--purge"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "--prefix names /" in r.stderr


def test_uninstall_keeps_an_admins_drop_ins(tmp_path):
    scripts = _render_scripts(tmp_path / "pack")
    prefix = tmp_path / "board"
    units = prefix / "etc/systemd/system"
    write(units / "tomtit-device.service", "[Service]\n")
    write(units / "tomtit-device.service.d" / "backoff.conf", "[Service]\n")
    write(units / "tomtit-device.service.d" / "override.conf", "[Service]\nMemoryMax=900M\n")  # systemctl edit
    r = subprocess.run(["sh", str(scripts / "uninstall.sh"), "--prefix", str(prefix)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (units / "tomtit-device.service").exists()
    assert sorted(p.name for p in (units / "tomtit-device.service.d").iterdir()) == ["override.conf"]
    (units / "tomtit-device.service.d" / "override.conf").unlink()
    write(units / "tomtit-device.service.d" / "backoff.conf", "[Service]\n")
    r = subprocess.run(["sh", str(scripts / "uninstall.sh"), "--prefix", str(prefix)], capture_output=True, text=True)
    assert r.returncode == 0 and not (units / "tomtit-device.service.d").exists(), r.stderr


def _run_install(pack: Path, prefix: Path, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(["sh", str(pack / "install.sh"), "--prefix", str(prefix), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_install_sh_installs_an_x86_pack_here_and_uninstall_sh_removes_it(x86_pack, tmp_path):
    prefix = tmp_path / "board"
    t0 = time.monotonic()
    sha = _sha256(x86_pack / "pack.json")  # the value `tomtit device pack` printed
    r = _run_install(x86_pack, prefix, "--python", sys.executable, "--no-compile", "--expect", sha)
    assert r.returncode == 0, r.stdout + r.stderr
    install_s = time.monotonic() - t0
    assert f"pack.json sha256 {sha}" in r.stdout  # shown for the operator to compare
    venv, etc, state = prefix / "opt/tomtit/venv", prefix / "etc/tomtit", prefix / "var/lib/tomtit"
    assert stat.S_IMODE((etc / "credentials.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "device.toml").stat().st_mode) == 0o600
    assert (etc / "ca.crt").is_file() and (state / "data.jsonl").is_file()
    cfg = (etc / "device.toml").read_text()
    assert f'bundle = "{prefix}/opt/tomtit/bundle"' in cfg and f'state_dir = "{prefix}/var/lib/tomtit/state"' in cfg
    assert f'summary = "{prefix}/var/lib/tomtit/summary.json"' in cfg and 'credentials = "credentials.toml"' in cfg
    unit = (prefix / "etc/systemd/system/tomtit-device.service").read_text()
    assert f"ExecStart={venv}/bin/tomtit device run --config {etc}/device.toml" in unit
    # the installed tomtit: no torch, only the pack's wheels; it trains from the installed files
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"], "PIP_CONFIG_FILE": os.devnull})
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(r.stdout)}
    assert {"tomtit", "onnxruntime", "numpy", "paho-mqtt", "cryptography", "pip"} <= installed
    assert "torch" not in installed and "onnxruntime-training-cpu" not in installed
    r = subprocess.run([str(venv / "bin" / "tomtit"), "train", "--bundle", str(prefix / "opt/tomtit/bundle"),
                        "--data", str(state / "data.jsonl"), "--steps", "2", "--json"], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["backend"] == "portable"
    # the config the unit starts with parses in the installed tomtit
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import sys; from tomtit.pack.builder import check_installed_config as c; c(sys.argv[1])",
                        str(etc / "device.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                            str(prefix / "etc/systemd/system/tomtit-device.service")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    # uninstall keeps config and state, --purge removes them
    (state / "state").mkdir()
    r = subprocess.run(["sh", str(prefix / "opt/tomtit/uninstall.sh"), "--prefix", str(prefix)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert not (prefix / "opt/tomtit").exists() and not (prefix / "etc/systemd/system/tomtit-device.service").exists()
    assert (etc / "device.toml").is_file() and (state / "state").is_dir() and "--purge" in r.stdout
    r = _run_install(x86_pack, prefix, "--python", sys.executable, "--no-compile")  # again, over the kept state
    assert r.returncode == 0 and not (etc / "device.toml.old").exists(), r.stderr
    r = subprocess.run(["sh", str(x86_pack / "uninstall.sh"), "--prefix", str(prefix), "--purge"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not etc.exists() and not state.exists(), r.stderr
    print(f"install.sh (x86_64, here): {install_s:.1f} s")


def test_install_sh_refuses_a_damaged_pack_or_the_wrong_python(x86_pack, tmp_path):
    bad = tmp_path / "pack"
    shutil.copytree(x86_pack, bad)
    with (bad / "bundle" / "tokenizer.json").open("a") as fh:
        fh.write(" ")
    r = _run_install(bad, tmp_path / "board", "--python", sys.executable)
    assert r.returncode != 0 and "bundle/tokenizer.json" in r.stderr and "damaged" in r.stderr
    assert not (tmp_path / "board" / "opt").exists()
    other = "3.10" if HOST_PY != "3.10" else "3.12"
    text = (x86_pack / "install.sh").read_text().replace(f"PACK_PYTHON='{HOST_PY}'", f"PACK_PYTHON='{other}'")
    write(bad / "install.sh", text)
    r = _run_install(bad, tmp_path / "board", "--python", sys.executable)
    assert r.returncode != 0 and f"for Python {other}" in r.stderr
    # the pack.json whose sha256 the operator was given, or none
    r = _run_install(x86_pack, tmp_path / "board", "--python", sys.executable, "--expect", "ab" * 32)
    assert r.returncode != 0 and "not the pack that was built" in r.stderr
    assert not (tmp_path / "board" / "opt").exists()
    sums = (x86_pack / "SHA256SUMS").read_text()
    shutil.rmtree(bad)
    shutil.copytree(x86_pack, bad)
    (bad / "wheelhouse" / "evil-1.0-py3-none-any.whl").write_text("x")  # listed in SHA256SUMS only
    write(bad / "SHA256SUMS", sums + f"{_sha256(bad / 'wheelhouse' / 'evil-1.0-py3-none-any.whl')}  "
                                     f"wheelhouse/evil-1.0-py3-none-any.whl\n")
    r = _run_install(bad, tmp_path / "board", "--python", sys.executable)
    assert r.returncode != 0 and "pack.json and SHA256SUMS disagree" in r.stderr


def _repacked(pack: Path, to: Path, change) -> Path:
    """A copy of `pack` changed by `change(folder)`, its SHA256SUMS and pack.json written again (as
    a newer build would be)."""
    from tomtit.pack.manifest import write_pack_manifest

    shutil.copytree(pack, to)
    change(to)
    facts = {k: v for k, v in json.loads((to / "pack.json").read_text()).items() if k not in ("format", "files")}
    (to / "pack.json").unlink()
    (to / "SHA256SUMS").unlink()
    write_pack_manifest(to, facts)
    return to


def test_reinstall_keeps_the_board_running_until_the_new_venv_works(x86_pack, tmp_path):
    """An upgrade whose pip install fails leaves the installed venv, bundle and config in use and
    no half-made venv; one that succeeds keeps changed credentials and data as *.old."""
    prefix = tmp_path / "board"
    opt, etc, state = prefix / "opt/tomtit", prefix / "etc/tomtit", prefix / "var/lib/tomtit"
    r = _run_install(x86_pack, prefix, "--python", sys.executable, "--no-compile")
    assert r.returncode == 0, r.stdout + r.stderr
    in_use = os.readlink(opt / "venv")
    before = sorted(p.name for p in opt.iterdir())

    def wrong_hash(folder: Path) -> None:  # pip --require-hashes refuses numpy: the new venv fails
        lock = (folder / "requirements.txt").read_text()
        numpy = next((folder / "wheelhouse").glob("numpy-*.whl"))
        write(folder / "requirements.txt", lock.replace(_sha256(numpy), "0" * 64))

    broken = _repacked(x86_pack, tmp_path / "broken", wrong_hash)
    r = _run_install(broken, prefix, "--python", sys.executable, "--no-compile")
    assert r.returncode != 0 and "pip install from the wheelhouse failed" in r.stderr
    assert os.readlink(opt / "venv") == in_use and sorted(p.name for p in opt.iterdir()) == before
    assert not (etc / ".device.toml.new").exists()
    r = subprocess.run([str(opt / "venv" / "bin" / "tomtit"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "device" in r.stdout, r.stderr  # the board's tomtit still runs

    def new_data_and_credentials(folder: Path) -> None:
        with (folder / "data.jsonl").open("a") as fh:
            fh.write('{"text": "one more", "label": "a"}\n')
        with (folder / "credentials.toml").open("a") as fh:
            fh.write("# rotated\n")

    newer = _repacked(x86_pack, tmp_path / "newer", new_data_and_credentials)
    r = _run_install(newer, prefix, "--python", sys.executable, "--no-compile")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (state / "data.jsonl.old").read_bytes() == (x86_pack / "data.jsonl").read_bytes()
    assert (state / "data.jsonl").read_bytes() == (newer / "data.jsonl").read_bytes()
    assert (etc / "credentials.toml.old").read_bytes() == (x86_pack / "credentials.toml").read_bytes()
    assert stat.S_IMODE((etc / "credentials.toml.old").stat().st_mode) == 0o600
    assert not (etc / "device.toml.old").exists()  # unchanged: no copy
    assert os.readlink(opt / "venv") != in_use and not (opt / in_use).exists()  # the old venv, gone after the switch
    assert [p.name for p in opt.glob("venv-*")] == [os.readlink(opt / "venv")]


# -- the acceptance test: an aarch64 board, emulated ------------------------------------------

@pytest.fixture(scope="module")
def arm64_python() -> Path:
    py = ARM64 / "root" / "usr" / "bin" / "python3.11"
    if not (py.is_file() and shutil.which("qemu-aarch64-static")):
        _unavailable(f"no emulated aarch64 python at {ARM64}: run .ci/prepare-arm64")
    r = subprocess.run(["qemu-aarch64-static", str(py), "-c", "import venv, platform; print(platform.machine())"],
                       capture_output=True, text=True, timeout=120, env=_qemu_env())
    if r.returncode != 0 or r.stdout.strip() != "aarch64":
        _unavailable(f"the emulated python has no venv module or does not run: {r.stderr[-500:]}")
    return py


def _qemu_env(**extra: str) -> dict:
    return {"QEMU_LD_PREFIX": str(ARM64 / "root"), "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8", **extra}


@pytest.mark.mosquitto
def test_aarch64_pack_installs_offline_under_emulation_and_federates(arm64_python, wheel_cache, mosquitto,
                                                                     tiny_bundle, tiny_data, tmp_path):
    job = "armpack"
    cfg = write(tmp_path / "device.toml", f'broker = "{mosquitto.url}"\nid = "arm0"\nparent = "cloud"\n'
                                          f'job = "{job}"\nenergy = "model:rpi4"\nlr = 0.01\nresend_after = 5.0\n')
    t0 = time.monotonic()
    pack = wheel_cache.pack("linux-aarch64", tmp_path / "pack", "--python", "3.11", "--bundle", str(tiny_bundle),
                            "--config", str(cfg), "--data", str(tiny_data))
    pack_s = time.monotonic() - t0
    assert json.loads((pack / "pack.json").read_text())["platform"] == "linux-aarch64"
    assert any("aarch64" in p.name for p in (pack / "wheelhouse").glob("onnxruntime-*.whl"))
    # install.sh under emulation: no index, and no network at all (a dead proxy catches any attempt)
    prefix = tmp_path / "board"
    dead = "http://127.0.0.1:9"
    env = _qemu_env(TOMTIT_PYTHON_LAUNCHER="qemu-aarch64-static", http_proxy=dead, https_proxy=dead,
                    HTTP_PROXY=dead, HTTPS_PROXY=dead)
    t0 = time.monotonic()
    # --no-compile: byte-compiling every wheel under qemu costs a minute more and tests nothing of ours
    r = _run_install(pack, prefix, "--python", str(arm64_python), "--no-compile", env=env, timeout=900)
    install_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    venv = prefix / "opt" / "tomtit" / "venv"
    assert (venv / "bin" / "tomtit").is_file()
    ort = next((venv / "lib" / "python3.11" / "site-packages").glob("onnxruntime-1.23.2.dist-info"))
    assert "aarch64" in (ort / "WHEEL").read_text()
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                            str(prefix / "etc/systemd/system/tomtit-device.service")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    # a node here, the installed device there (emulated), over a real Mosquitto
    logs = {"cloud": tmp_path / "cloud.log", "arm0": tmp_path / "arm0.log"}
    node = spawn_tomtit(["node", "run", "--id", "cloud", "--bundle", str(tiny_bundle), "--broker", mosquitto.url,
                         "--job", job, "--k", "1", "--device-scheduler", "fixed:5", "--max-minutes", "8",
                         "--state-dir", str(tmp_path / "s-cloud")], logs["cloud"])
    summary = tmp_path / "arm0.json"
    t0 = time.monotonic()
    with logs["arm0"].open("ab") as fh:
        # the console script the unit starts, run by the venv's (emulated) python
        device = subprocess.Popen(["qemu-aarch64-static", str(venv / "bin" / "python"), str(venv / "bin" / "tomtit"),
                                   "device", "run", "--config", str(prefix / "etc/tomtit/device.toml"),
                                   "--summary", str(summary)],
                                  stdout=fh, stderr=subprocess.STDOUT, cwd=str(tmp_path), env=_qemu_env())
    try:
        wait_for(lambda: logs["cloud"].read_text().count("aggregated") >= 2, 420,
                 "the node to apply the emulated device's updates", logs)
        device.send_signal(signal.SIGTERM)
        assert device.wait(120) == 0, logs["arm0"].read_text()[-2000:]
    finally:
        for p in (device, node):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    run_s = time.monotonic() - t0
    s = json.loads(summary.read_text())
    assert s["acked"] >= 1 and s["syncs"] >= 1, s
    text = logs["arm0"].read_text()
    assert "portable backend" in text
    print(f"aarch64: pack {pack_s:.1f} s, install.sh under qemu {install_s:.1f} s, federation {run_s:.1f} s; "
          f"acked {s['acked']}")


def test_install_sh_systemd_branch_in_a_private_mount_namespace(x86_pack, tmp_path):
    """install.sh as root on a board with systemd, without touching this machine: a private mount
    namespace puts copies of /etc, /opt and /var/lib in place, /run/systemd/system makes systemd
    look present, and a stand-in systemctl records what it is asked. The system user, the file
    owners and modes, the unit and its drop-in, and the systemctl calls are checked."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("useradd"):
        pytest.skip("needs root, unshare and useradd")
    exe = Path(sys.executable).resolve()
    if any(str(exe).startswith(p) for p in ("/etc/", "/opt/", "/var/lib/", "/run/")):
        pytest.skip(f"this python ({exe}) would be hidden by the namespace's mounts")
    box = tmp_path / "box"
    for d in ("etc", "opt", "varlib", "bin"):
        (box / d).mkdir(parents=True)
    subprocess.run(["cp", "-a", "/etc/.", str(box / "etc")], check=True)
    log = box / "systemctl.log"
    write(box / "bin" / "systemctl", f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in --version) echo "systemd 256 (256.1)";; is-active) exit 3;; esac
""").chmod(0o755)
    script = f"""set -e
mount --bind {box}/etc /etc; mount --bind {box}/opt /opt; mount --bind {box}/varlib /var/lib
mount -t tmpfs none /run; mkdir -p /run/systemd/system
export PATH={box}/bin:$PATH
getent group video >/dev/null || groupadd --system video
sh {x86_pack}/install.sh --python {exe} --no-compile
stat -c '%n %U %G %a' /etc/tomtit/device.toml /etc/tomtit/credentials.toml /etc/tomtit/ca.crt /var/lib/tomtit \\
    /var/lib/tomtit/data.jsonl /opt/tomtit/venv/bin/tomtit
id tomtit
test -e /dev/vcio || ! id -nG tomtit | grep -qw video  # video only for the Pi's /dev/vcio
test -f /etc/systemd/system/tomtit-device.service.d/backoff.conf
sh /opt/tomtit/uninstall.sh --purge
if id tomtit 2>/dev/null; then exit 9; fi
"""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "unshare failed" in r.stderr:
        pytest.skip(f"no mount namespaces here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    owners = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith("/")}
    assert owners["/etc/tomtit/device.toml"] == ["root", "tomtit", "640"]
    assert owners["/etc/tomtit/credentials.toml"] == ["tomtit", "tomtit", "600"]
    assert owners["/etc/tomtit/ca.crt"][2] == "644"
    assert owners["/var/lib/tomtit"] == ["tomtit", "tomtit", "750"]
    assert owners["/var/lib/tomtit/data.jsonl"][:2] == ["tomtit", "tomtit"]
    assert owners["/opt/tomtit/venv/bin/tomtit"][0] == "root"
    assert "started tomtit-device.service" in r.stdout and "purged" in r.stdout
    calls = log.read_text().splitlines()
    assert calls[calls.index("daemon-reload") + 1:][:2] == ["enable tomtit-device.service",
                                                            "restart tomtit-device.service"]
    assert "disable --now tomtit-device.service" in calls
    assert subprocess.run(["id", "tomtit"], capture_output=True).returncode != 0  # this machine untouched
