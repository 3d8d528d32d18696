"""The systemd unit of a board's device agent: its one template (the pack writes it, the README
shows it). `systemd-analyze verify` passes on it (tests/test_device_pack.py).

Why each line is there:
- Restart=on-failure, RestartSec, StartLimitIntervalSec=0: a crash (a bad config, missing data, an
  OOM kill) is retried for ever, 15 s apart: no one is there to restart it. A broker that is down is
  no failure: the agent trains offline and keeps its updates in the outbox.
- backoff.conf (a drop-in, installed only with systemd >= 254, which knows the keys): the delay
  grows from 15 s to 10 min over 6 restarts, so a crash loop does not burn a battery.
- Nice, MemoryMax, CPUQuota: training is background work; the board's own job keeps priority, and
  a runaway process is killed by its cgroup before the board's OOM killer picks something else.
- ProtectSystem=strict + StateDirectory: the whole file system is read-only to the agent except
  /var/lib/tomtit (outbox, resume state); /opt/tomtit (venv, bundle) and /etc/tomtit cannot be
  changed by a compromised agent. ProtectHome, PrivateTmp, NoNewPrivileges and the kernel
  protections cost it nothing (it reads /sys for energy meters; ProtectKernelTunables keeps /sys
  readable).
- What the agent does not need, taken away: sockets other than IPv4/IPv6 (MQTT) and Unix ones
  (RestrictAddressFamilies), every capability (CapabilityBoundingSet= empty: it runs as its own
  user), 32-bit or foreign system calls (SystemCallArchitectures=native), the kernel log, clock
  and host name, new namespaces, personality changes. UMask=0077: its outbox, resume state and
  summary are its own.
- ProtectClock implies `DeviceAllow=char-rtc r` on the systemd of Debian 12 (252), and any
  DeviceAllow closes every other device: /dev/vcio is allowed again for the Pi 5's energy meter
  (`vcgencmd pmic_read_adc`; a missing device is skipped with a log line).
- SIGTERM stops the agent at a step boundary with its state flushed; TimeoutStopSec leaves room
  for one slow step on a small board.
"""
from __future__ import annotations

from dataclasses import dataclass

from tomtit.pack.layout import BOARD, BoardLayout


@dataclass(frozen=True)
class UnitLimits:
    nice: int = 10  # background priority
    memory_max: str = "1500M"  # a cgroup ceiling: size it to the board (a 1 GB Pi 4: 700M)
    cpu_quota: str = "300%"  # of one core: 3 of a Pi 4's 4 cores
    restart_sec: int = 15

    def check(self) -> None:
        import re

        if not -20 <= self.nice <= 19:
            raise ValueError(f"nice must be in [-20, 19], not {self.nice}")
        if not re.fullmatch(r"\d+[KMGT]?|infinity|\d{1,2}%", self.memory_max):
            raise ValueError(f"memory max must be like 1500M, 2G or 80%, not {self.memory_max!r}")
        if not re.fullmatch(r"\d+%", self.cpu_quota) or int(self.cpu_quota[:-1]) == 0:
            raise ValueError(f"cpu quota must be like 300% (of one core), not {self.cpu_quota!r}")


def render_unit(layout: BoardLayout = BOARD, limits: UnitLimits = UnitLimits()) -> str:
    limits.check()
    return f"""\
# {layout.unit_name}: tomtit's federated device agent (written by `tomtit device pack`)
[Unit]
Description=tomtit federated fine-tuning: device agent
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=exec
User={layout.user}
Group={layout.user}
ExecStart={layout.tomtit} device run --config {layout.config}
Environment=PYTHONUNBUFFERED=1
# a crash, or a bad config: retry every {limits.restart_sec} s, for ever (no one is there to restart it)
Restart=on-failure
RestartSec={limits.restart_sec}
TimeoutStopSec=120
# training is background work: the board's own job keeps priority and memory
Nice={limits.nice}
MemoryMax={limits.memory_max}
CPUQuota={limits.cpu_quota}
# read-only system; the agent writes only its state folder
StateDirectory={layout.state_directory_name}
StateDirectoryMode=0750
ProtectSystem=strict
ReadWritePaths={layout.state}
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
# nothing it does not use: MQTT over IPv4/IPv6, Unix sockets; no capabilities, no foreign syscalls
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
CapabilityBoundingSet=
SystemCallArchitectures=native
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
# ProtectClock implies DeviceAllow=char-rtc r, which closes all other devices: the Pi 5 meter's mailbox
DeviceAllow=/dev/vcio rw
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def render_backoff() -> str:
    """A drop-in for systemd >= 254 (RestartSteps, RestartMaxDelaySec): exponential back-off."""
    return """\
# tomtit-device.service.d/backoff.conf: installed by install.sh only where systemd >= 254 knows these keys
[Service]
RestartSteps=6
RestartMaxDelaySec=600
"""
