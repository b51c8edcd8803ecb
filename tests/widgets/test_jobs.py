"""The job runner owns the busy state: buttons come back however a job ends, and Cancel is
offered only to jobs that stop when asked."""

import time

import pytest
from magicgui.widgets import PushButton
from qtpy.QtWidgets import QProgressBar

from napari_nucleae.core.errors import NucleaeError
from napari_nucleae.widgets._jobs import JobRunner

TIMEOUT = 30_000


@pytest.fixture
def runner(qtbot):
    run, other, cancel = PushButton(text="Run"), PushButton(text="Other"), PushButton()
    jobs = JobRunner(QProgressBar())
    jobs.bind([run, other], cancel)
    return jobs, run, other, cancel


def _fails_at_once(progress=None, should_stop=None):
    raise NucleaeError("refused at once")


def _waits_for_cancel(progress=None, should_stop=None):
    while not should_stop():
        time.sleep(0.005)
    raise InterruptedError("stopped")


def test_buttons_come_back_after_a_job_that_fails_at_once(qtbot, runner):
    jobs, run, other, cancel = runner
    errors, busy = [], []
    jobs.busy_changed.connect(busy.append)
    jobs.start(_fails_at_once, desc="failing", on_returned=print, on_errored=errors.append)
    assert not run.enabled and not other.enabled and not cancel.enabled  # not cancellable
    qtbot.waitUntil(lambda: not jobs.busy, timeout=TIMEOUT)
    assert run.enabled and other.enabled and not cancel.enabled
    assert [str(e) for e in errors] == ["refused at once"] and busy == [True, False]


def test_cancel_stops_a_cancellable_job_and_everything_comes_back(qtbot, runner):
    jobs, run, _, cancel = runner
    errors = []
    jobs.start(
        _waits_for_cancel,
        desc="waiting",
        on_returned=print,
        on_errored=errors.append,
        cancellable=True,
    )
    assert cancel.enabled and not run.enabled
    cancel.native.click()
    qtbot.waitUntil(lambda: not jobs.busy, timeout=TIMEOUT)
    assert isinstance(errors[0], InterruptedError)
    assert run.enabled and not cancel.enabled


def test_a_second_job_is_refused_while_one_runs(qtbot, runner):
    jobs, *_ = runner
    jobs.start(_waits_for_cancel, desc="waiting", on_returned=print, cancellable=True)
    with pytest.raises(RuntimeError, match="already running"):
        jobs.start(_fails_at_once, desc="second", on_returned=print)
    jobs.cancel()
    qtbot.waitUntil(lambda: not jobs.busy, timeout=TIMEOUT)
