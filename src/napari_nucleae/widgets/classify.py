""" "Annotate & classify" dock widget: name a class, assign it to nuclei clicked on the images
or lassoed in the Latent explorer, then let a classifier on the latents predict every crop's
class (annotated crops keep theirs) and show its cross-validated accuracy per class."""

from __future__ import annotations

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info

from ..core.analysis import annotate, annotations_of, classify_crops
from ..core.classify import CLASS, Classification
from ._common import Dock, StatusLabel, add_progress, bind_project, follow_picks, require_project
from ._nuclei import Pick
from ._session import Session, follow
from ._settings import remember


def accuracy_line(found: Classification) -> str:
    """Cross-validated accuracy per class, in words."""
    parts = [f"{name} {acc:.0%} of {found.counts[name]}" for name, acc in found.accuracy.items()]
    return "cross-validated accuracy: " + ", ".join(parts)


def counts_line(annotations: pd.Categorical) -> str:
    """Annotated crops per class, in words."""
    counts = pd.Series(annotations).value_counts().sort_index()
    counts = counts[counts > 0]
    if not len(counts):
        return "no annotations yet"
    return "annotated: " + ", ".join(f"{name} {n}" for name, n in counts.items())


class ClassifyWidget(Dock):
    """Annotate nuclei with class names and classify every crop from them."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, self.load)
        self.known: list[str] = []  # callable choices survive napari's reset_choices()
        self.classes = ComboBox(
            choices=lambda _: self.known,
            label="classes",
            nullable=True,
            tooltip="the classes annotated so far: choose one to assign it",
        )
        self.name = LineEdit(label="class", tooltip="the class to assign (type a new one)")
        self.on_click = CheckBox(
            value=False, text="assign to clicked nuclei", tooltip="each click annotates a nucleus"
        )
        self.assign_button = PushButton(text="Assign to selection")
        self.remove_button = PushButton(text="Remove their annotation")
        self.column = LineEdit(value=CLASS, label="column", tooltip="column of the predictions")
        self.classify_button = PushButton(text="Classify every crop")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.annotated = StatusLabel()
        self.status = StatusLabel()
        self.extend(
            [
                self.project,
                self.classes,
                self.name,
                self.on_click,
                self.assign_button,
                self.remove_button,
                self.annotated,
                self.column,
                self.classify_button,
                self.cancel_button,
                self.status,
            ]
        )
        self.jobs = add_progress(self)
        self.jobs.bind([self.classify_button], self.cancel_button)
        self.classes.changed.connect(self._class_chosen)
        self.assign_button.changed.connect(lambda: self.assign(self.session.selection))
        self.remove_button.changed.connect(lambda: self.assign(self.session.selection, None))
        self.classify_button.changed.connect(self.start)
        follow_picks(viewer, self, self._picked)
        follow(self, self.session.selection_changed, lambda _: self._show_selection())
        self.load()
        remember(self, "classify", skip=("classes", "name"))

    def load(self) -> None:
        """Offer the classes annotated so far and count them."""
        project = self.session.project
        if project is None:
            return
        annotations = annotations_of(project)
        self.known = [str(c) for c in annotations.categories if (annotations == c).any()]
        with self.classes.changed.blocked():
            self.classes.reset_choices()
        self.annotated.value = counts_line(annotations)
        self._show_selection()

    def _class_chosen(self, value: str | None) -> None:
        if value:
            self.name.value = value

    def _show_selection(self) -> None:
        n = len(self.session.selection)
        self.assign_button.text = (
            f"Assign to the {n:,} selected" if n else "Assign to the selection"
        )

    def _picked(self, pick: Pick) -> None:
        index = self.session.index
        if not self.on_click.value or index is None:
            return
        row = index.row_of(pick.image_id, pick.label)
        if row is None:
            show_info(f"nucleus {pick.label} of {pick.layer} was not cropped into the project")
            return
        self.assign(np.array([row]))

    def assign(self, rows: np.ndarray, name: str | None = "") -> None:
        """Annotate ``rows`` with the typed class (``name=None``: remove their annotation)."""
        project = require_project(self.session)
        if project is None:
            return
        name = self.name.value.strip() if name == "" else name
        if name == "":
            show_error("Type or choose the class to assign.")
            return
        if not len(rows):
            show_error("Select nuclei first: lasso them in the Latent explorer, or click them.")
            return
        annotate(project, rows, name)
        what = "removed the annotation of" if name is None else f"annotated as {name!r}"
        self.status.value = f"{what} {len(rows):,} crops"
        self.session.refresh()

    def start(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        self.jobs.start(
            _classify,
            self.session,
            self.column.value.strip() or CLASS,
            desc="Classifying",
            on_returned=self._classified,
            on_errored=self._failed,
        )

    def _classified(self, found: Classification) -> None:
        self.status.value = accuracy_line(found)
        show_info(f"Classified: {self.status.value}")
        self.session.refresh()

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)


def _classify(session: Session, column: str, *, progress=None, should_stop=None) -> Classification:
    """Worker body: the classifier on the latents of the session's model."""
    project = session.project
    model = session.loaded_model().name
    return classify_crops(project, model=model, column=column)
