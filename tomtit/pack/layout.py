"""Where a pack puts things on the board. install.sh, the unit and device.toml all read these.

`--prefix DIR` (install.sh) moves the three roots under DIR, for tests and for a board's image
mounted on a workstation; the unit is then written but not enabled.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoardLayout:
    opt: str = "/opt/tomtit"  # the venv and the bundle: read-only to the service
    etc: str = "/etc/tomtit"  # device.toml, credentials.toml (0600), ca.crt
    state: str = "/var/lib/tomtit"  # writable: StateDirectory=tomtit (outbox, resume state, data)
    user: str = "tomtit"  # the service's own system user
    unit_name: str = "tomtit-device.service"

    @property
    def venv(self) -> str:
        return f"{self.opt}/venv"

    @property
    def bundle(self) -> str:
        return f"{self.opt}/bundle"

    @property
    def config(self) -> str:
        return f"{self.etc}/device.toml"

    @property
    def state_dir(self) -> str:
        return f"{self.state}/state"

    @property
    def tomtit(self) -> str:
        return f"{self.venv}/bin/tomtit"

    @property
    def state_directory_name(self) -> str:
        """systemd's StateDirectory= is relative to /var/lib."""
        if not self.state.startswith("/var/lib/"):
            raise ValueError(f"the state folder must be under /var/lib for StateDirectory=, not {self.state}")
        return self.state[len("/var/lib/"):]


BOARD = BoardLayout()
