"""Energy meters against fake sysfs trees and fixture command output.

Expected joules are worked out by hand in each test (units spelled out), never by asking the
meter under test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime import energy
from device_runtime.energy import (
    BatteryMeter,
    EnergyMeterError,
    Ina3221Meter,
    ModelMeter,
    Pi5PmicMeter,
    RaplMeter,
    detect,
    detect_meter,
    parse_model_spec,
    parse_pmic_adc,
)
from tomtit.cli import main as cli_main
from tomtit.errors import TomtitError

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `path` fail to open with EACCES, even as root (where chmod 000 does not stop reads)."""
    path.chmod(0)
    try:
        path.read_text()
    except PermissionError:
        return  # not root: the real permission check does it
    real = energy._read_sysfs

    def denying(p: Path) -> str:
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(energy, "_read_sysfs", denying)


# --- RAPL ----------------------------------------------------------------------------------------


def rapl_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = 262_143_328_850) -> Path:
    d = root / zone
    write(d / "name", name)
    write(d / "energy_uj", energy_uj)
    write(d / "max_energy_range_uj", max_uj)
    return d / "energy_uj"


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """/sys/class/powercap as the kernel lays it out: flat entries for zones and subzones."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type itself: no energy_uj
    rapl_zone(root, "intel-rapl:0", "package-0", 999_000, max_uj=1_000_000)
    rapl_zone(root, "intel-rapl:0:0", "core", 5_000)
    rapl_zone(root, "intel-rapl:0:1", "uncore", 7_000)
    rapl_zone(root, "intel-rapl:1", "package-1", 10)
    rapl_zone(root, "intel-rapl-mmio:0", "package-0", 123)  # same energy, second interface
    return root


def test_rapl_sums_packages_and_handles_wraparound(powercap: Path) -> None:
    meter = RaplMeter(powercap)
    assert meter.joules() == 0.0
    assert "intel-rapl:0:0" not in meter.source and "mmio" not in meter.source
    # package-0 wraps: 999_000 -> 1_000_000 is 1000 uJ, 1_000_000 -> 0 is 1 uJ, 0 -> 500 is 500.
    write(powercap / "intel-rapl:0" / "energy_uj", 500)
    write(powercap / "intel-rapl:1" / "energy_uj", 20_010)  # +20_000 uJ
    # Subzones and the mmio twin move too, and must not count.
    write(powercap / "intel-rapl:0:0" / "energy_uj", 9_000_000)
    write(powercap / "intel-rapl-mmio:0" / "energy_uj", 9_000_000)
    assert meter.joules() == pytest.approx((1000 + 1 + 500 + 20_000) * 1e-6)
    write(powercap / "intel-rapl:0" / "energy_uj", 2_500)  # +2000 uJ, no wrap
    assert meter.joules() == pytest.approx((1501 + 20_000 + 2_000) * 1e-6)


def test_rapl_uses_psys_only_without_packages(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    rapl_zone(root, "intel-rapl:0", "package-0", 0)
    rapl_zone(root, "intel-rapl:1", "psys", 0)  # contains package-0: would double count
    meter = RaplMeter(root)
    write(root / "intel-rapl:0" / "energy_uj", 1_000_000)
    write(root / "intel-rapl:1" / "energy_uj", 3_000_000)
    assert meter.joules() == pytest.approx(1.0)

    only_psys = tmp_path / "psys-only"
    rapl_zone(only_psys, "intel-rapl:1", "psys", 0)
    meter = RaplMeter(only_psys)
    write(only_psys / "intel-rapl:1" / "energy_uj", 3_000_000)
    assert meter.joules() == pytest.approx(3.0)


def test_rapl_unreadable_energy_is_not_available_with_reason(
    powercap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_unreadable(powercap / "intel-rapl:1" / "energy_uj", monkeypatch)
    with pytest.raises(EnergyMeterError) as err:
        RaplMeter(powercap)
    msg = str(err.value)
    assert "intel-rapl:1/energy_uj" in msg and "permission denied" in msg and "chmod a+r" in msg
    assert isinstance(err.value, TomtitError)


def test_rapl_read_error_mid_run_raises_and_keeps_state(
    powercap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = RaplMeter(powercap)
    write(powercap / "intel-rapl:1" / "energy_uj", 1_010)  # +1000 uJ
    assert meter.joules() == pytest.approx(1e-3)
    write(powercap / "intel-rapl:0" / "energy_uj", 999_100)  # +100 uJ, read but not yet committed
    make_unreadable(powercap / "intel-rapl:1" / "energy_uj", monkeypatch)
    with pytest.raises(EnergyMeterError, match="permission denied"):
        meter.joules()
    monkeypatch.setattr(energy, "_read_sysfs", Path.read_text)
    (powercap / "intel-rapl:1" / "energy_uj").chmod(0o644)
    assert meter.joules() == pytest.approx(1.1e-3)  # the 100 uJ counted exactly once


def test_rapl_missing_tree() -> None:
    with pytest.raises(EnergyMeterError, match="no powercap RAPL"):
        RaplMeter("/nonexistent/powercap")


@settings(max_examples=25, deadline=None)
@given(
    max_uj=st.integers(min_value=10, max_value=10**12),
    start_frac=st.floats(min_value=0, max_value=1),
    step_fracs=st.lists(st.floats(min_value=0, max_value=1), max_size=12),
)
def test_rapl_monotonic_and_exact_over_wraps(max_uj: int, start_frac: float, step_fracs: list[float]) -> None:
    # True increments are chosen first (each below one full counter period), the counter is derived
    # from them modulo the period, and the meter must recover exactly their sum.
    period = max_uj + 1
    start = int(start_frac * max_uj)
    steps = [int(f * max_uj) for f in step_fracs]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = rapl_zone(root, "intel-rapl:0", "package-0", start, max_uj=max_uj)
        meter = RaplMeter(root)
        counter, true_total, last = start, 0, 0.0
        for step in steps:
            counter = (counter + step) % period
            true_total += step
            write(path, counter)
            j = meter.joules()
            assert j >= last
            assert j == pytest.approx(true_total * 1e-6, abs=1e-9)
            last = j


# --- INA3221 -------------------------------------------------------------------------------------


def hwmon_ina(root: Path, name: str, labels: dict[int, str], mv: dict[int, int], ma: dict[int, int]) -> Path:
    d = root / name
    write(d / "name", "ina3221")
    for n, label in labels.items():
        write(d / f"in{n}_label", label)
        write(d / f"in{n}_input", mv[n])
        write(d / f"curr{n}_input", ma[n])
    # Shunt voltages (uV) and the summed current: must never be paired as V x I.
    for n in (4, 5, 6, 7):
        write(d / f"in{n}_input", 40_000)
    write(d / "curr4_input", 99_999)
    return d


def test_ina3221_hwmon_counts_only_the_input_rail(tmp_path: Path) -> None:
    hw = tmp_path / "hwmon"
    write(hw / "hwmon0" / "name", "coretemp")
    write(hw / "hwmon0" / "temp1_input", 45_000)
    d = hwmon_ina(hw, "hwmon3", {1: "VDD_IN", 2: "VDD_CPU_GPU_CV", 3: "VDD_SOC"},
                  mv={1: 5_000, 2: 5_000, 3: 5_000}, ma={1: 1_200, 2: 400, 3: 300})
    clock = FakeClock()
    meter = Ina3221Meter(hw, tmp_path / "no-i2c", clock=clock)
    assert meter.watts() == pytest.approx(5.0 * 1.2)  # 5000 mV x 1200 mA = 6 W; branches ignored
    clock.t += 2.0
    write(d / "curr1_input", 1_800)  # now 9 W
    assert meter.joules() == pytest.approx((6.0 + 9.0) / 2 * 2.0)  # trapezoid: 15 J
    clock.t += 1.0
    assert meter.joules() == pytest.approx(15.0 + 9.0)


def test_ina3221_hwmon_sums_all_without_input_rail_and_skips_disabled(tmp_path: Path) -> None:
    hw = tmp_path / "hwmon"
    d = hwmon_ina(hw, "hwmon1", {1: "GPU", 2: "CPU", 3: "SOC"},
                  mv={1: 19_000, 2: 19_000, 3: 19_000}, ma={1: 100, 2: 200, 3: 300})
    write(d / "in3_enable", 0)
    (d / "in3_input").unlink()  # a disabled channel has no reading
    meter = Ina3221Meter(hw, tmp_path / "no-i2c", clock=FakeClock())
    assert meter.watts() == pytest.approx(19.0 * 0.1 + 19.0 * 0.2)  # 1.9 W + 3.8 W


def test_ina3221_prefers_power_file_over_v_times_i(tmp_path: Path) -> None:
    hw = tmp_path / "hwmon"
    d = hwmon_ina(hw, "hwmon2", {1: "VDD_IN"}, mv={1: 5_000}, ma={1: 1_000})  # V x I = 5 W
    write(d / "power1_input", 4_500_000)  # uW: 4.5 W
    meter = Ina3221Meter(hw, tmp_path / "no-i2c", clock=FakeClock())
    assert meter.watts() == pytest.approx(4.5)


def test_ina3221_l4t_iio_power_in_milliwatts(tmp_path: Path) -> None:
    i2c = tmp_path / "ina3221x"
    dev = i2c / "6-0040" / "iio:device0"
    for n, (rail, mw) in enumerate([("POM_5V_IN", 3_000), ("POM_5V_GPU", 500), ("POM_5V_CPU", 900)]):
        write(dev / f"rail_name_{n}", rail)
        write(dev / f"in_power{n}_input", mw)
    clock = FakeClock()
    meter = Ina3221Meter(tmp_path / "no-hwmon", i2c, clock=clock)
    assert meter.watts() == pytest.approx(3.0)  # only POM_5V_IN, 3000 mW
    clock.t += 0.5
    assert meter.joules() == pytest.approx(1.5)


def test_ina3221_l4t_iio_v_times_i(tmp_path: Path) -> None:
    i2c = tmp_path / "ina3221x"
    dev = i2c / "1-0041" / "iio:device1"
    write(dev / "rail_name_0", "VDD_IN")
    write(dev / "in_voltage0_input", 5_080)  # mV
    write(dev / "in_current0_input", 640)  # mA
    meter = Ina3221Meter(tmp_path / "no-hwmon", i2c, clock=FakeClock())
    assert meter.watts() == pytest.approx(5.08 * 0.64)


def test_ina3221_absent(tmp_path: Path) -> None:
    hw = tmp_path / "hwmon"
    write(hw / "hwmon0" / "name", "nvme")
    with pytest.raises(EnergyMeterError, match="no INA3221"):
        Ina3221Meter(hw, tmp_path / "none")


# --- Raspberry Pi 5 PMIC -------------------------------------------------------------------------

PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05172000A
       1V8_SYS_A current(2)=0.19909640A
      DDR_VDD2_A current(3)=0.01952000A
      DDR_VDDQ_A current(4)=0.00000000A
       1V1_SYS_A current(5)=0.18008000A
       0V8_SW_A current(6)=0.32108000A
     VDD_CORE_A current(7)=2.01842000A
     3V7_WL_SW_V volt(8)=3.72000000V
       3V3_SYS_V volt(9)=3.31245600V
       1V8_SYS_V volt(10)=1.80537600V
      DDR_VDD2_V volt(11)=1.11192400V
      DDR_VDDQ_V volt(12)=0.60659020V
       1V1_SYS_V volt(13)=1.10705600V
       0V8_SW_V volt(14)=0.80391890V
     VDD_CORE_V volt(15)=0.84124960V
         EXT5V_V volt(24)=5.14682000V
          BATT_V volt(25)=0.00000000V
"""
# Sum of current x voltage over the 8 paired rails, by hand from the lines above.
PMIC_WATTS = (0.0 * 3.72 + 0.05172 * 3.312456 + 0.1990964 * 1.805376 + 0.01952 * 1.111924
              + 0.0 * 0.6065902 + 0.18008 * 1.107056 + 0.32108 * 0.8039189 + 2.01842 * 0.8412496)


def test_pmic_parse_pairs_rails_by_name() -> None:
    rails = parse_pmic_adc(PMIC_OUTPUT)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "1V8_SYS", "DDR_VDD2", "DDR_VDDQ", "1V1_SYS",
                          "0V8_SW", "VDD_CORE"}  # EXT5V and BATT have no current
    assert rails["VDD_CORE"] == pytest.approx(2.01842 * 0.8412496)
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)


def test_pmic_parse_older_format() -> None:
    assert parse_pmic_adc("VDD_CORE_V=0.8750V\nVDD_CORE_A=1.2000A\n") == {"VDD_CORE": pytest.approx(1.05)}


def test_pmic_meter_integrates_runner_output() -> None:
    outputs = [PMIC_OUTPUT, PMIC_OUTPUT.replace("2.01842000A", "3.01842000A")]
    clock = FakeClock()
    meter = Pi5PmicMeter(runner=lambda: outputs[0], clock=clock)
    assert meter.source == "vcgencmd pmic_read_adc"
    outputs.pop(0)
    clock.t += 4.0
    higher = PMIC_WATTS + 1.0 * 0.8412496  # one more amp on VDD_CORE
    assert meter.joules() == pytest.approx((PMIC_WATTS + higher) / 2 * 4.0)


def test_pmic_not_a_pi5() -> None:
    with pytest.raises(EnergyMeterError, match="not a Raspberry Pi 5"):
        Pi5PmicMeter(runner=lambda: 'error=2 error_msg="Command not registered"\n')


def test_pmic_default_runner_without_vcgencmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnergyMeterError, match="vcgencmd not found"):
        Pi5PmicMeter()


def test_pmic_default_runner_runs_vcgencmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = write(tmp_path / "pmic.txt", PMIC_OUTPUT)
    script = tmp_path / "bin" / "vcgencmd"
    # A Python script, so PATH can hold only this directory (no `cat` needed).
    write(script, f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['pmic_read_adc']\n"
                  f"print(open({str(fixture)!r}).read(), end='')")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))
    assert Pi5PmicMeter().watts() == pytest.approx(PMIC_WATTS)


# --- Battery -------------------------------------------------------------------------------------


def battery(root: Path, name: str = "BAT0", status: str = "Discharging", **files: int) -> Path:
    d = root / name
    write(d / "type", "Battery")
    write(d / "status", status)
    for key, value in files.items():
        write(d / key, value)
    return d


def test_battery_energy_counter_counts_only_while_discharging(tmp_path: Path) -> None:
    ps = tmp_path / "power_supply"
    write(ps / "AC" / "type", "Mains")
    write(ps / "hidpp_battery_0" / "type", "Battery")  # a wireless mouse
    write(ps / "hidpp_battery_0" / "scope", "Device")
    write(ps / "hidpp_battery_0" / "status", "Discharging")
    write(ps / "hidpp_battery_0" / "capacity", 5)
    bat = battery(ps, energy_now=50_000_000, energy_full=60_000_000, capacity=83)
    meter = BatteryMeter(ps, clock=FakeClock())
    assert "hidpp" not in meter.source
    assert meter.reserve_fraction() == pytest.approx(0.83)
    write(bat / "energy_now", 49_999_000)  # -1000 uWh = 1000 x 3.6e-3 J
    assert meter.joules() == pytest.approx(3.6)
    write(bat / "status", "Charging")
    write(bat / "energy_now", 52_000_000)
    assert meter.joules() == pytest.approx(3.6)  # charging: no increase (and no decrease)
    write(bat / "status", "Discharging")
    write(bat / "energy_now", 51_998_000)  # -2000 uWh from the new level
    assert meter.joules() == pytest.approx(3.6 + 7.2)


def test_battery_reserve_from_energy_when_no_capacity(tmp_path: Path) -> None:
    ps = tmp_path / "ps"
    battery(ps, energy_now=30_000_000, energy_full=40_000_000)
    assert BatteryMeter(ps).reserve_fraction() == pytest.approx(0.75)


def test_battery_charge_counter_times_present_voltage(tmp_path: Path) -> None:
    ps = tmp_path / "ps"
    bat = battery(ps, charge_now=4_000_000, charge_full=5_000_000, voltage_now=11_400_000)
    meter = BatteryMeter(ps, clock=FakeClock())
    assert meter.reserve_fraction() is None  # no capacity, no energy_now/energy_full
    write(bat / "voltage_now", 11_000_000)  # voltage sags under load: not consumption by itself
    assert meter.joules() == 0.0
    write(bat / "charge_now", 3_900_000)  # -0.1 Ah at 11.1 V = 1.11 Wh = 3996 J
    write(bat / "voltage_now", 11_100_000)
    assert meter.joules() == pytest.approx(0.1 * 11.1 * 3600)


def test_battery_power_stopgap_between_coarse_counter_updates(tmp_path: Path) -> None:
    ps = tmp_path / "ps"
    bat = battery(ps, energy_now=50_000_000, power_now=10_000_000)  # 10 W
    clock = FakeClock()
    meter = BatteryMeter(ps, clock=clock)
    clock.t += 0.1
    assert meter.joules() == pytest.approx(1.0)  # counter unchanged: 10 W x 0.1 s
    clock.t += 0.4
    assert meter.joules() == pytest.approx(5.0)  # still the stopgap: 10 W x 0.5 s
    write(bat / "energy_now", 49_999_000)  # counter says 3.6 J: below the 5 J already shown
    clock.t += 0.1
    assert meter.joules() == pytest.approx(5.0)  # held, neither back nor double counted
    clock.t += 0.1
    assert meter.joules() == pytest.approx(5.0)  # stopgap since the change: 3.6 + 1 < 5
    clock.t += 0.3
    assert meter.joules() == pytest.approx(3.6 + 10.0 * 0.4)  # 7.6 J: now above the hold
    write(bat / "energy_now", 49_998_000)  # another 3.6 J: total by counter 7.2 J
    clock.t += 0.1
    assert meter.joules() == pytest.approx(7.6)  # the counter replaces the stopgap, held
    clock.t += 0.1
    assert meter.joules() == pytest.approx(7.2 + 10.0 * 0.1)  # 8.2 J: counter + new stopgap


def test_battery_without_counter_forced_ok_auto_skips(tmp_path: Path) -> None:
    ps = tmp_path / "ps"
    battery(ps, power_now=7_000_000, capacity=50)
    assert BatteryMeter(ps).reserve_fraction() == pytest.approx(0.5)
    sources = {**absent_sources(tmp_path), "power_supply_root": ps}
    det = detect("auto", **sources)
    assert det.meter.estimated
    skipped = {p.meter: p for p in det.tried}["battery"]
    assert not skipped.available and "no energy_now or charge_now" in skipped.reason
    assert isinstance(detect_meter("battery", **sources), BatteryMeter)


def test_battery_absent(tmp_path: Path) -> None:
    write(tmp_path / "ps" / "AC" / "type", "Mains")
    with pytest.raises(EnergyMeterError, match="no battery"):
        BatteryMeter(tmp_path / "ps")


@settings(max_examples=20, deadline=None)  # each example writes files: keep the suite fast
@given(st.lists(st.tuples(st.sampled_from(["Discharging", "Charging", "Full"]),
                          st.integers(min_value=-5_000, max_value=5_000),
                          st.integers(min_value=0, max_value=30_000_000),
                          st.floats(min_value=0, max_value=5)), max_size=10))
def test_battery_joules_never_decrease(steps: list[tuple[str, int, int, float]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ps = Path(tmp)
        level = 50_000_000
        bat = battery(ps, energy_now=level, power_now=5_000_000)
        clock = FakeClock()
        meter = BatteryMeter(ps, clock=clock)
        last = 0.0
        for status, delta, power_uw, dt in steps:
            level += delta
            write(bat / "status", status)
            write(bat / "energy_now", level)
            write(bat / "power_now", power_uw)
            clock.t += dt
            j = meter.joules()
            assert j >= last
            last = j


# --- Model ---------------------------------------------------------------------------------------


def test_model_meter_idle_plus_busy_share() -> None:
    clock, cpu = FakeClock(0.0), FakeClock(0.0)
    meter = ModelMeter(6.4, 2.7, cores=4, cpu_time=cpu, clock=clock)
    assert meter.estimated and meter.name == "model:6.4/2.7"
    clock.t, cpu.t = 10.0, 20.0  # two of four cores busy for 10 s: 5 device-seconds busy
    assert meter.joules() == pytest.approx(2.7 * 10 + (6.4 - 2.7) * 5)  # 45.5 J
    clock.t, cpu.t = 11.0, 30.0  # 10 core-seconds in 1 s on 4 cores: capped at fully busy
    assert meter.joules() == pytest.approx(45.5 + 6.4)
    clock.t = 10.0  # an injected clock going backwards must not take energy back
    assert meter.joules() == pytest.approx(51.9)


def test_model_profiles_and_specs(tmp_path: Path) -> None:
    assert parse_model_spec("model:rpi4").busy_watts == 6.4
    explicit = parse_model_spec("model:7/2.5")
    assert (explicit.busy_watts, explicit.idle_watts) == (7.0, 2.5)
    dt_model = tmp_path / "model"
    dt_model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert parse_model_spec("model", device_model_path=dt_model).name == "rpi5"
    assert parse_model_spec("model", device_model_path=tmp_path / "absent").name == "laptop"
    with pytest.raises(EnergyMeterError, match="idle"):
        parse_model_spec("model:2/5")  # idle above busy
    with pytest.raises(EnergyMeterError, match="rpi4, rpi5"):
        parse_model_spec("model:toaster")
    meter = detect_meter("model:jetson-nano")
    assert meter.estimated and meter.name == "model:jetson-nano"


# --- Detection -----------------------------------------------------------------------------------


def no_pmic() -> str:
    raise EnergyMeterError("vcgencmd not found on PATH")


def absent_sources(tmp_path: Path) -> dict[str, object]:
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return dict(powercap_root=empty / "powercap", hwmon_root=empty / "hwmon", i2c_root=empty / "i2c",
                power_supply_root=empty / "ps", pmic_runner=no_pmic,
                device_model_path=empty / "model")


def test_auto_order_and_fallback(tmp_path: Path, powercap: Path) -> None:
    hw = tmp_path / "hwmon"
    hwmon_ina(hw, "hwmon0", {1: "VDD_IN"}, mv={1: 5_000}, ma={1: 1_000})
    ps = tmp_path / "ps"
    battery(ps, energy_now=1_000_000)
    everything = {**absent_sources(tmp_path), "powercap_root": powercap, "hwmon_root": hw,
                  "pmic_runner": lambda: PMIC_OUTPUT, "power_supply_root": ps}

    def chosen(**over: object) -> list[str]:
        det = detect("auto", **{**everything, **over})
        return [p.meter for p in det.tried]

    assert chosen() == ["rapl"]
    assert chosen(powercap_root=tmp_path / "x") == ["rapl", "ina3221"]
    assert chosen(powercap_root=tmp_path / "x", hwmon_root=tmp_path / "x") == ["rapl", "ina3221", "pi5-pmic"]
    assert chosen(powercap_root=tmp_path / "x", hwmon_root=tmp_path / "x", pmic_runner=no_pmic) == [
        "rapl", "ina3221", "pi5-pmic", "battery"]

    det = detect("auto", **absent_sources(tmp_path))
    assert det.meter.estimated and det.meter.name == "model:laptop"
    assert [(p.meter, p.available) for p in det.tried] == [
        ("rapl", False), ("ina3221", False), ("pi5-pmic", False), ("battery", False), ("model:laptop", True)]
    assert "vcgencmd not found" in det.tried[2].reason


def test_auto_skips_unreadable_rapl_with_reason(
    tmp_path: Path, powercap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_unreadable(powercap / "intel-rapl:0" / "energy_uj", monkeypatch)
    dt_model = tmp_path / "dt-model"
    dt_model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    det = detect("auto", **{**absent_sources(tmp_path), "powercap_root": powercap,
                            "device_model_path": dt_model})
    assert det.meter.name == "model:rpi4"  # the fallback fits the board
    assert "permission denied" in det.tried[0].reason


def test_forced_unavailable_meter_names_why(tmp_path: Path) -> None:
    with pytest.raises(EnergyMeterError) as err:
        detect_meter("ina3221", **absent_sources(tmp_path))
    assert "'ina3221' is not available" in str(err.value) and "no INA3221" in str(err.value)
    with pytest.raises(EnergyMeterError, match="unknown energy meter 'nvml'"):
        detect_meter("nvml")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["energy", "--meter", "model:rpi5", "--seconds", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meter"] == "model:rpi5" and out["estimated"] is True
    assert out["seconds"] >= 0.1 and out["joules"] >= 2.7 * 0.1 * 0.99  # at least the idle floor
    assert out["watts"] == pytest.approx(out["joules"] / out["seconds"])


def test_cli_text_and_forced_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["energy", "--meter", "model:laptop", "--seconds", "0.05"]) == 0
    assert "ESTIMATED" in capsys.readouterr().out
    assert cli_main(["energy", "--meter", "model:toaster", "--seconds", "0.05"]) == 2
    assert "unknown model meter 'model:toaster'" in capsys.readouterr().err
    assert cli_main(["energy", "--seconds", "-1"]) == 2
    assert "--seconds" in capsys.readouterr().err


def test_cli_json_subprocess() -> None:
    done = subprocess.run([sys.executable, "-m", "tomtit", "energy", "--json", "--seconds", "0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(done.stdout)
    assert {"meter", "estimated", "source", "joules", "watts", "seconds", "reserve_fraction",
            "tried"} <= set(out)
    assert isinstance(out["meter"], str) and out["meter"]
    assert out["tried"] and out["tried"][-1]["available"] is True
    assert out["tried"][-1]["meter"] == out["meter"]
    assert out["joules"] >= 0.0
