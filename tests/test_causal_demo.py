"""`tomtit demo` with causal-LM data (issue 13): the federation fine-tunes a language model, the
cloud scores held-out loss and stops at --target-loss, and the finale generates held-out
headlines on the device runtime with the base model and the final adapter. Tiny random Llama:
the real `--model smollm2-135m --data bbc-headlines` run is in the README."""
from __future__ import annotations

import json

from conftest import run_tomtit
from test_causal_lm import causal_bundle, headline_data, tiny_llama  # noqa: F401 - fixtures, shared


def test_causal_demo_lowers_held_out_loss_and_generates(tiny_llama, headline_data, tmp_path):  # noqa: F811
    out = tmp_path / "demo"
    r = run_tomtit(["demo", "--model", str(tiny_llama), "--data", str(headline_data), "--max-len", "48",
                    "--devices", "2", "--edges", "1", "--max-minutes", "1.5", "--target-loss", "5.5", "--lr", "1e-2",
                    "--headlines", "2", "--new-tokens", "4", "--out", str(out), "--json"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(r.stdout) == summary
    assert "as a causal LM" in r.stderr and json.loads((out / "bundle" / "manifest.json").read_text())["extra"][
        "task"] == "causal-lm"  # exported by the demo, as a causal LM
    c = summary["cloud"]
    assert c["task"] == "causal-lm" and c["evaluations"] >= 2
    first = json.loads((out / "cloud.json").read_text())["heldout_loss"][0]
    assert first["version"] == 0 and first["loss"] == c["loss_start"]  # the first score is the base model's
    assert c["stop_reason"] == "target loss 5.5 reached", c
    assert c["loss_end"] <= 5.5 < c["loss_start"]
    # no board emulation by default for a causal LM; every device trained and synced
    assert all(d["board"] is None and d["syncs"] >= 1 for d in summary["devices"].values())
    gen = summary["generation"]
    assert len(gen) == 2 and {g["group"] for g in gen} == {"business", "sport"}  # one per category first
    assert all(isinstance(g["base"], str) and isinstance(g["final"], str) and g["reference"] for g in gen)
    assert "headlines generated on the device runtime" in r.stderr
    peft_cfg = json.loads((out / "final-adapter-peft" / "adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "CAUSAL_LM"
    assert (out / "report.html").is_file()


def test_causal_model_with_classifier_data_is_refused(tmp_path):
    r = run_tomtit(["demo", "--model", "smollm2-135m", "--data", "bbc-news", "--out", str(tmp_path / "d")])
    assert r.returncode == 2 and "give it causal-LM --data" in r.stderr, r.stderr


def test_demo_reuses_a_given_bundle_of_the_right_task(causal_bundle, tmp_path):  # noqa: F811
    import argparse

    import pytest

    from tomtit.cli import CliError
    from tomtit.cli.demo_cmd import _export

    said = []
    args = argparse.Namespace(bundle=causal_bundle, data="bbc-headlines")
    _export(args, causal_bundle, True, said.append)  # a causal bundle for causal data: no export
    assert said == [f"[1/4] reusing bundle {causal_bundle}"]
    with pytest.raises(CliError, match="holds a causal-lm bundle"):
        _export(argparse.Namespace(bundle=causal_bundle, data="bbc-news"), causal_bundle, False, said.append)
    with pytest.raises(CliError, match="has no manifest.json"):
        _export(args, tmp_path, True, said.append)
