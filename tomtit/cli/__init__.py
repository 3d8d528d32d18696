"""The `tomtit` command: it only wires verbs; each verb lives in its own module.

Verb modules are imported lazily so `tomtit train` on a board never imports the export stack
(torch) and `tomtit --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util  # find_spec: `import importlib` alone does not load it (a clean venv has no .pth that does)
import sys

from tomtit.errors import TomtitError

# verb -> (module, help). Each module has `register(parser)` and `run(args) -> int`.
VERBS: dict[str, tuple[str, str]] = {
    "export": ("tomtit.cli.export_cmd", "workstation: pre-trained model -> on-device training bundle"),
    "data": ("tomtit.cli.data_cmd", "prepare data: non-IID device splits"),
    "train": ("tomtit.cli.train_cmd", "device: fine-tune the adapter locally (ORT, no torch)"),
    "generate": ("tomtit.cli.generate_cmd", "device: generate text with a causal-LM bundle (+ adapter), greedy, streaming"),
    "infer": ("tomtit.cli.infer_cmd", "device: classify texts with the bundle (+ adapter)"),
    "peft": ("tomtit.cli.peft_cmd", "workstation: Hugging Face PEFT adapter interop"),
    "energy": ("tomtit.cli.energy_cmd", "device: show the detected energy meter and a reading"),
    "device": ("tomtit.cli.device_cmd", "device: run the federated device agent over MQTT"),
    "node": ("tomtit.cli.node_cmd", "edge/cloud: run an aggregating node over MQTT"),
    "broker": ("tomtit.cli.broker_cmd", "run an MQTT broker (embedded or Mosquitto)"),
    "demo": ("tomtit.cli.demo_cmd", "one command: export, split, broker, cloud, edges, devices"),
    "simulate": ("tomtit.cli.simulate_cmd", "virtual-clock testbed: autonomous sync vs fixed schedules, real steps"),
    "monitor": ("tomtit.cli.monitor_cmd", "operator: live dashboard of a running deployment (read-only MQTT)"),
    "report": ("tomtit.cli.report_cmd", "plots, report.md and report.html from a run's summaries"),
    "deploy": ("tomtit.cli.deploy_cmd", "secured deployment: CA, Mosquitto configs and ACLs, per-identity credentials"),
}


class CliError(TomtitError):
    """A user-facing error: printed as one line, exit code 2."""


def _available_verbs() -> dict[str, tuple[str, str]]:
    out = {}
    for verb, (mod, help_) in VERBS.items():
        if importlib.util.find_spec(mod) is not None:
            out[verb] = (mod, help_)
    return out


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tomtit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    verbs = _available_verbs()
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for verb, (mod, help_) in verbs.items():
        p = sub.add_parser(verb, help=help_)
        if verb == wanted:  # only import the verb that runs
            module = importlib.import_module(mod)
            module.register(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except TomtitError as e:
        print(f"tomtit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
