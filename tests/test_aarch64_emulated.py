"""The portable backend on an emulated aarch64 board: qemu-user-static runs Debian's arm64
python3.11 with the official aarch64 onnxruntime wheel (what `pip install 'tomtit[device]'` gets
on a Raspberry Pi). It must train the same adapter, with the same losses, as this x86 machine.

`.ci/prepare-arm64` builds the emulated environment (CI runs it); without it this test skips on a
developer's machine and fails in CI (CI=true).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_tomtit

ARM64 = Path(os.environ.get("TOMTIT_ARM64_DIR", ROOT / ".ci" / "arm64"))


@pytest.fixture(scope="module")
def arm64_python():
    py = ARM64 / "root" / "usr" / "bin" / "python3.11"
    if not (py.is_file() and (ARM64 / "site" / "onnxruntime").is_dir() and shutil.which("qemu-aarch64-static")):
        msg = f"no emulated aarch64 python at {ARM64}: run .ci/prepare-arm64"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def test_portable_training_on_emulated_aarch64_matches_x86(arm64_python, tiny_bundle, tiny_data, tmp_path):
    args = ["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "5", "--lr", "1e-2",
            "--json"]
    env = {"QEMU_LD_PREFIX": str(ARM64 / "root"), "PYTHONPATH": f"{ARM64 / 'site'}:{ROOT}",
           "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run(["qemu-aarch64-static", str(arm64_python), "-m", "tomtit", *args,
                        "--save-adapter", str(tmp_path / "arm.safetensors")],
                       capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    arm = json.loads(r.stdout)
    assert arm["backend"] == "portable"  # stock onnxruntime: no training API, chosen automatically
    x86 = run_tomtit([*args, "--backend", "portable", "--save-adapter", str(tmp_path / "x86.safetensors")])
    assert x86.returncode == 0, x86.stderr[-2000:]
    here = json.loads(x86.stdout)
    assert abs(arm["loss_first"] - here["loss_first"]) < 1e-5
    assert abs(arm["loss_last"] - here["loss_last"]) < 1e-4
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    m = load_manifest(tiny_bundle)
    np.testing.assert_allclose(load_adapter(tmp_path / "arm.safetensors", m),
                               load_adapter(tmp_path / "x86.safetensors", m), atol=1e-4)
