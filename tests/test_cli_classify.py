"""``nucleae classify`` and ``nucleae represent --by class`` on a labelled synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_nucleae.cli import main
from napari_nucleae.core.store import ANNOTATION, Project

NAMES = np.array(["small", "large", "speckled"])


def annotation_file(path, kinds: np.ndarray, n: int = 10):
    """A CSV annotating the first ``n`` crops of each phenotype by crop index."""
    index = np.concatenate([np.flatnonzero(kinds == k)[:n] for k in range(len(NAMES))])
    pd.DataFrame({"crop_index": index, "class": NAMES[kinds[index]]}).to_csv(path, index=False)
    return path


def test_classify_then_represent_per_class_with_export(labelled, tmp_path, capsys):
    project, kinds = labelled
    csv = annotation_file(tmp_path / "annotations.csv", kinds)
    assert main(["classify", "--project", str(project.path), "--annotations", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "30 crops annotated" in out
    for name in NAMES:
        assert f"  {name}: " in out and "% of 10" in out
    table = Project.open(project.path).table()
    assert table[ANNOTATION].notna().sum() == 30
    assert (table["class"].astype(str).to_numpy() == NAMES[kinds]).mean() >= 0.9
    export = tmp_path / "reps"
    args = ["represent", "--project", str(project.path), "--by", "class", "--top", "3"]
    args += ["--spectrum", "4", "--pixel-size", "0.3", "--export", str(export)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("pool: qc, ") and "area_percentile" in out
    assert "spectrum of 4 crops per group" in out
    chosen = pd.read_csv(export / "representatives.csv")
    classes = table["class"].astype(str).to_numpy()
    assert (classes[chosen["crop_index"]] == chosen["group"]).all()
    assert set(chosen["group"]) == set(NAMES) and (chosen["pool"] == "qc").all()
    record = json.loads((export / "provenance.json").read_text())
    assert record["group"] == "class" and record["pool"] == "qc"
    assert len(pd.read_csv(export / "spectrum" / "representatives.csv")) == 12
    every = tmp_path / "every"
    args = ["represent", "--project", str(project.path), "--pool", "all", "--export", str(every)]
    assert main(args) == 0
    assert json.loads((every / "provenance.json").read_text())["pool"] == "all"


def test_a_rerun_uses_the_stored_annotations_and_another_column(labelled, tmp_path, capsys):
    project, kinds = labelled
    csv = annotation_file(tmp_path / "annotations.csv", kinds, 4)
    assert main(["classify", "--project", str(project.path), "--annotations", str(csv)]) == 0
    capsys.readouterr()
    assert main(["classify", "--project", str(project.path), "--column", "kind"]) == 0
    assert "12 crops annotated" not in capsys.readouterr().out  # no file: the stored ones
    table = Project.open(project.path).table()
    assert {"class", "kind", "kind_probability"} <= set(table.columns)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("crop_index,class\n0,a\n5000,b\n", "line 3: crop '5000' does not exist"),
        ("image_path,label,class\nelsewhere.tif,1,a\n", "no image 'elsewhere.tif'"),
        ("crop_index,class\n0,a\n1,a\n2,b\n", "at least 2 annotated crops; 'b' has 1"),
        ("crop_index,class\n0,a\n1,a\n", "two classes or more"),
        ("index,name\n0,a\n", "needs the columns crop_index,class"),
    ],
)
def test_bad_annotation_files_are_one_line(labelled, tmp_path, capsys, rows, message):
    project, _ = labelled
    csv = tmp_path / "bad.csv"
    csv.write_text(rows)
    assert main(["classify", "--project", str(project.path), "--annotations", str(csv)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nucleae classify: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_annotation_file_is_one_line(labelled, tmp_path, capsys):
    project, _ = labelled
    args = ["classify", "--project", str(project.path), "--annotations", str(tmp_path / "no.csv")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "cannot read the annotations" in err and err.count("\n") == 1
