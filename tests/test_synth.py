"""`shardgen manifest synth`: balanced, split, shuffled, labelled, deterministic; the experiment
runs end to end at a tiny size. (The card of a synthetic output: tests/test_webdataset.py, which
shares its output.)"""

from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.errors import SpecError
from pipeline.synth import evaluate
from pipeline.synth import manifest as sm

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
TEMPLATES = sm.TemplateSet(
    templates=["{a_colour} {class} on {a_background} background", "a picture of {a_class}, {style}"],
    slots={"colour": ["red", "orange", "blue"], "background": ["red", "white", "blue"], "style": ["flat", "drawn"]},
    distinct=[["colour", "background"]],
)
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _build(seed=0, per_class=50, **kwargs):
    return sm.build([sm.ClassDef(name=s) for s in SHAPES], TEMPLATES, per_class, seed, SPLITS, **kwargs)


def test_balanced_per_class_and_split():
    rows = _build().to_pylist()
    assert Counter(r["label_name"] for r in rows) == {s: 50 for s in SHAPES}
    per_class_split = Counter((r["label_name"], r["split"]) for r in rows)
    assert all(per_class_split[(s, "train")] == 40 and per_class_split[(s, "test")] == 5 for s in SHAPES)
    # Counts that do not divide evenly still add up, each within one row of per_class x fraction.
    uneven = Counter((r["label_name"], r["split"]) for r in _build(per_class=7).to_pylist())
    assert all((uneven[(s, "train")], uneven[(s, "validation")], uneven[(s, "test")]) == (5, 1, 1) for s in SHAPES)


def test_shuffled_not_class_sorted():
    labels = [r["label"] for r in _build().to_pylist()]
    assert labels != sorted(labels)
    # Any run of 20 consecutive rows holds several classes.
    assert all(len(set(labels[i:i + 20])) >= 3 for i in range(0, len(labels), 20))


def test_splits_never_share_a_prompt_and_seed():
    rows = _build(per_class=200).to_pylist()
    assert len({r["seed"] for r in rows}) == len(rows)
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add((r["prompt"], r["seed"]))
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]


def test_deterministic_from_the_seed():
    assert _build(seed=5).equals(_build(seed=5))
    assert _build(seed=5).column("prompt") != _build(seed=6).column("prompt")


def test_label_columns_and_slots():
    table = _build(guidance=[1.5, 2.0, 4.0, 7.5])
    assert sm.label_names(table.schema) == SHAPES
    for r in table.to_pylist():
        assert SHAPES[r["label"]] == r["label_name"] == r["class_text"]
        assert r["colour"] != r["background"]
        assert r["colour"] in r["prompt"] or r["style"] in r["prompt"]
    # Each class's rows are spread evenly over the guidance list.
    per = Counter((r["label_name"], r["guidance_scale"]) for r in table.to_pylist())
    assert set(per.values()) <= {12, 13}


def test_guidance_range():
    values = _build(guidance_range=(1.5, 7.5)).column("guidance_scale").to_pylist()
    assert min(values) >= 1.5 and max(values) <= 7.5 and len(set(values)) > 100


def test_refuses_bad_templates_and_splits():
    with pytest.raises(ValueError, match=r"templates.0.*\{shade\}"):
        sm.TemplateSet(templates=["a {shade} {class}"])
    with pytest.raises(SpecError, match="sum to 0.9"):
        sm.parse_splits("train=0.8,test=0.1")


def test_cli_from_csv(tmp_path):
    (tmp_path / "c.csv").write_text("name,synonyms\ncircle,disc|ring\nsquare,\n")
    (tmp_path / "t.txt").write_text("a {class}\nanother {class}\n")
    out = tmp_path / "m.parquet"
    code = cli_main(["manifest", "synth", "--classes", str(tmp_path / "c.csv"), "--templates", str(tmp_path / "t.txt"),
                     "--per-class", "6", "--seed", "1", "--guidance", "2,4", "--output", str(out)])
    table = pq.read_table(out)
    assert code == 0 and table.num_rows == 12
    assert {r["class_text"] for r in table.to_pylist() if r["label"] == 0} <= {"circle", "disc", "ring"}
    assert cli_main(["manifest", "synth", "--classes", str(tmp_path / "c.csv"), "--templates", str(tmp_path / "t.txt"),
                     "--per-class", "6", "--splits", "train=2", "--output", str(out)]) == 2


def test_small_experiment(tmp_path, ray_local):
    config = evaluate.Config(work=tmp_path, rows_per_guidance=15, guidances=(4.0,), steps=4, train_seeds=1,
                             eval_images=40, train_steps=5, batch_size=8)
    arms, figures = evaluate.run(config, log=lambda *_: None)
    assert [a.name for a in arms] == ["(a) real", "(b) synthetic g=4", "(c) filtered g=4", "(d) 20 real/class",
                                      "(e) 20 real/class + filtered g=4"]
    assert all(len(a.accuracies) == 1 and 0 <= a.accuracies[0] <= 1 for a in arms)
    assert arms[1].images == 15 and figures[0].rows == 15
    text = evaluate.table(config, arms, figures)
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{evaluate.MARK_START}\nold\n{evaluate.MARK_END}\n\nAfter.\n")
    evaluate.write_doc(doc, text)
    written = doc.read_text()
    assert "old" not in written and "(e) 20 real/class" in written and written.endswith("After.\n")
