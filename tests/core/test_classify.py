"""Annotations and the classifier on a labelled synthetic set (three phenotypes, PCA latents)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_nucleae.core.analysis import (
    annotate,
    annotations_of,
    classify_crops,
    import_annotations,
)
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.store import ANNOTATION, Project

NAMES = np.array(["small", "large", "speckled"])


def first_of_each(kinds: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` crops of each phenotype, by class name."""
    return {NAMES[k]: np.flatnonzero(kinds == k)[:n] for k in range(len(NAMES))}


def test_ten_annotations_per_class_classify_every_crop(labelled):
    project, kinds = labelled
    chosen = first_of_each(kinds, 10)
    for name, crops in chosen.items():
        annotate(project, crops, name)
    wrong = int(np.flatnonzero(kinds == 0)[20])
    annotate(project, [wrong], "large")  # a user's call the classifier must not overrule
    found = classify_crops(project)
    table = Project.open(project.path).table()  # stored: survives reopening
    assert table[ANNOTATION].notna().sum() == 31
    annotated = np.concatenate([*chosen.values(), [wrong]])
    rest = np.setdiff1d(np.arange(len(project)), annotated)
    truth = NAMES[kinds]
    assert (table["class"].astype(str).to_numpy()[rest] == truth[rest]).mean() >= 0.9
    assert table["class"].iat[wrong] == "large"
    for name, crops in chosen.items():
        assert (table["class"].astype(str).to_numpy()[crops] == name).all()
    assert set(found.accuracy.index) == set(NAMES) and (found.accuracy >= 0.8).all()
    assert found.counts.to_dict() == {"large": 11, "small": 10, "speckled": 10}
    probability = table["class_probability"].to_numpy()
    assert ((probability > 0) & (probability <= 1)).all()
    assert np.median(probability[rest]) > 0.8


def test_annotations_are_kept_apart_from_predictions_and_can_be_removed(labelled):
    project, kinds = labelled
    for name, crops in first_of_each(kinds, 3).items():
        annotate(project, crops, name)
    classify_crops(project, column="phenotype")
    before = annotations_of(project)
    classify_crops(project, column="phenotype")  # a rerun
    assert annotations_of(project).astype(object).tolist() == before.astype(object).tolist()
    crop = int(np.flatnonzero(kinds == 0)[0])
    annotate(project, [crop], None)
    assert pd.isna(annotations_of(project)[crop])
    with pytest.raises(InputError, match="holds your annotations"):
        classify_crops(project, column=ANNOTATION)


def test_too_few_annotations_are_refused_with_the_reason(labelled):
    project, kinds = labelled
    with pytest.raises(InputError, match="two classes or more.*none"):
        classify_crops(project)
    annotate(project, np.flatnonzero(kinds == 0)[:5], "small")
    annotate(project, np.flatnonzero(kinds == 1)[:1], "large")
    with pytest.raises(InputError, match="at least 2 annotated crops; 'large' has 1"):
        classify_crops(project)


def test_annotation_files_by_crop_index_or_image_and_label(labelled, tmp_path):
    project, kinds = labelled
    table = project.table()
    by_index = tmp_path / "index.csv"
    pd.DataFrame({"crop_index": [0, 5], "class": ["a", " b "]}).to_csv(by_index, index=False)
    import_annotations(project, by_index)
    rows = table.iloc[[7, 9]]
    by_image = tmp_path / "image.csv"
    rows.assign(**{"class": ["b", "c"]})[["image_path", "label", "class"]].to_csv(
        by_image, index=False
    )
    annotations = import_annotations(project, by_image)  # added to the earlier ones
    assert {i: annotations[i] for i in (0, 5, 7, 9)} == {0: "a", 5: "b", 7: "b", 9: "c"}
    assert pd.isna(annotations[1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crop_index,class\n0,a\n99999,b\n", "line 3: crop '99999' does not exist"),
        ("crop_index,class\nx,a\n", "line 2: crop 'x' does not exist"),
        ("image_path,label,class\nnowhere.tif,1,a\n", "no image 'nowhere.tif'"),
        ("image_path,label,class\nimages/img0.tif,9999,a\n", "has no cropped nucleus 9999"),
        ("crop_index,kind\n0,a\n", "needs the columns crop_index,class"),
        ("crop_index,class\n0,\n", "line 2: the class is empty"),
        ("crop_index,class\n0,a\n0,b\n", "gives crop 0 two classes"),
        ("crop_index,class\n", "holds no annotations"),
        ("", "is empty"),
    ],
)
def test_bad_annotation_files_are_one_clear_error(labelled, tmp_path, text, message):
    project, _ = labelled
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        import_annotations(project, path)
    assert ANNOTATION not in project.table()  # nothing stored


def test_annotations_survive_new_crops_while_derived_columns_go(labelled):
    project, kinds = labelled
    annotate(project, [0, 1], "small")
    assert "mse" in project.table()
    crops = project.read_crops([0, 1])
    rows = project.table(with_features=False).iloc[[0, 1]].drop(columns="crop_index")
    project.append({"image_id": "more"}, crops, rows.assign(image_id="more"))
    table = Project.open(project.path).table()
    assert "mse" not in table  # stale: embed again
    assert table[ANNOTATION].iloc[:2].tolist() == ["small", "small"]
    assert table[ANNOTATION].iloc[2:].isna().all() and len(table) == len(kinds) + 2
    annotate(project, [len(kinds)], "large")
    assert annotations_of(project)[[0, len(kinds)]].tolist() == ["small", "large"]
