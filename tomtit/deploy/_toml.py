"""TOML in and out: `tomllib` (3.11+, or `tomli` on 3.10) to read, a tiny writer for flat values."""
from __future__ import annotations

from pathlib import Path

from tomtit.deploy.errors import DeployError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (boards): the same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]


def read_toml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise DeployError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeployError(f"{what} {path} is not valid TOML: {e}") from None


def toml_str(value: str) -> str:
    """A TOML basic string. TOML forbids raw control characters (tab aside) and DEL in one."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
