"""Dock widgets remember their last parameters between napari sessions.

Each widget's parameter fields (spin boxes, check boxes, text fields and combo boxes whose
choices are plain strings) are stored under the widget's key in one JSON file in the user's
config folder (``$NUCLEAE_SETTINGS`` overrides its path). Folder pickers and layer choices are
not stored: folders come from the layers in the viewer, and exports must be chosen each time.
A missing, unreadable or outdated file only means defaults.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton
from magicgui.widgets.bases import ValueWidget
from platformdirs import user_config_dir

SETTINGS_ENV = "NUCLEAE_SETTINGS"
Value = str | int | float | bool


def settings_file() -> Path:
    """Where the parameters are kept."""
    override = os.environ.get(SETTINGS_ENV)
    if override:
        return Path(override)
    return Path(user_config_dir("napari-nucleae", appauthor=False)) / "widgets.json"


def load_settings() -> dict[str, dict[str, Value]]:
    """All remembered parameters ({} when the file is missing or unreadable)."""
    try:
        data = json.loads(settings_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(key: str, values: dict[str, Value]) -> None:
    """Store one widget's parameters atomically; a settings file that cannot be written is
    skipped (remembering is a convenience, never a reason to fail)."""
    path = settings_file()
    data = {**load_settings(), key: values}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def parameter_widgets(container: Container, skip: tuple[str, ...] = ()) -> dict[str, ValueWidget]:
    """The container's parameter fields by attribute name, except those in ``skip``."""
    return {
        name: widget
        for name, widget in vars(container).items()
        if name not in skip and isinstance(widget, ValueWidget) and _storable(widget)
    }


def _storable(widget: ValueWidget) -> bool:
    if isinstance(widget, FileEdit | PushButton | Label):
        return False
    if isinstance(widget, ComboBox):  # a layer choice starts empty: not a list of strings
        choices = widget.choices
        return bool(choices) and all(isinstance(choice, str) for choice in choices)
    return isinstance(widget.value, Value)


def remember(container: Container, key: str, skip: tuple[str, ...] = ()) -> None:
    """Restore ``container``'s remembered parameters and save them whenever one changes;
    ``skip`` names fields that must start from their default each time."""
    widgets = parameter_widgets(container, skip)
    stored = load_settings().get(key, {})
    for name, widget in widgets.items():
        value = stored.get(name) if isinstance(stored, dict) else None
        if value is not None and type(value) is type(widget.value):
            # a choice that no longer exists, or a value out of range: keep the default
            with contextlib.suppress(ValueError, TypeError):
                widget.value = value

    def store(*_) -> None:
        values = {name: widget.value for name, widget in widgets.items()}
        save_settings(key, {name: v for name, v in values.items() if isinstance(v, Value)})

    for widget in widgets.values():
        widget.changed.connect(store)
