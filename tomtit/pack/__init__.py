"""`tomtit device pack`: everything one board needs to go into service, with no network on it.

A pack is one folder (or one .tar.gz of it):

    pack.json          what the pack is (tomtit version, platform, python, backends) and every file's
                       size and sha256: `tomtit device pack --verify DIR` checks it; its own sha256,
                       printed at build time and sent by another channel, is what `--expect` checks
    SHA256SUMS         the same hashes in sha256sum's format: install.sh checks them first
    wheelhouse/        tomtit and its `device` extra, for the board's platform and Python, pip included
    requirements.txt   the lock: exactly those wheels, by version and sha256 (pip --require-hashes)
    bundle/            only the files the board's backend reads (no export-side or other-backend files)
    device.toml        every `tomtit device run` option the board uses (`--config`)
    credentials.toml   + ca.crt, when given (installed with mode 0600)
    data.jsonl         the device's examples, when given as a file here (--board-data: a path on the board)
    tomtit-device.service (+ .d/backoff.conf)  the systemd unit (tomtit/pack/unit.py)
    install.sh, uninstall.sh

The modules: layout (where things go on the board), unit (the systemd unit), wheelhouse (pip
download for another platform), bundle (the device part of a bundle), scripts (install.sh and
uninstall.sh), manifest (pack.json and its check), builder (all of it in order).
"""
from tomtit.errors import TomtitError


class PackError(TomtitError):
    """A pack cannot be built, or a pack on disk is not what its manifest says."""
