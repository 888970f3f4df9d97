"""`hive monitor`: the whole-run curve a peer publishes, the monitor's history (every field from
the DHT checked), its web API, and a real browser watching a live 3-peer run on loopback."""

import itertools
import json
import math
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hivecli._exceptions import ConfigError
from hivecli.monitor.collector import Collector
from hivecli.monitor.history import MAX_PEERS, RunHistory, check_record
from hivecli.monitor.server import DashboardServer
from hivecli.progress import Curve
from hivecli.testing import HiveProcess, wait_for

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "recipes" / "default.toml")
ARTIFACTS = Path(os.environ.get("HIVE_TEST_ARTIFACTS", REPO / "test-artifacts"))


# ---- the curve in each progress record ---------------------------------------------------------


def test_a_curve_spans_the_whole_run_in_bounded_points():
    curve = Curve(capacity=16)
    for step in range(1000):
        curve.add(1000.0 + step, step, 1.0 / (step + 1), None, 10.0)
    points = curve.points()
    assert len(points) < 16
    steps = [p[1] for p in points]
    strides = {b - a for a, b in itertools.pairwise(steps)}
    assert len(strides) == 1  # evenly spaced
    assert steps[0] == 0 and steps[-1] >= 999 - strides.pop()  # from the start to within one stride of now
    assert points[3][2] == pytest.approx(1.0 / (steps[3] + 1))


def test_a_curve_needs_room_for_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        Curve(capacity=1)


# ---- what the monitor keeps ---------------------------------------------------------------------


def _record(time_, step, loss=1.0, **more):
    return {"time": time_, "step": step, "loss": loss, "samples_per_s": 5.0, "accuracy": 0.5, **more}


def test_history_adds_a_point_per_new_report_and_fills_in_the_peers_own_curve():
    history = RunHistory("demo")
    earlier = [[100.0, 0, 2.0, None, 1.0], [110.0, 10, 1.5, 0.2, 1.0], [130.0, 30, 9.0, None, 1.0]]
    history.update({"summary": {"model": "mlp"}, "peers": {"a": _record(120.0, 20, curve=earlier)}}, now=121.0)
    history.update({"peers": {"a": _record(120.0, 20)}}, now=123.0)  # the same report again: no new point
    history.update({"peers": {"a": _record(124.0, 24, loss=0.9)}}, now=125.0)
    curve = history.peers["a"].curve
    # the published curve fills in before the first report (its point at 130 is not older: dropped)
    assert [p[1] for p in curve] == [0, 10, 20, 24]
    assert curve[-1][2] == 0.9
    assert [p[1] for p in history.run_curve] == [1, 1, 1]  # one live peer at every poll
    assert history.summary == {"model": "mlp"}


def test_history_checks_every_field_a_stranger_wrote():
    hostile = {
        "time": 50.0, "step": -3, "loss": math.nan, "accuracy": 7.0, "samples_per_s": True, "reach": "x" * 500,
        "bytes_sent": "lots", "recent_rounds": [[1.0, 2, 0.5, True], ["x", 2, 0.5, True], [1.0, 10**9, 1.0, False]],
        "pace_mbps": -5.0,
    }  # fmt: skip
    checked = check_record(hostile)
    assert checked["pace_mbps"] is None and check_record({"pace_mbps": 93.5})["pace_mbps"] == 93.5
    assert checked["step"] is None and checked["loss"] is None and checked["accuracy"] is None
    assert checked["samples_per_s"] is None and checked["reach"] is None and checked["bytes_sent"] is None
    assert checked["recent_rounds"] == [(1.0, 2, 0.5, True)]
    history = RunHistory("demo")
    history.update({"peers": {"b": hostile, "c": "not a record", 7: _record(1.0, 1)}}, now=51.0)
    snapshot = history.snapshot(now=51.0)
    assert set(snapshot["peers"]) == {"b"}
    json.dumps(snapshot, allow_nan=False)  # nothing non-finite reaches the page


def test_history_keeps_a_bounded_number_of_peers_and_dedupes_rounds():
    history = RunHistory("demo")
    flood = {f"peer{i}": _record(1000.0 + i, i) for i in range(MAX_PEERS + 50)}
    history.update({"peers": flood}, now=1400.0)
    assert len(history.peers) == MAX_PEERS
    assert "peer0" not in history.peers and f"peer{MAX_PEERS + 49}" in history.peers  # the oldest went
    rounds = [[10.0, 3, 0.25, True], [12.0, 3, 0.5, False]]
    for stamp in (2000.0, 2002.0):
        history.update({"peers": {"x": _record(stamp, 1, recent_rounds=rounds)}}, now=stamp)
    assert [(r[0], r[1], r[4]) for r in history.rounds] == [(10.0, "x", True), (12.0, "x", False)]


# ---- the web API ---------------------------------------------------------------------------------


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers, response.read()


@pytest.fixture
def served():
    collector = Collector(dht=None)  # never started: the test fills its history itself
    history = collector.histories["demo"] = RunHistory("demo")
    now = time.time()
    history.update({"peers": {"a": _record(now - 30, 1), "b": _record(now - 1, 2)}}, now=now)
    with DashboardServer(collector, "127.0.0.1", 0) as server:
        yield server


def test_the_api_serves_the_runs_and_only_newer_points(served):
    status, headers, body = _get(served.url + "api/state")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    state = json.loads(body)
    peers = state["runs"]["demo"]["peers"]
    assert set(peers) == {"a", "b"} and peers["b"]["step"] == 2 and len(peers["a"]["curve"]) == 1
    newer = json.loads(_get(served.url + f"api/state?since={time.time() - 10}")[2])
    assert newer["runs"]["demo"]["peers"]["a"]["curve"] == []  # its only point is older
    assert len(newer["runs"]["demo"]["peers"]["b"]["curve"]) == 1


def test_the_page_and_its_files_are_served_with_a_strict_policy_and_nothing_else(served):
    status, headers, body = _get(served.url)
    assert status == 200 and b"uPlot.iife.min.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"):
        assert _get(served.url + "static/" + name)[0] == 200
    for bad in ("static/..%2F..%2Fpyproject.toml", "static/history.py", "api/state?since=soon"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(served.url + bad)
        assert caught.value.code in (400, 404)
        caught.value.close()


def test_a_port_in_use_is_a_clear_usage_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} .*in use.*--port"):
            DashboardServer(Collector(dht=None), "127.0.0.1", port).start()


def test_a_training_peer_serves_its_runs_dashboard(tmp_path):
    args = ["--json", "--host", "127.0.0.1", "--port", "0", "--max-seconds", "60", "--dashboard", "0"]
    with HiveProcess("start", DEFAULT, *args, cwd=tmp_path) as peer:
        url = peer.wait_event("dashboard", timeout=90)["url"]
        assert url.startswith("http://127.0.0.1:")
        me = peer.wait_event("listening")["peer_id"]

        def my_record():
            runs = json.loads(_get(url + "api/state")[2])["runs"]
            return runs.get("digits-demo", {}).get("peers", {}).get(me)

        record = wait_for(my_record, timeout=60, what="the peer's own record on its dashboard")
        assert record["live"] and record["reach"] in ("public", "unknown", "relayed", "client")


# ---- a browser on a live run ----------------------------------------------------------------------


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("REQUIRE_BROWSER_TESTS"):
            raise AssertionError("CI must have chromium and chromedriver (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.mark.timeout(240)
def test_a_browser_sees_three_peers_and_the_loss_curve_grow(tmp_path):
    args = ["--json", "--host", "127.0.0.1", "--port", "0", "--max-seconds", "150"]
    with HiveProcess("start", DEFAULT, *args, cwd=tmp_path) as first:
        address = first.wait_event("listening", timeout=90)["maddrs"][0]
        with HiveProcess("join", address, *args, cwd=tmp_path), HiveProcess("join", address, *args, cwd=tmp_path), \
                HiveProcess("monitor", address, "--port", "0", "--interval", "1", cwd=tmp_path) as monitor:  # fmt: skip
            line = monitor.wait_stdout("http://", timeout=60)
            url = line[line.index("http://") :].split()[0]
            browser = _browser()
            try:
                browser.get(url)
                peers = lambda: int(browser.find_element("tag name", "body").get_attribute("data-peers"))  # noqa: E731
                points = lambda: int(browser.find_element("tag name", "body").get_attribute("data-loss-points"))  # noqa: E731
                wait_for(lambda: peers() == 3 and points() > 0, timeout=120, what="3 peers with loss points")
                before = points()
                wait_for(lambda: points() > before, timeout=60, what="the loss curve to gain points")
                rows = browser.find_elements("css selector", "#peers tbody tr")
                assert len(rows) == 3
                assert browser.find_elements("css selector", "#loss-chart canvas")  # uPlot drew the chart
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                assert browser.save_screenshot(str(ARTIFACTS / "monitor.png"))
            finally:
                browser.quit()


# ---- the command ------------------------------------------------------------------------------------


def _hive(*args, cwd):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "hivecli.cli.main", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_export_writes_every_peers_whole_run_curve_as_tensorboard_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hivecli.dht.records import owned_subkey
    from hivecli.runs import RUNS_KEY, publish_progress
    from hivecli.testing import local_swarm
    from hivecli.utils.timing import get_dht_time

    with local_swarm(2) as dhts:
        now = get_dht_time()
        summary = {"prefix": "demo", "owner": str(dhts[0].peer_id), "run_id": "r1", "model": "mlp"}
        dhts[0].store(RUNS_KEY, summary, now + 600, subkey=owned_subkey(dhts[0].peer_id, "demo"))
        for k, dht in enumerate(dhts):
            curve = [[now - 100 + i, 10 * i, 2.0 - 0.1 * i - k, None, 5.0] for i in range(8)]
            publish_progress(dht, "demo", {**_record(now, 80, loss=1.0 - k), "curve": curve, "run_id": "r1"}, 600)
        address = str(dhts[0].get_visible_maddrs()[0])
        done = _hive("monitor", address, "--run", "demo", "--export", str(tmp_path / "tb"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "run demo: 2 peers, 18 points" in done.stdout
    runs = sorted((tmp_path / "tb" / "demo").iterdir())
    assert len(runs) == 2
    for run in runs:
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        losses = accumulator.Scalars("train/loss")
        assert [e.step for e in losses] == [0, 10, 20, 30, 40, 50, 60, 70, 80]  # the curve, then the latest report
        assert losses[-1].value in (pytest.approx(1.0), pytest.approx(0.0))


def test_monitor_of_an_address_nobody_listens_on_exits_3_with_one_line(tmp_path):
    from hivecli.net import Identity

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
    done = _hive("monitor", address, "--timeout", "5", cwd=tmp_path)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "hive: error:" in done.stderr and str(port) in done.stderr
