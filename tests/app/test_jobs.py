"""The job runner: one job at a time, progress that only moves forward, and failures whose
message reaches the user only when the library wrote it for them."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from mechscope.app import jobs as jobs_module
from mechscope.app.jobs import CANCELLED, INTERNAL_ERROR, Job, JobRunner

WAIT_S = 30  # an upper bound on a job that takes milliseconds, so a hang fails instead of blocking


def finished(runner: JobRunner, id: str) -> Job:
    deadline = time.monotonic() + WAIT_S
    while not runner.get(id).finished:
        assert time.monotonic() < deadline, f"job {id} did not finish"
        time.sleep(0.005)
    return runner.get(id)


@pytest.fixture
def runner():
    runner = JobRunner()
    yield runner
    runner.shutdown()


def test_a_job_runs_to_done_with_its_result(runner):
    def work(progress):
        progress(0.5)
        return {"answer": 42}

    job = finished(runner, runner.submit(work))
    assert (job.state, job.progress, job.result, job.error) == ("done", 1.0, {"answer": 42}, None)


def test_progress_is_seen_while_running_and_never_goes_back(runner):
    reported, release = threading.Event(), threading.Event()

    def work(progress):
        progress(0.6)
        progress(0.2)  # a later sweep restarting its count must not move the bar back
        progress(7.0)  # nor past the end
        reported.set()
        release.wait(WAIT_S)

    id = runner.submit(work)
    assert reported.wait(WAIT_S)
    running = runner.get(id)
    release.set()
    assert (running.state, running.progress) == ("running", 1.0)
    assert finished(runner, id).state == "done"


def test_jobs_run_one_at_a_time_in_order(runner):
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first(progress):
        started.set()
        release.wait(WAIT_S)
        order.append("first")

    one = runner.submit(first)
    two = runner.submit(lambda progress: order.append("second"))
    assert started.wait(WAIT_S)
    assert (runner.get(one).state, runner.get(two).state) == ("running", "queued")
    release.set()
    finished(runner, one), finished(runner, two)
    assert order == ["first", "second"]


@pytest.mark.bad_input
def test_a_value_error_reaches_the_user_as_written(runner):
    message = "the clean prompt is 5 tokens and the corrupted one 6"

    def work(progress):
        raise ValueError(message)

    job = finished(runner, runner.submit(work))
    assert (job.state, job.error, job.result) == ("failed", message, None)


@pytest.mark.bad_input
def test_a_key_error_message_loses_its_quotes(runner):
    def work(progress):
        raise KeyError("unknown hook 'blocks.0.hook_resid_pree'")

    assert finished(runner, runner.submit(work)).error == "unknown hook 'blocks.0.hook_resid_pree'"


@pytest.mark.bad_input
def test_any_other_failure_is_an_internal_error_logged_not_shown(runner, caplog):
    def work(progress):
        raise RuntimeError("secret detail at /home/someone/model.py")

    with caplog.at_level(logging.ERROR, logger=jobs_module.__name__):
        job = finished(runner, runner.submit(work))
    assert (job.state, job.error) == ("failed", INTERNAL_ERROR)
    assert "secret detail" not in job.error
    assert any(record.exc_info and "secret detail" in str(record.exc_info[1]) for record in caplog.records)


@pytest.mark.bad_input
def test_an_unknown_job_is_a_key_error_naming_it(runner):
    with pytest.raises(KeyError, match="no job with id 'nope'"):
        runner.get("nope")


def test_old_finished_jobs_are_forgotten(runner, monkeypatch):
    monkeypatch.setattr(jobs_module, "KEEP_FINISHED", 2)
    ids = [runner.submit(lambda progress: None) for _ in range(3)]
    for id in ids:
        finished(runner, id)
    latest = runner.submit(lambda progress: None)
    with pytest.raises(KeyError):
        runner.get(ids[0])
    assert [runner.get(id).state for id in ids[1:]] == ["done", "done"]
    assert finished(runner, latest).state == "done"


def test_shutdown_cancels_the_running_job_at_its_next_progress_report():
    runner, started, passes = JobRunner(), threading.Event(), []

    def sweep(progress):
        deadline = time.monotonic() + WAIT_S  # a sweep far longer than the test may wait
        while time.monotonic() < deadline:
            progress(len(passes) / 1e6)
            passes.append(None)
            started.set()
            time.sleep(0.001)
        return "ran to the end"

    id = runner.submit(sweep)
    assert started.wait(WAIT_S)
    assert runner.running().id == id
    runner.shutdown()
    job = runner.get(id)
    assert (job.state, job.error, job.result) == ("failed", CANCELLED, None)
    assert runner.running() is None


def test_shutdown_marks_queued_jobs_cancelled_without_running_them():
    runner, started, release, ran = JobRunner(), threading.Event(), threading.Event(), []

    def first(progress):
        started.set()
        release.wait(WAIT_S)

    one = runner.submit(first)
    two = runner.submit(lambda progress: ran.append("second"))
    assert started.wait(WAIT_S)
    threading.Timer(0.05, release.set).start()  # the first job reports no progress, so it ends on its own
    runner.shutdown()
    assert runner.get(one).state == "done"
    assert (runner.get(two).state, runner.get(two).error, ran) == ("failed", CANCELLED, [])


def test_nothing_is_running_when_idle(runner):
    assert runner.running() is None
    finished(runner, runner.submit(lambda progress: None))
    assert runner.running() is None
