"""install.sh and uninstall.sh of a pack: POSIX sh, `set -eu`, nothing but the pack and the
board's python3 (with its venv module; ensurepip is not needed: pip comes from the wheelhouse).

TOMTIT_PYTHON_LAUNCHER (e.g. `qemu-aarch64-static`) is put before every python the scripts run:
it lets an emulator install an aarch64 pack on another machine (tests/test_device_pack.py).
"""
from __future__ import annotations

from tomtit.pack.layout import BOARD, BoardLayout

INSTALL_SH = r"""#!/bin/sh
# install.sh: put this board into service from this pack, with no network (`tomtit device pack`).
#
#   sudo sh install.sh [--python PYTHON] [--expect SHA256] [--no-start] [--no-compile]
#   sh install.sh --prefix DIR [--python PYTHON] [--no-compile]       (no root, no systemd: tests, images)
#
# Checks every file against SHA256SUMS and SHA256SUMS against pack.json, prints pack.json's
# sha256 (compare it with the one `tomtit device pack` printed; --expect checks it), then: a venv
# from wheelhouse/ only (pip --no-index --require-hashes, pip from its wheel) at @@OPT@@/venv,
# the bundle in @@OPT@@/bundle, device.toml (and credentials.toml, 0600) in @@ETC@@, the state
# folder @@STATE@@ (and data.jsonl when packed); where systemd runs, a system user @@USER@@ and
# the unit @@UNIT@@, enabled and started. --prefix DIR (absolute, not /) puts all of it under
# DIR, makes no user and writes the unit without enabling it; --no-systemd: the same at /.
# Again on an installed board: the new venv and config are made and checked beside the old
# ones, which stay in use until then; changed config, credentials and data are kept as *.old;
# the state (outbox, resume state) is kept. Remove with @@OPT@@/uninstall.sh.
set -eu

PACK_PLATFORM='@@PLATFORM@@'
PACK_MACHINE='@@MACHINE@@'
PACK_PYTHON='@@PYTHON@@'
PIP_WHEEL='@@PIP_WHEEL@@'
OPT='@@OPT@@'
ETC='@@ETC@@'
STATE='@@STATE@@'
USER_NAME='@@USER@@'
UNIT='@@UNIT@@'

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

prefix=""; prefix_given=no; python="python3"; systemd=auto; start=yes; compile=yes; expect=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; prefix=$2; prefix_given=yes; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; prefix_given=yes; shift ;;
        --expect) [ $# -ge 2 ] || die "--expect needs a sha256"; expect=$2; shift 2 ;;
        --expect=*) expect=${1#--expect=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --no-systemd) systemd=no; shift ;;
        --no-start) start=no; shift ;;
        --no-compile) compile=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
launcher=${TOMTIT_PYTHON_LAUNCHER:-}
here=$(cd "$(dirname "$0")" && pwd)

@@CHECK_PREFIX@@
if [ "$prefix_given" = yes ]; then
    case "$prefix" in
        *'#'*|*'&'*|*'\'*|*'"'*|*"'"*) die "--prefix must not contain # & \\ or quotes" ;;
    esac
    systemd=no
elif [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo sh $0), or give --prefix DIR"
fi
use_systemd=no
if [ "$systemd" = auto ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    use_systemd=yes
fi
O=$prefix$OPT; E=$prefix$ETC; S=$prefix$STATE

# 1. The board's python: the pack's machine and Python version, with the venv module.
command -v "$python" >/dev/null 2>&1 || [ -x "$python" ] || die "no $python here (give --python PATH)"
info=$($launcher "$python" -c 'import platform, sys, venv; print(platform.machine(), "%d.%d" % sys.version_info[:2])') \
    || die "$python does not run, or lacks the venv module (Debian: the libpython3.X-stdlib package has it)"
# shellcheck disable=SC2086  # two words: machine and version
set -- $info
[ "$1" = "$PACK_MACHINE" ] || die "this pack is for $PACK_PLATFORM; $python runs on $1"
[ "$2" = "$PACK_PYTHON" ] || die "this pack's wheels are for Python $PACK_PYTHON; $python is $2 (pack with --python $2)"

# 2. Every file as packed.
say "checking the pack's files against SHA256SUMS"
if command -v sha256sum >/dev/null 2>&1; then
    if ! out=$(cd "$here" && sha256sum -c SHA256SUMS 2>&1); then
        printf '%s\n' "$out" | grep -v ': OK$' >&2 || true
        die "the pack is damaged (the files above): copy it again"
    fi
else
    $launcher "$python" - "$here" <<'PY' || die "the pack is damaged: copy it again"
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
bad = 0
for line in (root / "SHA256SUMS").read_text().splitlines():
    digest, name = line.split("  ", 1)
    f = root / name
    if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
        print(f"{name}: FAILED", file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
PY
fi
# pack.json vouches for SHA256SUMS (and so for every file); its own sha256 is what the builder printed
pack_sha=$($launcher "$python" - "$here" <<'PY'
import hashlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
try:
    files = json.loads((root / "pack.json").read_text())["files"]
    sums = dict(reversed(line.split("  ", 1)) for line in (root / "SHA256SUMS").read_text().splitlines())
    ok = (files["SHA256SUMS"]["sha256"] == sha(root / "SHA256SUMS")
          and sums == {name: e["sha256"] for name, e in files.items() if name != "SHA256SUMS"})
except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    sys.exit(f"pack.json or SHA256SUMS unreadable: {e}")
if not ok:
    sys.exit("SHA256SUMS does not match pack.json")
print(sha(root / "pack.json"))
PY
) || die "the pack is damaged (pack.json and SHA256SUMS disagree): copy it again"
say "pack.json sha256 $pack_sha: compare it with the one printed when the pack was built"
if [ -n "$expect" ]; then
    expect=$(printf '%s' "$expect" | tr 'A-F' 'a-f')
    [ "$pack_sha" = "$expect" ] \
        || die "pack.json's sha256 is not the expected $expect: this is not the pack that was built"
fi

relocate() {  # the board paths in a packed file, moved under --prefix
    if [ -n "$prefix" ]; then
        sed -e "s#\([\" =]\)$OPT#\1$prefix$OPT#g" -e "s#\([\" =]\)$ETC#\1$prefix$ETC#g" \
            -e "s#\([\" =]\)$STATE#\1$prefix$STATE#g" "$1"
    else
        cat "$1"
    fi
}

# 3. A new venv beside the one in use, from the wheelhouse only. A venv cannot be moved (its
# scripts name their python by path), so each lives in its own venv-* folder and $O/venv is a
# symbolic link, switched in one rename once the new venv and config are checked: until then the
# board runs as before, and a failure leaves it so.
new=venv-$(date -u +%Y%m%d%H%M%S)-$$
swapped=no
trap '[ "$swapped" = yes ] || rm -rf "$O/$new" "$O/.bundle.new" "$E/.device.toml.new"' EXIT
say "creating the venv $O/$new (no index: the pack's wheels only)"
mkdir -p "$O"
$launcher "$python" -m venv --without-pip "$O/$new" || die "python -m venv failed"
vpy=$O/$new/bin/python
for v in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_CONFIG_FILE PIP_NO_CACHE_DIR PIP_DISABLE_PIP_VERSION_CHECK
set -- install --no-index --find-links "$here/wheelhouse" --require-hashes -r "$here/requirements.txt" \
    --no-input --no-warn-script-location --quiet
[ "$compile" = yes ] || set -- "$@" --no-compile
$launcher "$vpy" "$here/wheelhouse/$PIP_WHEEL/pip" "$@" || die "pip install from the wheelhouse failed"

# 4. The new bundle and config, checked with the new tomtit before anything in use changes.
rm -rf "$O/.bundle.new"
cp -R "$here/bundle" "$O/.bundle.new"
chmod -R u=rwX,go=rX "$O/.bundle.new"
mkdir -p "$E" "$S"
chmod 0755 "$E"
chmod 0750 "$S"
umask 077
relocate "$here/device.toml" > "$E/.device.toml.new"
data_packed=no
for f in data.jsonl data.csv; do
    if [ -f "$here/$f" ]; then data_packed=yes; fi
done
check='import sys; from tomtit.pack.builder import check_installed_config as c
c(sys.argv[1], data_packed=sys.argv[2] == "yes")'
$launcher "$vpy" -c "$check" "$E/.device.toml.new" "$data_packed" \
    || die "the pack's device.toml does not work with its tomtit (nothing was changed)"

# 5. The switch: stop the agent, swap venv and bundle, install config, credentials and data
# (a changed one kept as .old).
if [ "$use_systemd" = yes ] && systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    say "stopping $UNIT (it resumes from its state folder)"
    systemctl stop "$UNIT"
fi
say "switching to the new venv and bundle in $O; config in $E, state folder $S"
if [ -d "$O/venv" ] && [ ! -L "$O/venv" ]; then mv "$O/venv" "$O/venv.old"; fi  # a pack before venv-* folders
rm -f "$O/.venv.link"
ln -s "$new" "$O/.venv.link"
$launcher "$python" -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$O/.venv.link" "$O/venv" \
    || die "could not switch $O/venv to $new"
rm -rf "$O/bundle.old"
if [ -d "$O/bundle" ]; then mv "$O/bundle" "$O/bundle.old"; fi
mv "$O/.bundle.new" "$O/bundle"
swapped=yes
rm -rf "$O/bundle.old" "$O/venv.old"
for d in "$O"/venv-*; do  # the venvs no longer in use
    if [ -e "$d" ] && [ "$d" != "$O/$new" ]; then rm -rf "$d"; fi
done
cp "$here/uninstall.sh" "$O/uninstall.sh" && chmod 0755 "$O/uninstall.sh"
cp "$here/pack.json" "$O/pack.json"
put() {  # put SRC DEST MODE: DEST replaced in one rename; a DEST that differs is kept as DEST.old
    if [ -f "$2" ] && ! cmp -s "$1" "$2"; then
        cp -p "$2" "$2.old"
        say "kept the previous $(basename "$2") as $2.old"
    fi
    cp "$1" "$2.new.$$" && chmod "$3" "$2.new.$$" && mv "$2.new.$$" "$2"
}
put "$E/.device.toml.new" "$E/device.toml" 0600
rm -f "$E/.device.toml.new"
for f in credentials.toml tls.key; do  # secrets: 0600 (tomtit refuses a credential file others can read)
    if [ -f "$here/$f" ]; then put "$here/$f" "$E/$f" 0600; fi
done
for f in ca.crt tls-ca.crt tls.crt; do
    if [ -f "$here/$f" ]; then put "$here/$f" "$E/$f" 0644; fi
done
for f in data.jsonl data.csv; do
    if [ -f "$here/$f" ]; then put "$here/$f" "$S/$f" 0600; fi
done
umask 022

# 6. The unit: written always; enabled and started where systemd runs (and not --prefix).
unit_dir=$prefix/etc/systemd/system
mkdir -p "$unit_dir"
relocate "$here/$UNIT" > "$unit_dir/$UNIT"
chmod 0644 "$unit_dir/$UNIT"
sd_version=0
if command -v systemctl >/dev/null 2>&1; then
    sd_version=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
    sd_version=${sd_version:-0}
fi
if [ "$sd_version" -ge 254 ]; then  # RestartSteps/RestartMaxDelaySec: a growing back-off
    mkdir -p "$unit_dir/$UNIT.d"
    cp "$here/$UNIT.d/backoff.conf" "$unit_dir/$UNIT.d/backoff.conf"
fi
if [ "$use_systemd" = yes ]; then
    if ! id "$USER_NAME" >/dev/null 2>&1; then
        say "creating the system user $USER_NAME"
        if command -v useradd >/dev/null 2>&1; then
            useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
        else
            adduser --system --group --home "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
        fi
    fi
    # Raspberry Pi only: the energy meter of a Pi 5 (`vcgencmd pmic_read_adc`) talks to the
    # firmware through the mailbox /dev/vcio, which group video owns on Raspberry Pi OS. Elsewhere
    # video opens cameras and GPUs the agent has no use for: no membership there.
    if [ -e /dev/vcio ] && getent group video >/dev/null 2>&1; then
        usermod -a -G video "$USER_NAME" 2>/dev/null || true
    fi
    chown -R "$USER_NAME:$USER_NAME" "$S"
    chgrp "$USER_NAME" "$E/device.toml"
    chmod 0640 "$E/device.toml"
    for f in credentials.toml tls.key; do
        if [ -f "$E/$f" ]; then chown "$USER_NAME:$USER_NAME" "$E/$f"; fi
    done
    systemctl daemon-reload
    systemctl enable "$UNIT"
    if [ "$start" = yes ]; then
        systemctl restart "$UNIT"
        say "started $UNIT: journalctl -u ${UNIT%.service} -f"
    else
        say "enabled $UNIT (not started: systemctl start ${UNIT%.service})"
    fi
else
    say "unit written to $unit_dir/$UNIT, not enabled (no systemd here, or --prefix/--no-systemd)"
    say "run it yourself: $O/venv/bin/tomtit device run --config $E/device.toml"
fi
say "done: tomtit @@VERSION@@ for $PACK_PLATFORM, Python $PACK_PYTHON"
"""

UNINSTALL_SH = r"""#!/bin/sh
# uninstall.sh: take tomtit's device agent off this board (`tomtit device pack`).
#
#   sudo sh uninstall.sh [--purge]          sh uninstall.sh --prefix DIR [--purge]
#
# Stops and disables @@UNIT@@, removes it and @@OPT@@ (venv, bundle). KEEPS @@ETC@@
# (device.toml, credentials) and @@STATE@@ (the outbox of unsent updates, resume state, data),
# so a reinstall resumes where it stopped. --purge removes those too, and the user @@USER@@.
set -eu

OPT='@@OPT@@'
ETC='@@ETC@@'
STATE='@@STATE@@'
USER_NAME='@@USER@@'
UNIT='@@UNIT@@'

say() { echo "uninstall.sh: $*"; }
die() { echo "uninstall.sh: error: $*" >&2; exit 1; }

prefix=""; prefix_given=no; purge=no
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; prefix=$2; prefix_given=yes; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; prefix_given=yes; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1" ;;
    esac
done
@@CHECK_PREFIX@@
if [ "$prefix_given" = yes ] && [ ! -d "$prefix" ]; then die "--prefix $prefix: no such folder"; fi
if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then die "run as root (sudo sh $0), or give --prefix DIR"; fi
unit_dir=$prefix/etc/systemd/system
if [ -z "$prefix" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now "$UNIT" 2>/dev/null || true
    say "stopped and disabled $UNIT"
fi
rm -f "$unit_dir/$UNIT"
# only the pack's own drop-in: an admin's `systemctl edit` overrides beside it stay
rm -f "$unit_dir/$UNIT.d/backoff.conf"
rmdir "$unit_dir/$UNIT.d" 2>/dev/null || true
if [ -z "$prefix" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
rm -rf "$prefix$OPT"
say "removed the unit and $prefix$OPT (venv, bundle)"
if [ "$purge" = yes ]; then
    rm -rf "$prefix$ETC" "$prefix$STATE"
    if [ -z "$prefix" ] && id "$USER_NAME" >/dev/null 2>&1; then userdel "$USER_NAME" 2>/dev/null || true; fi
    say "purged $prefix$ETC, $prefix$STATE and the user $USER_NAME"
else
    say "kept $prefix$ETC (config, credentials) and $prefix$STATE (outbox, state, data): --purge removes them"
fi
"""

# A given --prefix: absolute, in normal form, and not the board's root (which is what no --prefix
# means: `--prefix ""` or `--prefix /` must not turn a test's install or a --purge into one at /).
CHECK_PREFIX = r"""if [ "$prefix_given" = yes ]; then
    case "$prefix" in
        "") die "--prefix is empty: give a folder (leave --prefix out to install on this board itself)" ;;
        /*) ;;
        *) die "--prefix must be an absolute path, not $prefix" ;;
    esac
    case "$prefix/" in
        */./*|*/../*) die "--prefix must not contain . or .. components: $prefix" ;;
    esac
    while :; do case "$prefix" in */) prefix=${prefix%/} ;; *) break ;; esac; done
    if [ -z "$prefix" ] || { [ -d "$prefix" ] && [ "$(cd "$prefix" && pwd -P)" = / ]; }; then
        die "--prefix names / (this board itself): leave --prefix out for that"
    fi
fi"""


def _fill(template: str, values: dict[str, str]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace(f"@@{key}@@", value)
    if "@@" in out:
        raise ValueError("a placeholder was left unfilled")
    return out


def _layout_values(layout: BoardLayout) -> dict[str, str]:
    return {"CHECK_PREFIX": CHECK_PREFIX, "OPT": layout.opt, "ETC": layout.etc, "STATE": layout.state,
            "USER": layout.user, "UNIT": layout.unit_name}


def render_install(*, platform: str, machine: str, python: str, pip_wheel: str, version: str,
                   layout: BoardLayout = BOARD) -> str:
    for v in (platform, machine, python, pip_wheel, version):
        if "'" in v or "@@" in v:
            raise ValueError(f"cannot quote {v!r} in install.sh")
    return _fill(INSTALL_SH, {**_layout_values(layout), "PLATFORM": platform, "MACHINE": machine,
                              "PYTHON": python, "PIP_WHEEL": pip_wheel, "VERSION": version})


def render_uninstall(layout: BoardLayout = BOARD) -> str:
    return _fill(UNINSTALL_SH, _layout_values(layout))
