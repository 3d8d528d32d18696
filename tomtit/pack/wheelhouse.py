"""A wheelhouse for another machine: tomtit's own wheel, the wheels of an extra (`device`) for a
target platform and Python, and pip itself, so a board with no index can install them.

`pip download --platform/--python-version/--abi` picks wheels by their tags, but pip evaluates
environment markers (`tomli; python_version < '3.11'`, `hf-xet; platform_machine == 'aarch64'`)
against the Python that runs it, not the target. So pip runs here with its marker environment set
to the target's (a small shim around pip's own entry point). If a pip version changes that
internal, the shim says so, and install.sh's `pip install --require-hashes` on the board still
refuses a lock that lacks a dependency: a wrong wheelhouse fails at install, never silently.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tomtit.fsutil import sha256_file
from tomtit.pack import PackError


@dataclass(frozen=True)
class Platform:
    name: str  # linux-aarch64 | linux-x86_64
    machine: str  # platform.machine() on the board
    oldest_glibc_minor: int  # manylinux_2_N tags start here (2_17 is the first aarch64 one)
    legacy_tags: tuple[str, ...]  # manylinux2014 and older aliases

    def tags(self, glibc: tuple[int, int]) -> list[str]:
        """pip --platform values: every manylinux tag a board with this glibc can run, newest first."""
        major, minor = glibc
        if major != 2 or minor < self.oldest_glibc_minor:
            raise PackError(f"glibc {major}.{minor} is older than any manylinux wheel for {self.name}")
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(minor, self.oldest_glibc_minor - 1, -1)]
        return tags + [t for t in self.legacy_tags]


PLATFORMS = {
    "linux-aarch64": Platform("linux-aarch64", "aarch64", 17, ("manylinux2014_aarch64",)),
    "linux-x86_64": Platform("linux-x86_64", "x86_64", 5,
                             ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")),
}

# Run pip with the target's marker environment (see the module docstring).
_PIP_SHIM = r"""
import json, sys
target = json.loads(sys.argv.pop(1))
try:
    from pip._vendor.packaging import markers
    _host = markers.default_environment
    def default_environment():
        env = _host()
        env.update(target)
        return env
    markers.default_environment = default_environment
except Exception as e:
    print(f"tomtit pack: WARNING: could not set pip's marker environment ({e}); markers are "
          f"evaluated for this machine", file=sys.stderr)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def marker_environment(platform: Platform, python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_version": f"{python}.0",
            "platform_machine": platform.machine, "platform_system": "Linux", "sys_platform": "linux",
            "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def parse_python(python: str) -> tuple[int, int]:
    m = re.fullmatch(r"3\.(\d{1,2})", python)
    if not m:
        raise PackError(f"--python must be like 3.11, not {python!r}")
    return 3, int(m.group(1))


def download(requirements: list[str], dest: Path, *, platform: Platform, python: str, glibc: tuple[int, int],
             find_links: tuple[str, ...] = (), no_index: bool = False, log=print) -> None:
    """pip download, binary wheels only, for `platform` and CPython `python`, into `dest`."""
    major, minor = parse_python(python)
    cmd = [sys.executable, "-c", _PIP_SHIM, json.dumps(marker_environment(platform, python)),
           "download", "--dest", str(dest), "--only-binary=:all:", "--progress-bar", "off",
           "--disable-pip-version-check", "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for tag in platform.tags(glibc):
        cmd += ["--platform", tag]
    for fl in find_links:
        cmd += ["--find-links", str(fl)]
    if no_index:
        cmd.append("--no-index")
    cmd += requirements
    log(f"pip download for {platform.name} boards with CPython {python} and glibc >= {glibc[0]}.{glibc[1]}: "
        f"{' '.join(requirements)}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(line for line in r.stderr.splitlines() if "is ignored: it is neither" not in line)[-3000:]
        raise PackError(f"pip download for {platform.name} / Python {python} failed:\n{tail}")


def source_root() -> Path | None:
    """The checkout this tomtit runs from (a folder with tomtit's pyproject.toml), or None."""
    import tomtit

    root = Path(tomtit.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"tomtit"', pyproject.read_text(), re.M):
        return root
    return None


def source_revision(root: Path | None) -> str:
    """`git:SHA` (`+dirty` with local changes) of the checkout, or "" when it is no git checkout."""
    if root is None or not (root / ".git").exists():
        return ""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f"git:{sha}{'+dirty' if dirty else ''}" if sha else ""


def build_tomtit_wheel(dest: Path, *, log=print) -> Path:
    """A wheel of this tomtit, built from a copy of its checkout (the checkout itself is left alone:
    no build/ or egg-info written into it)."""
    root = source_root()
    if root is None:
        raise PackError("this tomtit is not run from its source checkout, so no wheel of it can be built here: "
                        "give --tomtit-wheel FILE (a wheel of the same tomtit)")
    packages = _setuptools_packages(root)
    with tempfile.TemporaryDirectory(prefix="tomtit-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        for pkg in packages:
            shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
               "-w", str(dest)]
        if _has_setuptools():
            cmd.append("--no-build-isolation")  # this machine's setuptools: no index needed to build
        log(f"building the tomtit wheel from {root}")
        r = subprocess.run([*cmd, str(src)], capture_output=True, text=True)
        if r.returncode != 0:
            raise PackError(f"building the tomtit wheel failed:\n{r.stderr[-3000:]}")
    wheels = sorted(dest.glob("tomtit-*.whl"))
    if len(wheels) != 1:
        raise PackError(f"expected one tomtit wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _setuptools_packages(root: Path) -> list[str]:
    """Top-level package folders named by pyproject's [tool.setuptools.packages.find] include."""
    from tomtit.deploy._toml import tomllib

    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    include = cfg.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", [])
    names = sorted({pat.rstrip("*").rstrip(".") for pat in include})
    found = [n for n in names if (root / n / "__init__.py").is_file()]
    if "tomtit" not in found:
        raise PackError(f"{root}/pyproject.toml: cannot tell which package folders make the tomtit wheel")
    return found


def _has_setuptools() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    try:
        return int(setuptools.__version__.split(".")[0]) >= 68
    except ValueError:
        return False


@dataclass(frozen=True)
class Wheel:
    file: str
    name: str  # normalised project name
    version: str
    sha256: str


def wheel_name(filename: str) -> tuple[str, str]:
    m = _WHEEL_NAME.match(filename)
    if not m:
        raise PackError(f"{filename} is not a wheel file name")
    return re.sub(r"[-_.]+", "-", m.group("name")).lower(), m.group("version")


def list_wheels(folder: Path) -> list[Wheel]:
    out = []
    for f in sorted(folder.iterdir()):
        if not f.name.endswith(".whl"):
            raise PackError(f"{f.name} in the wheelhouse is not a wheel (pip downloaded a source archive?)")
        name, version = wheel_name(f.name)
        out.append(Wheel(file=f.name, name=name, version=version, sha256=sha256_file(f)))
    return out


def render_lock(wheels: list[Wheel], *, top: str) -> str:
    """requirements.txt: every wheel pinned to its version and sha256; `top` (e.g. tomtit[device])
    carries its extra. pip --require-hashes installs exactly these, and fails on anything missing."""
    lines = ["# The pack's lock: exactly the wheels in wheelhouse/, by version and sha256.",
             "# install.sh: pip install --no-index --find-links wheelhouse --require-hashes -r requirements.txt"]
    by_name: dict[str, list[Wheel]] = {}
    for w in wheels:
        by_name.setdefault(w.name, []).append(w)
    top_name = re.sub(r"\[.*\]$", "", top)
    for name, ws in sorted(by_name.items()):
        if len({w.version for w in ws}) != 1:
            raise PackError(f"the wheelhouse holds {name} in versions {sorted({w.version for w in ws})}")
        req = top if name == top_name else name
        hashes = " ".join(f"--hash=sha256:{w.sha256}" for w in ws)
        lines.append(f"{req}=={ws[0].version} {hashes}")
    return "\n".join(lines) + "\n"


def pip_wheel(wheels: list[Wheel]) -> Wheel:
    pips = [w for w in wheels if w.name == "pip"]
    if len(pips) != 1:
        raise PackError("the wheelhouse must hold exactly one pip wheel (the board bootstraps its venv with it)")
    return pips[0]

