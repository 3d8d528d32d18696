"""A board-like environment: its own venv with the stock `onnxruntime` wheel (the one aarch64
boards can pip install), no torch, no onnxruntime-training. The device commands must pick the
portable backend by themselves and train the same adapter as this environment does.

The venv is built once per test session from the package registry (pip's cache makes reruns
fast). Without a registry it skips on a developer's machine and fails in CI (CI=true).
"""
import json
import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_tomtit

BOARD_PACKAGES = ["onnxruntime==1.23.2", "numpy", "safetensors", "tokenizers", "paho-mqtt>=2,<3"]


@pytest.fixture(scope="session")
def board_python(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("board") / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *BOARD_PACKAGES],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        msg = f"cannot build the board-like venv (no package registry?): {r.stderr[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def board_tomtit(py: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(ROOT)  # the project's source, nothing from the main environment
    return subprocess.run([str(py), "-m", "tomtit", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(ROOT))


def test_board_env_has_no_training_build_and_no_torch(board_python):
    r = subprocess.run([str(board_python), "-c",
                        "import importlib.util as u, onnxruntime as o; "
                        "print(o.__version__, u.find_spec('torch') is None, u.find_spec('onnxruntime.training') is None)"],
                       capture_output=True, text=True)
    assert r.stdout.split() == ["1.23.2", "True", "True"], r.stderr


def test_board_trains_with_the_portable_backend_like_the_workstation(board_python, tiny_bundle, tiny_data, tmp_path):
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    args = ["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "20", "--lr", "1e-2", "--json"]
    board = board_tomtit(board_python, [*args, "--save-adapter", str(tmp_path / "board.safetensors")])
    assert board.returncode == 0, board.stderr[-3000:]
    out = json.loads(board.stdout)
    assert out["backend"] == "portable"  # chosen automatically: this onnxruntime has no training API
    here = run_tomtit([*args, "--backend", "portable", "--save-adapter", str(tmp_path / "here.safetensors")])
    assert here.returncode == 0, here.stderr[-3000:]
    m = load_manifest(tiny_bundle)
    a, b = load_adapter(tmp_path / "board.safetensors", m), load_adapter(tmp_path / "here.safetensors", m)
    np.testing.assert_allclose(a, b, atol=1e-4)  # onnxruntime 1.23.2 vs the 1.19.2 training build
    r = board_tomtit(board_python, ["infer", "--bundle", str(tiny_bundle), "--adapter",
                                    str(tmp_path / "board.safetensors"), "--json", "football goal team"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)[0]["label"] in ("alpha", "beta", "gamma")
