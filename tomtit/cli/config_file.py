"""`--config FILE` for a verb: a flat TOML file of the verb's own options.

Keys are the long option names with `_` for `-` (`--state-dir` -> `state_dir`), values TOML's own
types (strings, integers, floats, booleans, lists for repeatable options). A flag on the command
line overrides the file; the file overrides the parser's defaults. An unknown key, or a value of
the wrong type, is an error naming the key and its option. Relative paths are relative to the
config file's folder, so a config and the files it names travel together.

Everything is derived from the argparse parser's actions when it parses (not when `enable` is
called), so an option added to the verb later is covered without touching this module.
"""
from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path, PurePath

from tomtit.errors import TomtitError

# Options whose values are file paths although argparse keeps them as plain strings (they come
# from shared helpers such as add_broker_args). Options with type=Path are paths as well.
PATH_OPTIONS = frozenset({"data", "credentials", "tls_ca", "tls_cert", "tls_key"})
# Options a config file cannot set: they are about the command line itself.
_NOT_CONFIGURABLE = frozenset({"help", "version", "config"})


class ConfigFileError(TomtitError):
    """The --config file is unreadable, or names an unknown option, or gives one a wrong value."""


class _Default:
    """A default that argparse filled in (the user gave no flag): a config value may replace it.

    Shown as the plain default in help texts that format `%(default)s`.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return str(self.value)


@dataclass
class _Spec:
    """What `resolve` needs from the parser: its options (by config key) and the required ones."""

    parser: argparse.ArgumentParser
    prog: str
    required: dict  # dest -> the option string to name in an error


def enable(parser: argparse.ArgumentParser, *, prog: str = "") -> None:
    """Add `--config FILE` to `parser` (a verb's own parser; call `resolve(args)` first in its run).

    Required options become satisfiable from the file: argparse no longer requires them, `resolve`
    does. The defaults are marked just before each parse, so options added after this call are
    covered too.
    """
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a TOML file of these options (keys: the long option names with _ for -, "
                             "e.g. state_dir; relative paths are relative to the file); flags override it")
    spec = _Spec(parser=parser, prog=prog or parser.prog, required={})
    parser.set_defaults(_config_spec=spec)
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        _mark_defaults(spec)
        return parse(args, namespace)

    parser.parse_known_args = parse_known_args  # argparse's subparsers action calls exactly this


# Actions that only ever replace their value: their default can be marked. The others (append,
# extend, count) build on the value already there, so they keep their own default, and a value
# that is still that very object was not given.
_MARKABLE = (argparse._StoreAction, argparse._StoreConstAction, argparse.BooleanOptionalAction)


def _mark_defaults(spec: _Spec) -> None:
    for action in _options(spec.parser):
        if isinstance(action, _MARKABLE) and not isinstance(action.default, _Default):
            action.default = _Default(action.default)
        if action.required:
            action.required = False
            spec.required[action.dest] = _long_option(action)


def _options(parser: argparse.ArgumentParser):
    """The parser's configurable options: every optional action but help, version and --config."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if config_key(action) in _NOT_CONFIGURABLE:
            continue
        yield action


def _long_option(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def config_key(action: argparse.Action) -> str:
    """`--state-dir` -> `state_dir`: the key an option has in a config file."""
    return _long_option(action).lstrip("-").replace("-", "_")


def options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {config_key(a): a for a in _options(parser)}


def is_path_option(action: argparse.Action) -> bool:
    t = action.type
    return config_key(action) in PATH_OPTIONS or (isinstance(t, type) and issubclass(t, PurePath))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill `args` from `args.config` where no flag was given, then the parser's defaults; check
    the options argparse no longer requires. Returns `args` (changed in place)."""
    from tomtit.cli import CliError

    spec: _Spec | None = getattr(args, "_config_spec", None)
    if spec is None:
        return args
    values = {}
    if getattr(args, "config", None) is not None:
        values = load_config(args.config, spec.parser, prog=spec.prog)
    for action in _options(spec.parser):
        current = getattr(args, action.dest, None)
        if isinstance(action.default, _Default):
            if not isinstance(current, _Default):
                continue  # given on the command line: the flag wins
            default = current.value
            if isinstance(default, str) and action.type is not None:
                default = spec.parser._get_value(action, default)  # as argparse converts a string default
        elif current is action.default:
            default = current
        else:
            continue
        setattr(args, action.dest, values[action.dest] if action.dest in values else default)
    missing = [flag for dest, flag in spec.required.items() if getattr(args, dest, None) is None]
    if missing:
        keys = ", ".join(f.lstrip("-").replace("-", "_") for f in missing)
        raise CliError(f"{spec.prog}: give {', '.join(missing)} (or {keys} in a --config file)")
    return args


def load_config(path: str | Path, parser: argparse.ArgumentParser, *, prog: str = "") -> dict:
    """The file's values by argparse dest, converted and checked like the flags would be."""
    from tomtit.deploy._toml import read_toml
    from tomtit.deploy.errors import DeployError

    path = Path(path)
    try:
        raw = read_toml(path, "--config file")
    except DeployError as e:
        raise ConfigFileError(str(e)) from None
    return convert_values(raw, parser, base=path.resolve().parent, where=f"--config {path}", prog=prog or parser.prog)


def convert_values(raw: dict, parser: argparse.ArgumentParser, *, base: Path | None, where: str,
                   prog: str = "") -> dict:
    """Config values (key -> TOML value) -> argparse values (dest -> value); `base` anchors
    relative paths (None: keep them relative)."""
    by_key = options_by_key(parser)
    out = {}
    for key, value in raw.items():
        action = by_key.get(key)
        if action is None:
            hint = difflib.get_close_matches(key, list(by_key), n=1)
            raise ConfigFileError(
                f"{where}: unknown key {key!r}: not an option of {prog or parser.prog}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + "; keys are the long options with _ for - (e.g. state_dir)")
        out[action.dest] = _convert(action, key, value, base, where)
    return out


def _convert(action: argparse.Action, key: str, value, base: Path | None, where: str):
    flag = _long_option(action)

    def bad(expected: str):
        return ConfigFileError(f"{where}: {key} ({flag}) must be {expected}, not {_toml_repr(value)}")

    if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        # store_true / store_false / store_const: the key says whether the flag is given
        if not isinstance(value, bool):
            raise bad("true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else _unmarked(action.default)
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a count (an integer >= 0)")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise bad("a list")
        items = [_scalar(action, key, v, base, where, flag) for v in value]
        if action.nargs == "+" and not items:
            raise bad("a list of at least one value")
        return items
    if isinstance(action, argparse._StoreAction):
        return _scalar(action, key, value, base, where, flag)
    raise ConfigFileError(f"{where}: {key} ({flag}) cannot be set from a config file")


def _scalar(action: argparse.Action, key: str, value, base: Path | None, where: str, flag: str):
    t = action.type

    def bad(expected: str):
        return ConfigFileError(f"{where}: {key} ({flag}) must be {expected}, not {_toml_repr(value)}")

    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        out = value
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        out = float(value)
    else:  # strings, paths and any other type=callable: argparse would hand them a string
        if not isinstance(value, str):
            raise bad("a string")
        if is_path_option(action) and base is not None and not _names_a_dataset(key, value):
            value = str(base / Path(value).expanduser())  # absolute values stay as they are
        try:
            out = t(value) if t is not None else value
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigFileError(f"{where}: {key} ({flag}): {_toml_repr(value)} is not valid: {e}") from None
    if action.choices is not None and out not in action.choices:
        raise ConfigFileError(f"{where}: {key} ({flag}) must be one of "
                              f"{', '.join(map(repr, action.choices))}, not {_toml_repr(value)}")
    return out


def _names_a_dataset(key: str, value: str) -> bool:
    """`data = "bbc-news"` names a built-in data set, not a file next to the config."""
    if key != "data":
        return False
    from tomtit.data import BUILTIN_DATASETS

    return value in BUILTIN_DATASETS


def _unmarked(default):
    return default.value if isinstance(default, _Default) else default


def _toml_repr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Writing a config file

def toml_value(value) -> str:
    """One config value as TOML (strings, paths, numbers, booleans, lists of them)."""
    from tomtit.deploy._toml import toml_str

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} has no TOML form here")
        return repr(value)
    if isinstance(value, (str, PurePath)):
        return toml_str(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def render_config(parser: argparse.ArgumentParser, values: dict, *, header: str = "") -> str:
    """A config file of `parser`'s options: `values` (key -> value) set, every other option listed
    as a comment with its default and help, so the file documents what else can go in it."""
    by_key = options_by_key(parser)
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ConfigFileError(f"not options of {parser.prog}: {', '.join(unknown)}")
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    if lines:
        lines.append("")
    for key, action in by_key.items():
        help_ = " ".join((action.help or "").split())
        if help_ and "%(" in help_:
            try:
                help_ = help_ % {"default": _unmarked(action.default), "prog": parser.prog}
            except (KeyError, TypeError, ValueError):
                pass
        if key in values:
            lines.append(f"{key} = {toml_value(values[key])}" + (f"  # {help_}" if help_ else ""))
            continue
        default = _unmarked(action.default)
        shown = ""
        if default is not None and default is not argparse.SUPPRESS:
            try:
                shown = toml_value(default)
            except (TypeError, ValueError):
                shown = ""
        lines.append(f"# {key} = {shown}" + (f"  # {help_}" if help_ else "") if shown
                     else f"# {key} =" + (f"  # {help_}" if help_ else ""))
    return "\n".join(lines) + "\n"


def verb_parser(register, *path: str) -> argparse.ArgumentParser:
    """The parser of a sub-action, e.g. verb_parser(device_cmd.register, "run"): what a config
    file for `tomtit device run` is checked against."""
    parser = argparse.ArgumentParser(prog="tomtit device")
    register(parser)
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    # mark defaults now, as a parse would: render_config and resolve read them the same way
    spec = getattr(parser, "_defaults", {}).get("_config_spec")
    if spec is not None:
        _mark_defaults(spec)
    return parser


def read_toml_text(text: str) -> dict:
    """A config file's text -> its table (TOML errors as ConfigFileError)."""
    from tomtit.deploy._toml import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"not valid TOML: {e}") from None
