"""Energy meters: one small interface, monotonic cumulative joules.

Every meter answers `joules()`: joules used since the meter was created, never decreasing. The
device agent calls it once per training step (DESIGN.md §4), which also sets the sampling rate of
the power-sampling meters below: they integrate instantaneous power between two calls with the
trapezoid rule, so a long pause between calls is bridged by a straight line. Call it at least every
few seconds; a step is usually well under that.

Meters, in the order auto-detection tries them:
- `RaplMeter`      Intel/AMD x86 package energy counters (powercap), measured.
- `Ina3221Meter`   NVIDIA Jetson on-board INA3221 power monitors, measured (sampled power).
- `Pi5PmicMeter`   Raspberry Pi 5 PMIC rail ADCs via `vcgencmd pmic_read_adc`, measured (sampled).
- `BatteryMeter`   battery drain from /sys/class/power_supply, measured (coarse).
- `ModelMeter`     profile watts x busy time, always labelled `estimated`.

Meters are built by their constructors, which take the baseline reading (that is the moment
"since the meter was created" refers to) and raise `EnergyMeterError` with the reason when the
hardware is absent or unreadable. They are not thread-safe: one caller (the agent loop) reads.

Only the standard library is imported here (plus the project's error root): this runs on every
board, and must never pull in torch.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tomtit.errors import TomtitError

Clock = Callable[[], float]

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
DEFAULT_HWMON_ROOT = "/sys/class/hwmon"
DEFAULT_I2C_ROOT = "/sys/bus/i2c/drivers/ina3221x"  # older L4T (Nano, TX1/TX2, r32) IIO driver
DEFAULT_POWER_SUPPLY_ROOT = "/sys/class/power_supply"
DEFAULT_DEVICE_MODEL_PATH = "/proc/device-tree/model"  # board name on ARM boards; absent on x86
VCGENCMD_TIMEOUT_S = 2.0  # vcgencmd answers in tens of ms; a hung firmware mailbox must not hang us


class EnergyMeterError(TomtitError):
    """A meter is absent, unreadable or misconfigured; the message says which and what to do."""


# --- the interface -------------------------------------------------------------------------------


class EnergyMeter(ABC):
    """Cumulative energy since creation. `name` is also a valid `detect_meter` spec."""

    name: str
    estimated: bool = False  # True only for the model-based meter
    source: str  # the files or command read, for the user to check

    @abstractmethod
    def joules(self) -> float:
        """Joules used since the meter was created; monotonic (never decreases)."""

    def reserve_fraction(self) -> float | None:
        """Battery state of charge in 0..1 where this meter knows it, else None."""
        return None

    def __repr__(self) -> str:
        flag = " estimated" if self.estimated else ""
        return f"<{type(self).__name__} {self.name}{flag} source={self.source!r}>"


# --- small helpers -------------------------------------------------------------------------------


def _read_sysfs(path: Path) -> str:
    """The one place files are read (tests replace it to simulate permission errors as root)."""
    return path.read_text()


def _describe_os_error(err: OSError) -> str:
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "missing"
    return err.strerror or type(err).__name__


def _read_str(path: Path) -> str:
    try:
        # sysfs values end in "\n"; /proc/device-tree strings end in "\0".
        return _read_sysfs(path).strip().strip("\0")
    except OSError as err:
        raise EnergyMeterError(f"{path} is not readable ({_describe_os_error(err)})") from err


def _read_int(path: Path) -> int:
    text = _read_str(path)
    try:
        return int(text)
    except ValueError as err:
        raise EnergyMeterError(f"{path}: expected an integer, read {text!r}") from err


def _natural_key(path: Path) -> list[object]:
    # "hwmon10" after "hwmon9", "intel-rapl:10" after "intel-rapl:2".
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _child_dirs(root: Path, pattern: str) -> list[Path]:
    """Sorted children of `root` matching a regex (symlinks to dirs count: /sys/class is links)."""
    if not root.is_dir():
        return []
    rx = re.compile(pattern)
    try:
        children = list(root.iterdir())
    except OSError as err:
        raise EnergyMeterError(f"{root} cannot be listed ({_describe_os_error(err)})") from err
    return sorted((p for p in children if rx.fullmatch(p.name) and p.is_dir()), key=_natural_key)


class _Trapezoid:
    """Integrates sampled watts over an injected clock: area between consecutive samples."""

    def __init__(self, clock: Clock, watts: float) -> None:
        self._clock = clock
        self._t = clock()
        self._w = watts
        self.total_j = 0.0

    def add(self, watts: float, *, count: bool = True) -> float:
        t = self._clock()
        dt = max(0.0, t - self._t)  # a monotonic clock never goes back; guard injected ones anyway
        if count:
            self.total_j += max(0.0, 0.5 * (self._w + watts) * dt)
        self._t, self._w = t, watts
        return self.total_j


# --- 1. RAPL (Intel / AMD x86) -------------------------------------------------------------------

_RAPL_PERMISSION_HINT = (
    ": run as root or `sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj` "
    "(kernels since 5.10 make energy_uj root-only, CVE-2020-8694)"
)


@dataclass(frozen=True)
class _RaplZone:
    energy_path: Path  # energy_uj: cumulative microjoules, wraps to 0 after max_energy_range_uj
    name: str  # "package-0", "psys", ...
    max_range_uj: int


class RaplMeter(EnergyMeter):
    """Sum of the top-level RAPL package zones' `energy_uj` counters.

    Only `intel-rapl:N` is summed, never the subzones `intel-rapl:N:M` (core, uncore, dram are
    parts of, or beside, the package and would be double counted). A top-level `psys` zone (whole
    platform, on some laptops) contains the packages, so it is used only when no package zone
    exists. The counters wrap at `max_energy_range_uj` (about 262 kJ on common parts: tens of
    minutes at full load), and one wrap between calls is handled; call `joules()` more often than
    that, which a per-step caller does by far.
    """

    name = "rapl"

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT) -> None:
        root = Path(root)
        self._zones = _rapl_zones(root)
        self.source = ", ".join(str(z.energy_path) for z in self._zones)
        self._last_uj = [self._read(z) for z in self._zones]
        self._total_uj = 0  # integer microjoules: no float drift over a long run

    @staticmethod
    def _read(zone: _RaplZone) -> int:
        try:
            return int(_read_sysfs(zone.energy_path).strip())
        except PermissionError as err:
            raise EnergyMeterError(f"RAPL energy_uj at {zone.energy_path} is not readable "
                                   f"(permission denied){_RAPL_PERMISSION_HINT}") from err
        except (OSError, ValueError) as err:
            raise EnergyMeterError(f"RAPL energy_uj at {zone.energy_path} could not be read: {err}") from err

    def joules(self) -> float:
        readings = [self._read(z) for z in self._zones]  # read all before changing any state
        for i, (zone, cur) in enumerate(zip(self._zones, readings)):
            prev = self._last_uj[i]
            # The counter runs 0..max_range_uj inclusive, so it wraps modulo max_range_uj + 1.
            self._total_uj += cur - prev if cur >= prev else (cur - prev) % (zone.max_range_uj + 1)
            self._last_uj[i] = cur
        return self._total_uj / 1e6


def _rapl_zones(root: Path) -> list[_RaplZone]:
    if not root.is_dir():
        raise EnergyMeterError(f"no {root} (no powercap RAPL driver: not x86, a VM, "
                               "or intel_rapl not loaded)")
    # Only intel-rapl:N. Excludes subzones (intel-rapl:N:M) and intel-rapl-mmio:N, which is a
    # second interface to the same package energy.
    dirs = [d for d in _child_dirs(root, r"intel-rapl:\d+") if (d / "energy_uj").exists()]
    if not dirs:
        raise EnergyMeterError(f"no intel-rapl:N zones with energy_uj under {root}")
    zones = []
    for d in dirs:
        name = _read_str(d / "name") if (d / "name").exists() else d.name
        max_uj = _read_int(d / "max_energy_range_uj")
        if max_uj <= 0:
            raise EnergyMeterError(f"{d / 'max_energy_range_uj'} is {max_uj}; cannot handle wraparound")
        zones.append(_RaplZone(d / "energy_uj", name, max_uj))
    packages = [z for z in zones if z.name.startswith("package")]
    return packages or zones


# --- 2. INA3221 (NVIDIA Jetson) ------------------------------------------------------------------

# Rails that carry the whole module/board input on Jetson boards (energymon's JetsonPowerRails
# table, L4T r32-r36): POM_5V_IN (Nano), VDD_IN (TX1/TX2/Xavier NX/Orin Nano/NX), 5V_IN (Xavier
# NX docs), and VDD_MUX (TX1/TX2 carrier board, in parallel with VDD_IN). The other channels
# (CPU, GPU, SOC...) are branches of these, so when any input rail is present only input rails
# are summed; otherwise (AGX Xavier/Orin: no input rail) all channels are summed.
INA3221_INPUT_RAILS = frozenset({"VDD_IN", "POM_5V_IN", "5V_IN", "VDD_MUX"})


@dataclass(frozen=True)
class _Rail:
    """One INA3221 channel: a power file, or a voltage and a current file to multiply."""

    label: str
    power: Path | None
    power_to_watts: float  # watts per unit of `power`
    volt: Path | None
    curr: Path | None
    vi_to_watts: float  # watts per (voltage unit x current unit)

    def watts(self) -> float:
        if self.power is not None:
            return _read_int(self.power) * self.power_to_watts
        assert self.volt is not None and self.curr is not None
        # abs(): the chip is bi-directional; a reversed shunt must not make energy go backwards.
        return abs(_read_int(self.volt) * _read_int(self.curr)) * self.vi_to_watts


def _hwmon_rails(hwmon_root: Path) -> list[_Rail]:
    """Mainline `ina3221` hwmon driver (Jetson Xavier NX r32.5+, Orin r35+).

    Units (kernel Documentation/hwmon/ina3221.rst and the hwmon sysfs ABI): in[123]_input bus
    voltage in mV, curr[123]_input in mA, so mV x mA = uW; power[N]_input, if a driver offers it,
    is uW (hwmon ABI). Only channels 1..3 are looked at: in4..in6 are *shunt* voltages in uV and
    curr4 is the summed current, pairing those by number would be nonsense.
    """
    rails = []
    for d in _child_dirs(hwmon_root, r"hwmon\d+"):
        if not (d / "name").exists() or _read_str(d / "name") not in ("ina3221", "ina3221x"):
            continue
        for n in (1, 2, 3):
            enable = d / f"in{n}_enable"
            if enable.exists() and _read_str(enable) == "0":
                continue  # a disabled channel reads as an error (ENODATA)
            label_file = d / f"in{n}_label"
            label = _read_str(label_file) if label_file.exists() else f"{d.name}/ch{n}"
            power, volt, curr = d / f"power{n}_input", d / f"in{n}_input", d / f"curr{n}_input"
            if power.exists():
                rails.append(_Rail(label, power, 1e-6, None, None, 0.0))
            elif volt.exists() and curr.exists():
                rails.append(_Rail(label, None, 0.0, volt, curr, 1e-6))
    return rails


def _iio_rails(i2c_root: Path) -> list[_Rail]:
    """NVIDIA's downstream `ina3221x` IIO driver (L4T r32: Nano, TX1, TX2, AGX Xavier).

    Layout `<root>/<bus>-<addr>/iio:deviceK/`, channels 0..2: rail_name_N, in_power{N}_input in mW,
    in_voltage{N}_input in mV, in_current{N}_input in mA (NVIDIA L4T "Power Monitor" docs, and
    the units energymon/alumet read), so mV x mA = uW = 1e-6 W.
    """
    rails = []
    for bus in _child_dirs(i2c_root, r"\d+-[0-9a-fA-F]+"):
        for dev in _child_dirs(bus, r"iio:device\d+"):
            for n in (0, 1, 2):
                name_file = dev / f"rail_name_{n}"
                label = _read_str(name_file) if name_file.exists() else f"{bus.name}/ch{n}"
                power = dev / f"in_power{n}_input"
                volt, curr = dev / f"in_voltage{n}_input", dev / f"in_current{n}_input"
                if power.exists():
                    rails.append(_Rail(label, power, 1e-3, None, None, 0.0))
                elif volt.exists() and curr.exists():
                    rails.append(_Rail(label, None, 0.0, volt, curr, 1e-6))
    return rails


class Ina3221Meter(EnergyMeter):
    """Jetson board power from its INA3221 monitors, integrated over time (trapezoid).

    Power files are preferred over V x I: reading V and I as two files pairs samples taken at
    different moments. See `INA3221_INPUT_RAILS` for which channels are summed.
    """

    name = "ina3221"

    def __init__(
        self,
        hwmon_root: str | os.PathLike[str] = DEFAULT_HWMON_ROOT,
        i2c_root: str | os.PathLike[str] = DEFAULT_I2C_ROOT,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        rails = _hwmon_rails(Path(hwmon_root)) + _iio_rails(Path(i2c_root))
        if not rails:
            raise EnergyMeterError(
                f"no INA3221 monitor (no hwmon named ina3221 under {hwmon_root}, "
                f"no iio:device*/in_power*_input under {i2c_root})")
        inputs = [r for r in rails if r.label in INA3221_INPUT_RAILS]
        self.rails: tuple[_Rail, ...] = tuple(inputs or rails)
        self.source = ", ".join(f"{r.label}={r.power or r.volt}" for r in self.rails)
        self._integral = _Trapezoid(clock, self.watts())

    def watts(self) -> float:
        """Instantaneous power now, summed over the counted rails."""
        return sum(r.watts() for r in self.rails)

    def joules(self) -> float:
        return self._integral.add(self.watts())


# --- 3. Raspberry Pi 5 PMIC ----------------------------------------------------------------------

# `vcgencmd pmic_read_adc` prints one reading a line, e.g.
#    VDD_CORE_A current(7)=2.01842000A
#    VDD_CORE_V volt(15)=0.84124960V
# (older firmware: `VDD_CORE_A=2.018A`). A rail's current is `<RAIL>_A`, its voltage `<RAIL>_V`.
_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\b[^=]*=\s*(?P<value>[-+0-9.eE]+)\s*[AV]?\s*$")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail from `vcgencmd pmic_read_adc` output: each X_A current times its X_V volt.

    Rails with only one of the two (EXT5V_V, BATT_V: input and RTC battery voltages) are skipped.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m is None:
            continue
        (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: abs(a) * volts[rail] for rail, a in amps.items() if rail in volts}


def run_vcgencmd_pmic() -> str:
    """Default runner: stdout of `vcgencmd pmic_read_adc`, or EnergyMeterError saying why not."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        raise EnergyMeterError("vcgencmd not found on PATH (not Raspberry Pi OS, or package "
                               "raspi-utils missing)")
    try:
        done = subprocess.run([exe, "pmic_read_adc"], capture_output=True, text=True,
                              timeout=VCGENCMD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnergyMeterError(f"`vcgencmd pmic_read_adc` failed: {err}") from err
    if done.returncode != 0:
        # e.g. "VCHI initialization failed" when the user may not open /dev/vcio (not in `video`).
        msg = (done.stderr or done.stdout).strip()
        raise EnergyMeterError(f"`vcgencmd pmic_read_adc` exited {done.returncode}: {msg}")
    return done.stdout


class Pi5PmicMeter(EnergyMeter):
    """Raspberry Pi 5 power from the PMIC's rail ADCs, integrated over time (trapezoid).

    The rails are the SoC/board supplies behind the PMIC: the 5 V domain (USB devices, fan, PMIC
    losses) is not in them, so this reads below wall power; one community fit (the pitop tool,
    unverified here) is wall ~= 1.145 x rails + 0.59 W. We report the plain rail sum: it is good
    for relative costs, which is what the sync scheduler compares. Each call
    spawns vcgencmd (tens of ms), fine at one call per training step.

    `runner` returns the command's stdout, or raises EnergyMeterError saying why it cannot; tests
    pass fixture text, the default runs `vcgencmd pmic_read_adc`.
    """

    name = "pi5-pmic"
    source = "vcgencmd pmic_read_adc"

    def __init__(self, runner: Callable[[], str] | None = None, *, clock: Clock = time.monotonic) -> None:
        self._runner = runner or run_vcgencmd_pmic
        self._integral = _Trapezoid(clock, self.watts())

    def watts(self) -> float:
        rails = parse_pmic_adc(self._runner())
        if not rails:
            raise EnergyMeterError("`vcgencmd pmic_read_adc` printed no current/voltage rail pairs "
                                   "(not a Raspberry Pi 5, or firmware too old)")
        return sum(rails.values())

    def joules(self) -> float:
        return self._integral.add(self.watts())


# --- 4. Battery ----------------------------------------------------------------------------------

# power_supply sysfs ABI (Documentation/ABI/testing/sysfs-class-power): energy_* in uWh,
# charge_* in uAh, voltage_* in uV, power_now in uW, current_now in uA, capacity in %.
_J_PER_UWH = 3.6e-3  # 1 uWh = 1e-6 W x 3600 s
_J_PER_UAH_UV = 3.6e-9  # uAh x uV = 1e-12 Wh = 3.6e-9 J


class _Battery:
    """Drain accounting for one battery (laptops may have two: BAT0, BAT1).

    The energy/charge counter is the truth but firmware updates it coarsely (often every 10-60 s).
    Between counter changes, power_now is integrated as a stopgap; when the counter moves, that
    stopgap is replaced by the counter's drop. The reported total is the running maximum of
    (counter drops + stopgap since the last change), so it never double counts and never goes back.
    Only drain while `status` is Discharging counts: when charging or full on mains, the charger
    pays for the device, so this meter reports no increase (it measures battery drain, which is
    what a battery-reserve policy cares about; use rapl/model for mains-powered work).
    """

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        if (path / "energy_now").exists():
            self.counter: str | None = "energy_now"
        elif (path / "charge_now").exists() and (path / "voltage_now").exists():
            self.counter = "charge_now"
        else:
            self.counter = None
        self.has_power = (path / "power_now").exists() or (
            (path / "current_now").exists() and (path / "voltage_now").exists())
        if self.counter is None and not self.has_power:
            raise EnergyMeterError(f"battery {path} has no energy_now, charge_now+voltage_now, "
                                   "power_now or current_now+voltage_now")
        self._is_discharging()  # fail here, not on the first step, if status is unreadable
        self._last_counter = self._read_counter()
        self._counter_total_j = 0.0
        self._reported_j = 0.0
        self._stopgap = _Trapezoid(clock, self._power_w() if self.has_power else 0.0)

    def _is_discharging(self) -> bool:
        # Other states: Charging, Full, Not charging (on mains, held below 100 %), Unknown.
        return _read_str(self.path / "status") == "Discharging"

    def _read_counter(self) -> int | None:
        return None if self.counter is None else _read_int(self.path / self.counter)

    def _power_w(self) -> float:
        if (self.path / "power_now").exists():
            return abs(_read_int(self.path / "power_now")) * 1e-6
        # Some drivers report current_now negative while discharging: the sign is not reliable.
        return abs(_read_int(self.path / "current_now") * _read_int(self.path / "voltage_now")) * 1e-12

    def joules(self) -> float:
        discharging = self._is_discharging()
        cur = self._read_counter()
        power = self._power_w() if self.has_power else 0.0
        if cur is not None and cur != self._last_counter:
            assert self._last_counter is not None
            if discharging and cur < self._last_counter:
                drop = self._last_counter - cur
                if self.counter == "energy_now":
                    self._counter_total_j += drop * _J_PER_UWH
                else:
                    # charge x *present* voltage: the difference of (charge x voltage) products
                    # would turn voltage sag under load into fake consumption or gain.
                    volts_uv = _read_int(self.path / "voltage_now")
                    self._counter_total_j += drop * volts_uv * _J_PER_UAH_UV
            self._last_counter = cur
            self._stopgap = _Trapezoid(self._clock, power)  # restart the stopgap at the change
        else:
            self._stopgap.add(power, count=discharging)
        self._reported_j = max(self._reported_j, self._counter_total_j + self._stopgap.total_j)
        return self._reported_j

    def levels(self) -> tuple[float | None, float | None, float | None]:
        """(capacity %, energy_now, energy_full) where present, for the reserve fraction."""
        def opt(name: str) -> float | None:
            return float(_read_int(self.path / name)) if (self.path / name).exists() else None
        return opt("capacity"), opt("energy_now"), opt("energy_full")


class BatteryMeter(EnergyMeter):
    """Battery drain of the system batteries (type Battery, scope not Device), summed."""

    name = "battery"

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_POWER_SUPPLY_ROOT,
        *,
        clock: Clock = time.monotonic,
        require_counter: bool = False,
    ) -> None:
        root = Path(root)
        found = [d for d in _child_dirs(root, r"[^.].*") if _is_system_battery(d)]
        if not found:
            raise EnergyMeterError(f"no battery under {root} (no power_supply with type Battery)")
        self._batteries = [_Battery(d, clock) for d in found]
        if require_counter and all(b.counter is None for b in self._batteries):
            # Power-only batteries give a sampled estimate; auto prefers the model over that.
            raise EnergyMeterError(f"battery {found[0]} has no energy_now or charge_now counter")
        self.source = ", ".join(f"{b.path}/{b.counter or 'power_now'}" for b in self._batteries)

    def joules(self) -> float:
        return sum(b.joules() for b in self._batteries)

    def reserve_fraction(self) -> float | None:
        levels = [b.levels() for b in self._batteries]
        caps = [cap for cap, _, _ in levels if cap is not None]
        nows = [now for _, now, full in levels if now is not None and full]
        fulls = [full for _, now, full in levels if now is not None and full]
        if len(caps) == len(levels):
            # `capacity` is the firmware's own state of charge (it may account for wear).
            fraction = sum(caps) / (100.0 * len(caps))
        elif len(fulls) == len(levels):
            fraction = sum(nows) / sum(fulls)  # energy-weighted across batteries of different sizes
        else:
            return None
        return min(1.0, max(0.0, fraction))


def _is_system_battery(d: Path) -> bool:
    if not (d / "type").exists() or _read_str(d / "type") != "Battery":
        return False
    # scope "Device" marks a peripheral's battery (wireless mouse, headset), not ours.
    return not ((d / "scope").exists() and _read_str(d / "scope") == "Device")


# --- 5. Model-based estimate ---------------------------------------------------------------------


@dataclass(frozen=True)
class PowerProfile:
    """Whole-device watts at idle and with every core busy (rough public figures)."""

    name: str
    idle_watts: float
    busy_watts: float
    note: str  # where the figures come from

    def __post_init__(self) -> None:
        if not (math.isfinite(self.idle_watts) and math.isfinite(self.busy_watts)):
            raise EnergyMeterError(f"profile {self.name}: watts must be finite numbers")
        if not 0.0 <= self.idle_watts <= self.busy_watts or self.busy_watts <= 0.0:
            raise EnergyMeterError(f"profile {self.name}: need 0 <= idle ({self.idle_watts} W) "
                                   f"<= busy ({self.busy_watts} W) and busy > 0")


PROFILES: dict[str, PowerProfile] = {p.name: p for p in (
    PowerProfile("rpi4", 2.7, 6.4, "Raspberry Pi 4B at the 5 V input, idle vs all-core stress "
                 "(2019 launch reviews, e.g. Tom's Hardware, raspi.tv)"),
    PowerProfile("rpi5", 2.7, 7.0, "Raspberry Pi 5 at the 5 V input, idle vs all-core stress "
                 "(2023 launch reviews, e.g. Jeff Geerling)"),
    PowerProfile("jetson-nano", 1.25, 5.0, "Jetson Nano 4GB module in the 5 W nvpmodel mode: the mode "
                 "caps busy power at 5 W; idle about 1.25 W (NVIDIA forum/JetsonHacks readings)"),
    PowerProfile("laptop", 5.0, 25.0, "generic 15 W-class laptop: screen and platform at idle, "
                 "package at its sustained limit plus platform when busy"),
)}
DEFAULT_PROFILE = "laptop"

# Substrings of /proc/device-tree/model -> profile, to make the fallback estimate fit the board.
_BOARD_PROFILES = (("Raspberry Pi 5", "rpi5"), ("Raspberry Pi 4", "rpi4"), ("Jetson Nano", "jetson-nano"))


def _usable_cores() -> int:
    # The cores this process may run on (containers/taskset), not the machine's total.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ModelMeter(EnergyMeter):
    """Estimated joules = idle_watts x wall time + (busy - idle) x busy core-fraction x wall time.

    The busy fraction of each interval is this process's CPU seconds / (cores x wall seconds),
    capped at 1: `busy_watts` is the whole device with every core loaded, so one busy thread on a
    four-core Pi adds a quarter of the busy-idle gap. Other processes' load is not seen, and the
    idle floor is charged to us in full, since the device would be idle without the training.
    """

    estimated = True

    def __init__(
        self,
        busy_watts: float,
        idle_watts: float,
        *,
        cores: int | None = None,
        cpu_time: Clock = time.process_time,
        clock: Clock = time.monotonic,
        name: str | None = None,
    ) -> None:
        self.profile = PowerProfile(name or f"{busy_watts:g}/{idle_watts:g}", idle_watts, busy_watts,
                                    "explicit watts")
        self.cores = _usable_cores() if cores is None else cores
        if self.cores < 1:
            raise EnergyMeterError(f"cores must be >= 1, got {self.cores}")
        self.name = f"model:{self.profile.name}"
        self.source = (f"estimate: idle {idle_watts:g} W, busy {busy_watts:g} W over "
                       f"{self.cores} core(s) x process CPU time")
        self._cpu_time, self._clock = cpu_time, clock
        self._t, self._cpu = clock(), cpu_time()
        self._total_j = 0.0

    @classmethod
    def from_profile(
        cls,
        profile: PowerProfile,
        *,
        cores: int | None = None,
        cpu_time: Clock = time.process_time,
        clock: Clock = time.monotonic,
    ) -> ModelMeter:
        meter = cls(profile.busy_watts, profile.idle_watts, cores=cores, cpu_time=cpu_time, clock=clock,
                    name=profile.name)
        meter.profile = profile  # same watts; keeps the profile's note for display
        return meter

    def joules(self) -> float:
        t, cpu = self._clock(), self._cpu_time()
        wall = max(0.0, t - self._t)
        busy = min(max(0.0, cpu - self._cpu) / self.cores, wall)  # core-seconds -> device-seconds
        p = self.profile
        self._total_j += p.idle_watts * wall + (p.busy_watts - p.idle_watts) * busy
        self._t, self._cpu = t, cpu
        return self._total_j


def parse_model_spec(spec: str, *, device_model_path: str | os.PathLike[str] = DEFAULT_DEVICE_MODEL_PATH
                     ) -> PowerProfile:
    """`model` (profile guessed from the board), `model:PROFILE` or `model:BUSY/IDLE` (watts)."""
    _, _, arg = spec.partition(":")
    if not arg:
        return PROFILES[guess_profile(device_model_path)]
    if arg in PROFILES:
        return PROFILES[arg]
    busy, sep, idle = arg.partition("/")
    try:
        if not sep:
            raise ValueError(arg)
        return PowerProfile(arg, float(idle), float(busy), "explicit watts")
    except ValueError as err:
        raise EnergyMeterError(f"unknown model meter {spec!r}: use model:PROFILE with PROFILE one of "
                               f"{', '.join(PROFILES)}, or model:BUSY/IDLE in watts (e.g. model:6.4/2.7)"
                               ) from err


def guess_profile(device_model_path: str | os.PathLike[str] = DEFAULT_DEVICE_MODEL_PATH) -> str:
    """Profile name for this board from the device tree model string; DEFAULT_PROFILE if unknown."""
    path = Path(device_model_path)
    if not path.exists():
        return DEFAULT_PROFILE
    model = _read_str(path)
    return next((prof for key, prof in _BOARD_PROFILES if key in model), DEFAULT_PROFILE)


# --- 6. Detection --------------------------------------------------------------------------------

MEASURED_METERS = ("rapl", "ina3221", "pi5-pmic", "battery")  # auto-detection order
METER_SPECS = ("auto", *MEASURED_METERS, "model", "model:PROFILE", "model:BUSY/IDLE")


@dataclass(frozen=True)
class MeterProbe:
    """One meter auto-detection tried: whether it works here and why (not)."""

    meter: str
    available: bool
    reason: str


@dataclass(frozen=True)
class Detection:
    meter: EnergyMeter
    tried: tuple[MeterProbe, ...]


@dataclass(frozen=True)
class _Sources:
    powercap_root: str | os.PathLike[str]
    hwmon_root: str | os.PathLike[str]
    i2c_root: str | os.PathLike[str]
    power_supply_root: str | os.PathLike[str]
    pmic_runner: Callable[[], str] | None
    device_model_path: str | os.PathLike[str]


def _build_battery(s: _Sources, auto: bool) -> EnergyMeter:
    # Auto is stricter: a battery without an energy/charge counter gives only sampled power_now,
    # which is no better a basis than the model estimate auto falls back to.
    return BatteryMeter(s.power_supply_root, require_counter=auto)


# name -> builder(sources, auto). A registry, not an if/elif chain: one line per meter.
_FACTORIES: dict[str, Callable[[_Sources, bool], EnergyMeter]] = {
    "rapl": lambda s, auto: RaplMeter(s.powercap_root),
    "ina3221": lambda s, auto: Ina3221Meter(s.hwmon_root, s.i2c_root),
    "pi5-pmic": lambda s, auto: Pi5PmicMeter(s.pmic_runner),
    "battery": _build_battery,
}


def detect(
    spec: str = "auto",
    *,
    powercap_root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT,
    hwmon_root: str | os.PathLike[str] = DEFAULT_HWMON_ROOT,
    i2c_root: str | os.PathLike[str] = DEFAULT_I2C_ROOT,
    power_supply_root: str | os.PathLike[str] = DEFAULT_POWER_SUPPLY_ROOT,
    pmic_runner: Callable[[], str] | None = None,
    device_model_path: str | os.PathLike[str] = DEFAULT_DEVICE_MODEL_PATH,
) -> Detection:
    """The meter for `spec` and what was tried. See `detect_meter`."""
    src = _Sources(powercap_root, hwmon_root, i2c_root, power_supply_root, pmic_runner, device_model_path)
    spec = spec.strip()
    if spec == "model" or spec.startswith("model:"):
        meter = ModelMeter.from_profile(parse_model_spec(spec, device_model_path=device_model_path))
        return Detection(meter, (MeterProbe(meter.name, True, meter.source),))
    if spec in _FACTORIES:
        try:
            meter = _FACTORIES[spec](src, False)
        except EnergyMeterError as err:  # forced: the user asked for it, so tell them why not
            raise EnergyMeterError(f"energy meter {spec!r} is not available: {err}") from err
        return Detection(meter, (MeterProbe(spec, True, meter.source),))
    if spec != "auto":
        raise EnergyMeterError(f"unknown energy meter {spec!r}: use one of {', '.join(METER_SPECS)}")
    tried = []
    for name in MEASURED_METERS:
        try:
            meter = _FACTORIES[name](src, True)
        except EnergyMeterError as err:
            tried.append(MeterProbe(name, False, str(err)))
            continue
        tried.append(MeterProbe(name, True, meter.source))
        return Detection(meter, tuple(tried))
    profile = PROFILES[guess_profile(device_model_path)]
    meter = ModelMeter.from_profile(profile)
    tried.append(MeterProbe(meter.name, True, f"fallback, estimated: {profile.note}"))
    return Detection(meter, tuple(tried))


def detect_meter(spec: str = "auto", **sources: Any) -> EnergyMeter:
    """The energy meter for `spec`: auto | rapl | ina3221 | pi5-pmic | battery | model[:...].

    `auto` takes the first measured meter that works (rapl, ina3221, pi5-pmic, battery with an
    energy/charge counter) and otherwise the model estimate for this board (labelled estimated).
    A forced meter that does not work raises EnergyMeterError with the reason. `sources` are
    `detect`'s keyword arguments (sysfs roots, PMIC runner), passed through unchanged.
    """
    return detect(spec, **sources).meter


# --- 6. Emulated board (simulator, demos) -----------------------------------------------------


class EmulatedMeter(EnergyMeter):
    """Joules of a board that is not here: busy watts x step time + idle watts x waiting time +
    radio joules per MB, each added by whoever drives the emulation (the simulator, a paced demo).

    Labelled `emulated:PROFILE` and `estimated`: it is a model of another machine, never a
    measurement. Monotonic, like every meter.
    """

    estimated = True

    def __init__(self, profile: str, *, busy_watts: float, idle_watts: float) -> None:
        if not (math.isfinite(busy_watts) and math.isfinite(idle_watts)) or not 0.0 <= idle_watts <= busy_watts:
            raise EnergyMeterError(f"emulated {profile}: need 0 <= idle ({idle_watts} W) <= busy ({busy_watts} W)")
        self.name = f"emulated:{profile}"
        self.source = f"emulated {profile}: busy {busy_watts:g} W, idle {idle_watts:g} W, link J/MB"
        self.busy_watts, self.idle_watts = busy_watts, idle_watts
        self.busy_j = self.idle_j = self.link_j = 0.0
        self.reserve: float | None = None  # emulated battery charge above its reserve; None = mains

    def reserve_fraction(self) -> float | None:
        return self.reserve

    def add_busy(self, seconds: float) -> None:
        self.busy_j += self.busy_watts * max(0.0, seconds)

    def add_idle(self, seconds: float) -> None:
        self.idle_j += self.idle_watts * max(0.0, seconds)

    def add_link(self, joules: float) -> None:
        self.link_j += max(0.0, joules)

    def joules(self) -> float:
        return self.busy_j + self.idle_j + self.link_j
