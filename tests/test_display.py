"""The training display (hivecli.cli._display) and stop_on_signals (hivecli.cli._signals)."""

import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import types

import pytest
from rich.console import Console

from hivecli.cli import _display
from hivecli.cli._display import Display
from hivecli.cli._signals import stop_on_signals

PROGRESS = {
    "step": 1150, "loss": 0.0531, "samples_per_s": 412.3, "peers": 2, "rounds": 37, "last_group_size": 2,
    "run_samples": 23200, "goal_samples": 143700, "eta_s": 291,
}  # fmt: skip
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
log = logging.getLogger("hivecli.test_display")


def piped_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=300, soft_wrap=True, highlight=False)


def terminal_console(monkeypatch) -> Console:
    monkeypatch.setenv("TERM", "xterm-256color")  # not a "dumb" terminal, where Live draws nothing
    return Console(file=io.StringIO(), force_terminal=True, width=200, soft_wrap=True, highlight=False)


def lines_of(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def screen_lines(console: Console) -> list[str]:
    """What a terminal showed, line by line, redraws included: escape codes out, split at CR and LF."""
    return [line for line in re.split(r"\r\n|\r|\n", ANSI.sub("", console.file.getvalue())) if line.strip()]


# ---- the status line ----------------------------------------------------------------------------


def test_status_line_shows_every_known_field():
    display = Display(False, "143,700 samples", console=piped_console())
    display.event("progress", PROGRESS)
    display.event("eval", {"step": 1150, "accuracy": 0.962})
    assert display.status_line() == (
        "step 1150 | loss 0.053 | 412 samples/s | 2 peers | 37 rounds (last 2 peers) | acc 0.962 | "
        "run 23,200/143,700 samples (16%), ETA 4:51"
    )
    display.close()


def test_status_line_leaves_out_missing_fields_and_shows_the_goal_without_goal_samples():
    display = Display(False, None, console=piped_console())
    display.event("progress", {"step": 3, "loss": None, "samples_per_s": 10.0, "peers": 1, "rounds": 0})
    assert display.status_line() == "step 3 | 10 samples/s | 1 peer | 0 rounds"
    display.event("progress", {"run_samples": 1234})
    assert display.status_line().endswith("| run 1,234 samples")
    display.close()
    with Display(False, "20 epochs", console=piped_console()) as display:
        display.event("progress", {"step": 1, "run_samples": 1234, "eta_s": 3723})
        assert display.status_line() == "step 1 | run 1,234 samples (goal: 20 epochs), ETA 1:02:03"


def test_piped_status_is_printed_on_reports_only_and_is_current():
    console = piped_console()
    with Display(False, None, console=console) as display:
        display.event("progress", PROGRESS)
        display.event("eval", {"step": 1450, "accuracy": 0.962, "best": True})
        display.event("progress", {**PROGRESS, "step": 1460})
    first, eval_line, status = lines_of(console)
    assert first.startswith("step 1150 | loss 0.053") and "acc" not in first
    assert eval_line == "step 1450: test accuracy 0.962 (best so far)"
    assert status.startswith("step 1460 |") and "| acc 0.962 |" in status


def test_every_event_updates_the_status_and_a_rollback_moves_the_step_back():
    with Display(False, None, console=piped_console()) as display:
        display.event("progress", PROGRESS)
        display.event("state_loaded", {"step": 2000})
        assert display.status_line().startswith("step 2000 |")
        display.event("eval", {"step": 3012, "accuracy": 0.5})
        reason = "loss 8.4 is far above its recent level 0.05"
        display.event("rolled_back", {"step": 3012, "to_step": 3000, "reason": reason, "source": "runs/x/step-3000.pt"})
        assert display.status_line().startswith("step 3000 |")


# ---- event lines --------------------------------------------------------------------------------


def test_event_lines(caplog):
    console = piped_console()
    with Display(False, "143,700 samples", console=console) as display, caplog.at_level(logging.DEBUG):
        display.event("started", {"run_dir": "runs/demo/ab", "prefix": "demo", "resumed_from": None, "step": 0})
        display.event(
            "started", {"run_dir": "runs/demo/ab", "prefix": "demo", "resumed_from": "c/step-30.pt", "step": 30}
        )
        display.event("state_loaded", {"step": 40})
        display.event("state_loaded", {"step": 40, "peer": "12D3KooWx"})
        display.event("eval", {"step": 50, "accuracy": 0.9})
        display.event("checkpoint", {"step": 50, "path": "c/step-50.pt", "best": True})
        reason = "loss 8.4 is far above its recent level 0.05"
        display.event("rolled_back", {"step": 3012, "to_step": 3000, "reason": reason, "source": "runs/c/step-3000.pt"})
        display.event("finished", {"reason": "max_steps", "step": 60, "accuracy": 0.971, "best_accuracy": 0.975,
                                   "rounds": 812, "checkpoint": "c/step-60.pt"})  # fmt: skip
        display.event("finished", {"reason": "stopped", "step": 1, "accuracy": None, "rounds": 1, "checkpoint": "c"})
        display.event("something_new", {"x": 1})
    shown = lines_of(console)
    debug = [line for line in shown if "DEBUG" in line]  # checkpoints: at debug level only
    assert len(debug) == 1 and debug[0].endswith("DEBUG hivecli.cli._display: Saved checkpoint c/step-50.pt at step 50")
    assert [line for line in shown if "DEBUG" not in line] == [
        "Training run demo (goal: 143,700 samples); outputs in runs/demo/ab",
        "Training run demo (goal: 143,700 samples); outputs in runs/demo/ab; resumed from step 30 (c/step-30.pt)",
        "Loaded the run's state at step 40",
        "Loaded the run's state at step 40 from peer 12D3KooWx",
        "step 50: test accuracy 0.900",
        "step 3012: loss 8.4 is far above its recent level 0.05; rolled back to step 3000 "
        "(checkpoint runs/c/step-3000.pt)",
        "Finished (max_steps) at step 60: test accuracy 0.971 (best 0.975), 812 averaging rounds; "
        "checkpoint c/step-60.pt",
        "Finished (stopped) at step 1: test accuracy -, 1 averaging round; checkpoint c",
    ]
    assert [r.levelno for r in caplog.records if "c/step-50.pt" in r.getMessage()] == [logging.DEBUG]


def test_json_lines_on_stdout_for_every_event(capsys):
    events = [("progress", PROGRESS), ("eval", {"step": 1, "accuracy": 0.5}), ("unknown", {"a": [1, 2]})]
    console = piped_console()
    with Display(True, None, console=console) as display:
        for name, fields in events:
            display.event(name, fields)
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == [{"event": n, **f} for n, f in events]
    assert "unknown" not in console.file.getvalue()


@pytest.mark.parametrize(
    ("signal_name", "expected"),
    [
        ("SIGINT", "Stopping after this step (Ctrl+C again to quit at once)..."),
        ("SIGTERM", "Stopping after this step (SIGTERM)..."),
    ],
)
def test_stopping_names_the_signal(signal_name, expected):
    console = piped_console()
    with Display(False, None, console=console) as display:
        display.stopping(signal_name)
    assert lines_of(console) == [expected]


# ---- waiting ------------------------------------------------------------------------------------


def test_piped_waiting_prints_when_it_starts_then_every_10_s(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(_display, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    console = piped_console()
    announced = "run digits-demo to be announced"
    with Display(False, None, console=console) as display:
        display.event("waiting", {"what": announced, "elapsed_s": 0.0})
        for elapsed in (2, 4, 8, 10, 12):
            clock[0] = 100.0 + elapsed
            display.event("waiting", {"what": announced, "elapsed_s": float(elapsed)})
        display.event("waiting", {"what": announced, "done": True})
        display.event("waiting", {"what": "1 more peer of run digits-demo to join", "elapsed_s": 0, "remaining_s": 272})
        display.event("waiting", {"done": True})
    assert lines_of(console) == [
        "waiting for run digits-demo to be announced",
        "waiting for run digits-demo to be announced (10 s)",
        "waiting for 1 more peer of run digits-demo to join (4:32 left; Ctrl+C to stop)",
    ]


# ---- on a terminal ------------------------------------------------------------------------------


def test_terminal_shows_a_live_status_and_prints_log_records_above_it(monkeypatch):
    console = terminal_console(monkeypatch)
    with Display(False, None, console=console) as display:
        assert display.live is not None
        display.event("progress", PROGRESS)
        log.warning("a log record")
        display.event("eval", {"step": 1450, "accuracy": 0.962})
        status = display.status_line()
    shown = screen_lines(console)
    # the log record and the eval line are whole lines, never glued to the status line
    assert any(re.fullmatch(r"\S+ \S+ WARNING hivecli.test_display: a log record", line) for line in shown)
    assert "step 1450: test accuracy 0.962" in shown
    # the status under the eval line is already current
    assert shown[shown.index("step 1450: test accuracy 0.962") + 1] == status
    assert status.startswith("step 1450 |") and "acc 0.962" in status
    assert console.file.getvalue().endswith("\x1b[2K")  # transient: erased at close


def test_terminal_waiting_is_a_spinner_line(monkeypatch):
    console = terminal_console(monkeypatch)
    with Display(False, None, console=console) as display:
        display.event("waiting", {"what": "run digits-demo to be announced", "elapsed_s": 12})
        display.event("waiting", {"done": True})
        display.event("state_loaded", {"step": 5})
    shown = screen_lines(console)
    assert any(re.fullmatch(r". waiting for run digits-demo to be announced \(1[23] s\)", line) for line in shown)
    after = shown[shown.index("Loaded the run's state at step 5") :]
    assert not any("waiting" in line for line in after)  # done: the spinner is gone


def test_logging_goes_through_the_display_while_it_is_open_and_is_restored(monkeypatch):
    root = logging.getLogger()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(terminal)
    try:
        console = piped_console()
        display = Display(False, None, console=console)
        assert terminal not in root.handlers  # replaced, or records would be printed twice
        display.event("progress", {"step": 1})
        log.warning("first")
        display.event("progress", {"step": 2})
        display.close()
        display.close()  # idempotent
        assert terminal in root.handlers and display._handler not in root.handlers
        log.warning("after close")
    finally:
        root.removeHandler(terminal)
    assert lines_of(console) == ["step 1", "WARNING hivecli.test_display: first", "step 2"]


def test_events_and_logs_from_several_threads_do_not_deadlock(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # checkpoint events log too
    console = terminal_console(monkeypatch)
    display = Display(False, None, console=console)
    display.live.refresh_per_second = 1000  # the refresh thread takes its lock and ours all the time

    def work(index: int) -> None:
        for step in range(200):
            display.event("progress", {"step": step, "peers": index})
            display.event("checkpoint", {"step": step, "path": "p"})
            log.warning("thread %d step %d", index, step)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    display.close()


# ---- stop_on_signals ----------------------------------------------------------------------------


def send(sig: int, stop) -> None:
    os.kill(os.getpid(), sig)
    stop.wait(5)  # the handler runs in this (the main) thread, at the latest during this wait


@pytest.mark.parametrize(("sig", "name", "code"), [(signal.SIGTERM, "SIGTERM", 0), (signal.SIGINT, "SIGINT", 130)])
def test_stop_on_signals_records_the_signal_and_restores_the_handlers(sig, name, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    calls = []
    with stop_on_signals(on_stop=calls.append) as stop:
        assert not stop.is_set() and stop.signal_name is None and stop.exit_code == 0
        send(sig, stop)
        assert stop.is_set()
        send(signal.SIGTERM, stop)  # later signals: ignored
    assert (stop.signal_name, stop.exit_code, calls) == (name, code, [name])
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_sigint_raises_keyboard_interrupt_when_asked():
    before = signal.getsignal(signal.SIGINT)
    calls = []
    with pytest.raises(KeyboardInterrupt), stop_on_signals(on_stop=calls.append, second_interrupt_raises=True) as stop:
        send(signal.SIGINT, stop)
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(5)
    assert calls == ["SIGINT"] and stop.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before

    with stop_on_signals() as stop:  # not asked: ignored
        send(signal.SIGINT, stop)
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(0.2)
    assert stop.signal_name == "SIGINT"


def test_stop_on_signals_without_a_signal_and_outside_the_main_thread():
    with stop_on_signals() as stop:
        stop.set()  # a stop asked by the program itself
    assert stop.signal_name is None and stop.exit_code == 0
    errors = []

    def in_thread():
        try:
            with stop_on_signals():
                pass
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1
