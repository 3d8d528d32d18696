import json
from collections import Counter

import numpy as np
import pytest

from tomtit.data import DataError, dirichlet_split, load_dataset
from conftest import run_tomtit


def test_bbc_news_reads_all_articles_with_sorted_classes():
    ds = load_dataset("bbc-news")
    assert len(ds) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(ds.labels)["sports"] == 511
    assert all(t and "\n" not in t for t in ds.texts)


def test_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": 2}\n')
    ds = load_dataset(j)
    assert ds.texts == ("a", "b") and ds.labels == ("x", "2")
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    ds = load_dataset(c, min_classes=2)
    assert ds.texts == ("hello, world", "bye") and ds.label_names == ("neg", "pos")


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.jsonl", "", "no examples"),
        ("nolabel.jsonl", '{"text": "a"}\n', "no 'label'"),
        ("blanklabel.jsonl", '{"text": "a", "label": ""}\n', "no 'label'"),
        ("notext.jsonl", '{"label": "a"}\n', "no 'text'"),
        ("bad.jsonl", '{"text": \n', "not valid JSON"),
        ("list.jsonl", '[1, 2]\n', "expected an object"),
        ("one.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "1 class"),
        ("hdr.csv", "body,label\nx,y\n", "lacks ['text']"),
        ("empty.csv", "", "is empty"),
        ("data.txt", "x", "unknown data format"),
    ],
)
def test_bad_data_is_rejected_with_a_reason(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(p, min_classes=2)


def test_missing_file():
    with pytest.raises(DataError, match="neither a file nor a built-in"):
        load_dataset("/nonexistent/file.jsonl")


def test_dirichlet_split_is_a_deterministic_partition():
    labels = tuple(np.repeat(["a", "b", "c", "d"], [100, 80, 60, 40]))
    s1 = dirichlet_split(labels, devices=5, alpha=0.3, seed=7, test_fraction=0.2)
    s2 = dirichlet_split(labels, devices=5, alpha=0.3, seed=7, test_fraction=0.2)
    assert s1 == s2
    everything = sorted(i for d in s1.device_indices for i in d) + list(s1.test_indices)
    assert sorted(everything) == list(range(len(labels)))  # disjoint and complete
    # stratified hold-out: round(n_c * 0.2) per class
    test_counts = Counter(labels[i] for i in s1.test_indices)
    assert test_counts == {"a": 20, "b": 16, "c": 12, "d": 8}
    assert all(len(d) > 0 for d in s1.device_indices)
    assert dirichlet_split(labels, devices=5, alpha=0.3, seed=8, test_fraction=0.2) != s1


def test_small_alpha_skews_labels_large_alpha_does_not():
    labels = tuple(np.repeat(["a", "b", "c", "d", "e"], 200))

    def mean_top_share(alpha):
        s = dirichlet_split(labels, devices=8, alpha=alpha, seed=1, test_fraction=0.0)
        shares = [Counter(labels[i] for i in d).most_common(1)[0][1] / len(d) for d in s.device_indices]
        return float(np.mean(shares))

    assert mean_top_share(0.1) > 0.7  # each device dominated by one class
    assert mean_top_share(1000.0) < 0.3  # close to the IID 0.2


def test_split_cli_writes_device_files(tmp_path, tiny_data):
    out = tmp_path / "split"
    r = run_tomtit(["data", "split", "--data", str(tiny_data), "--devices", "3", "--alpha", "0.5",
                    "--seed", "0", "--test-fraction", "0.25", "--out", str(out), "--json"])
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["device-00.jsonl", "device-01.jsonl", "device-02.jsonl", "split.json", "test.jsonl"]
    n = sum(len(p.read_text().splitlines()) for p in out.glob("*.jsonl"))
    assert n == 120
    assert json.loads(r.stdout)["test"] == {"alpha": 10, "beta": 10, "gamma": 10}
    r2 = run_tomtit(["data", "split", "--data", str(tiny_data), "--devices", "3", "--out", str(out)])
    assert r2.returncode == 2 and "not an empty folder" in r2.stderr
