"""Run core functions in napari thread workers with progress, cancel and plain errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from magicgui.widgets import Widget
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QProgressBar

from ..core.errors import NucleaeError


def user_message(err: BaseException) -> str:
    """The message a user sees: plain for expected errors, typed for unexpected ones."""
    if isinstance(err, NucleaeError | InterruptedError):
        return str(err)
    return f"unexpected error ({type(err).__name__}): {err}"


class JobRunner(QObject):
    """Runs one ``func(..., progress=, should_stop=)`` at a time off the UI thread and owns
    the busy state of its widget.

    While a job runs, the ``controls`` are disabled and the ``cancel`` button is enabled only
    for jobs started with ``cancellable=True`` (their core function polls ``should_stop``);
    when the job ends, however it ends and however fast, both come back and ``busy_changed``
    emits False. Every worker signal is connected before the worker starts. Progress
    reaches the UI thread through a Qt signal and drives both the widget's own progress bar
    and a napari activity-dock progress bar.
    """

    progressed = Signal(int, int, str)
    epoch_ended = Signal(int, float, float)  # for training jobs: epoch, train and val loss
    busy_changed = Signal(bool)

    def __init__(self, bar: QProgressBar, parent: QObject | None = None):
        super().__init__(parent)
        self.bar = bar
        self.worker: FunctionWorker | None = None
        self.controls: list[Widget] = []
        self.cancel_button: Widget | None = None
        self._stop = False
        self._napari_bar: progress | None = None
        self.progressed.connect(self._on_progress)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def bind(self, controls: Sequence[Widget], cancel: Widget | None = None) -> None:
        """Disable ``controls`` while a job runs; ``cancel`` stops a cancellable job."""
        self.controls = list(controls)
        self.cancel_button = cancel
        if cancel is not None:
            cancel.enabled = False
            cancel.changed.connect(self.cancel)

    def start(
        self,
        func: Callable,
        *args,
        desc: str,
        on_returned: Callable,
        on_errored: Callable[[BaseException], None] | None = None,
        cancellable: bool = False,
        **kwargs,
    ) -> FunctionWorker:
        """Start ``func`` in a worker thread; ``on_returned`` runs on the UI thread."""
        if self.busy:
            raise RuntimeError("a job is already running")
        self._stop = False
        worker = create_worker(
            func,
            *args,
            progress=self.progressed.emit,
            should_stop=lambda: self._stop,
            _start_thread=False,
            _connect={
                "returned": on_returned,
                "errored": on_errored or self.report_error,
                "finished": self._on_finished,
            },
            **kwargs,
        )
        self.worker = worker
        self._napari_bar = progress(total=0, desc=desc)
        self.bar.setRange(0, 0)
        self.bar.setFormat(desc)
        self.bar.setVisible(True)
        self._enable(busy=True, cancellable=cancellable)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running job to stop at its next check."""
        if self.busy:
            self._stop = True
            show_info("cancelling…")

    @staticmethod
    def report_error(err: BaseException) -> None:
        show_error(user_message(err))

    def _enable(self, *, busy: bool, cancellable: bool = False) -> None:
        for control in self.controls:
            control.enabled = not busy
        if self.cancel_button is not None:
            self.cancel_button.enabled = busy and cancellable
        self.busy_changed.emit(busy)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(done)
        self.bar.setFormat(f"{message} (%p%)")
        bar = self._napari_bar  # the job may finish while napari handles these events
        if bar is not None:
            bar.total, bar.n = total, done
            bar.set_description(message)  # also redraws the bar

    def _on_finished(self) -> None:
        self.worker = None
        self.bar.setVisible(False)
        if self._napari_bar is not None:
            self._napari_bar.close()
            self._napari_bar = None
        self._enable(busy=False)
