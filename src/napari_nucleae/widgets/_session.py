"""The state every napari-nucleae dock widget of one viewer shares, with change signals.

One :class:`Session` per viewer holds the open project, its table (read once, re-read when a
widget changed the project), the model in use (a checkpoint is loaded once per model and
device) and the selected crops. A widget that writes to the project calls :meth:`refresh`
(new crops, latents, projections, clusters, outliers), :meth:`use_model` (a model trained or
loaded) or :meth:`select`; the others follow through the signals without re-choosing folders.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import Container
from psygnal import Signal, SignalInstance

from ..core.embed import resolve_model
from ..core.errors import NucleaeError
from ..core.model import LoadedModel
from ..core.store import Project
from ._nuclei import KEY, NucleusIndex, write_columns

_SESSIONS: dict[int, Session] = {}


class Session:
    """A viewer's project, table, model and selection."""

    project_changed = Signal(object)  # Project | None
    table_changed = Signal(object)  # pd.DataFrame: crops, latents or features changed
    model_changed = Signal(object)  # str | None: the model in use (None: the active model)
    selection_changed = Signal(object)  # np.ndarray of project rows

    def __init__(self) -> None:
        self.project: Project | None = None
        self.model: str | None = None  # a checkpoint path or model name; None: active model
        self.selection = np.empty(0, dtype=np.int64)
        self._table: pd.DataFrame | None = None
        self._index: NucleusIndex | None = None
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, viewer: napari.viewer.Viewer) -> Session:
        """The viewer's session, created on first use (and forgotten with the viewer)."""
        viewer = unwrapped(viewer)
        key = id(viewer)
        if key not in _SESSIONS:
            _SESSIONS[key] = session = cls()
            weakref.finalize(viewer, _SESSIONS.pop, key, None)
            viewer_ref = weakref.ref(viewer)
            session.project_changed.connect(lambda _: _sync_layers(viewer_ref(), session))
            session.table_changed.connect(lambda _: _sync_layers(viewer_ref(), session))
            viewer.layers.events.inserted.connect(lambda _: session.adopt(viewer_ref()))
            session.adopt(viewer)
        return _SESSIONS[key]

    def adopt(self, viewer: napari.viewer.Viewer | None) -> None:
        """Open the project of the viewer's nucleae layers while no project is open."""
        folder = None if viewer is None or self.project else project_of_layers(viewer)
        if folder is not None:
            self.open(folder, quiet=True)

    # ------------------------------------------------------------------ project and table
    @property
    def path(self) -> Path | None:
        return None if self.project is None else self.project.path

    def open(self, folder: Path | None, *, quiet: bool = False) -> Project | None:
        """Make ``folder`` the session's project (a no-op when it already is).

        A folder without a project leaves no project; ``quiet=False`` raises the reason.
        """
        folder = None if folder is None else Path(folder).resolve()
        if folder == self.path:
            return self.project
        project = None
        if folder is not None:
            try:
                project = Project.open(folder)
            except NucleaeError:
                if not quiet:
                    raise
        self.project, self.model, self._models = project, None, {}
        self._forget_table()
        self.project_changed.emit(project)
        return project

    @property
    def table(self) -> pd.DataFrame | None:
        """The project table (read once per change), or None without a project."""
        if self._table is None and self.project is not None:
            self._table = self.project.table()
        return self._table

    @property
    def index(self) -> NucleusIndex | None:
        """Project rows ↔ (image id, label) for the current table."""
        if self._index is None and self.table is not None:
            self._index = NucleusIndex.from_table(self.table)
        return self._index

    def refresh(self) -> None:
        """Re-read the table after the project changed on disk and tell every widget."""
        if self.project is None:
            return
        rows = None if self._table is None else len(self._table)
        self.project = Project.open(self.project.path)  # meta (active model) and table anew
        self._forget_table(keep_selection=rows == len(self.project))
        self.table_changed.emit(self.table)

    def _forget_table(self, keep_selection: bool = False) -> None:
        self._table = self._index = None
        if not keep_selection:
            self.selection = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ model
    def use_model(self, model: str | None, loaded: LoadedModel | None = None) -> None:
        """Use ``model`` (a checkpoint path or model name; None: the project's active model),
        already ``loaded`` when given; a model trained again is loaded afresh."""
        with self._lock:
            self._models = {} if loaded is None else {str(model): loaded}
        self.model = model
        self.model_changed.emit(model)

    def loaded_model(self, device: str | None = None) -> LoadedModel:
        """The model in use, its checkpoint read once (callable from a worker thread)."""
        project = self.project
        if project is None:
            raise NucleaeError("no project is open")
        with self._lock:
            loaded = self._models.get(str(self.model))
            if loaded is None:
                loaded = self._models[str(self.model)] = resolve_model(project, self.model, None)
        return resolve_model(project, loaded, device)

    # ------------------------------------------------------------------ selection
    def select(self, rows: np.ndarray) -> None:
        self.selection = np.asarray(rows, dtype=np.int64)
        self.selection_changed.emit(self.selection)


def unwrapped(viewer: napari.viewer.Viewer) -> napari.viewer.Viewer:
    """The viewer itself: napari hands each plugin dock its own proxy of it (a
    ``PublicOnlyProxy``), and the docks of one viewer must share one session."""
    while hasattr(viewer, "__wrapped__"):
        viewer = viewer.__wrapped__
    return viewer


def _sync_layers(viewer: napari.viewer.Viewer | None, session: Session) -> None:
    """Copy every derived column of the table into the features of the project's layers."""
    if viewer is not None and session.project is not None and session.table is not None:
        write_columns(viewer, session.table, list(session.project.features().columns))


def project_of_layers(viewer: napari.viewer.Viewer) -> Path | None:
    """The project folder of the first nucleae layer in the viewer, if any."""
    for layer in viewer.layers:
        info = layer.metadata.get(KEY)
        if isinstance(info, dict) and info.get("project"):
            return Path(info["project"])
    return None


def follow(container: Container, signal: SignalInstance, callback: Callable) -> None:
    """Connect ``callback`` to a session signal until ``container``'s widget is destroyed."""
    signal.connect(callback)
    container.native.destroyed.connect(lambda *_: signal.disconnect(callback))
