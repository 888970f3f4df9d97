"""TensorBoard event files (hivecli.tblogs): what ScalarLog and export_curves write, read back with
TensorBoard's own reader; a real training run's scalars against its metrics.jsonl; the error
without the tensorboard package; and the recipe key output.tensorboard."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import Events

from hivecli._exceptions import ConfigError
from hivecli.recipe import load_recipe
from hivecli.rundir import new_run_id
from hivecli.tblogs import ScalarLog, export_curves, run_name, tag
from hivecli.testing import local_swarm, wait_for

MISSING = (
    "output.tensorboard = true needs the tensorboard package; install it with pip install 'hivecli[tensorboard]', "
    "or set output.tensorboard = false"
)


def read(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator


def points(accumulator: EventAccumulator, name: str) -> list[tuple[float, int, float]]:
    return [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(name)]


def f32(value: float) -> float:
    return float(np.float32(value))


# ---- ScalarLog ------------------------------------------------------------------------------------------


def test_scalars_are_written_under_their_tags_at_their_steps_and_wall_times(tmp_path):
    rows = [
        (1_800_000_000.25, 3, {"loss": 2.3026, "peers": 2, "samples_per_s": 812.4, "accuracy": None}),
        (1_800_000_002.5, 7, {"loss": 1.1, "peers": 3, "samples_per_s": 900.0, "accuracy": 0.61}),
        (1_800_000_004.75, 12, {"loss": 0.123456789, "peers": 3, "samples_per_s": 0.1, "accuracy": 0.875}),
    ]
    with ScalarLog(tmp_path / "tb") as log:
        for wall_time, step, fields in rows:
            log.add(step, fields, wall_time=wall_time)
    acc = read(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {"train/loss", "run/peers", "train/samples_per_s", "eval/accuracy"}
    for name, tb_tag in (("loss", "train/loss"), ("peers", "run/peers"), ("samples_per_s", "train/samples_per_s")):
        assert points(acc, tb_tag) == [(t, step, f32(fields[name])) for t, step, fields in rows]
    assert points(acc, "eval/accuracy") == [(t, step, f32(f["accuracy"])) for t, step, f in rows[1:]]  # once known


def test_only_finite_numbers_are_written(tmp_path):
    fields: dict[str, Any] = {
        "loss": 0.5,
        "eta_s": None,
        "left": True,
        "mode": "diloco",
        "maddrs": ["/ip4/127.0.0.1/tcp/1"],
        "nan": math.nan,
        "inf": -math.inf,
        "huge": 10**400,  # no float at all
        "too_big_for_float32": 1e300,
        "step": 99,  # the point's step, not a curve
        "time": 1.0,  # its wall time, not a curve
        "lr": np.float32(0.25),
        "run/custom": np.int64(4),
    }
    with ScalarLog(tmp_path) as log:
        assert log.add(5, fields, wall_time=1_800_000_000.0) == 3
    acc = read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "run/custom"}
    assert points(acc, "train/lr") == [(1_800_000_000.0, 5, 0.25)]
    assert points(acc, "run/custom") == [(1_800_000_000.0, 5, 4.0)]


def test_without_a_wall_time_the_point_is_stamped_now_and_flush_makes_it_readable(tmp_path):
    log = ScalarLog(tmp_path, flush_secs=3600)
    try:
        before = time.time()
        log.add(1, {"loss": 1.0})
        after = time.time()
        log.flush()  # in the file when flush returns, long before flush_secs
        [(wall_time, step, value)] = points(read(tmp_path), "train/loss")
        assert before <= wall_time <= after and (step, value) == (1, 1.0)
    finally:
        log.close()
    log.close()  # a second close does nothing
    log.flush()


def test_tags_group_the_fields():
    assert [tag(n) for n in ("loss", "accuracy", "peers", "run_samples", "rounds", "eta_s")] == [
        "train/loss", "eval/accuracy", "run/peers", "run/samples", "averaging/rounds", "run/eta_s",
    ]  # fmt: skip
    assert (tag("lr"), tag("system/cpu")) == ("train/lr", "system/cpu")


# ---- export_curves --------------------------------------------------------------------------------------


def test_export_writes_one_run_per_peer(tmp_path):
    a, b = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "../peer b/with:odd*chars"
    series = {
        a: [(1_800_000_010.0, 20, {"loss": 0.9, "accuracy": 0.5}), (1_800_000_000.0, 10, {"loss": 1.7})],
        b: [(1_800_000_001.0, 4, {"loss": 2.2, "run_samples": 640, "mode": "collaborative"})],
    }
    written = export_curves(tmp_path / "export", series)
    assert written == [tmp_path / "export" / a, tmp_path / "export" / run_name(b)]
    assert all(path.parent == tmp_path / "export" and path.is_dir() for path in written)
    assert run_name(b) == "_peer_b_with_odd_chars"
    first, second = read(written[0]), read(written[1])
    # in the order of their wall times: TensorBoard would take a step that goes back for a restart
    assert points(first, "train/loss") == [(1_800_000_000.0, 10, f32(1.7)), (1_800_000_010.0, 20, f32(0.9))]
    assert points(first, "eval/accuracy") == [(1_800_000_010.0, 20, 0.5)]
    assert set(second.Tags()["scalars"]) == {"train/loss", "run/samples"}
    assert points(second, "run/samples") == [(1_800_000_001.0, 4, 640.0)]
    # the reader that TensorBoard's own --logdir uses sees every peer as a run
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "export"))
    runs.Reload()
    assert set(runs.Runs()) == {a, run_name(b)}


def test_export_keeps_peers_apart_whose_safe_names_collide(tmp_path):
    written = export_curves(tmp_path, {"a:b": [(1.0, 1, {"loss": 1.0})], "a*b": [(1.0, 1, {"loss": 2.0})], "": []})
    assert [p.name for p in written] == ["a_b", "a_b-2", "peer"]
    assert [points(read(p), "train/loss")[0][2] for p in written[:2]] == [1.0, 2.0]


# ---- without the tensorboard package ----------------------------------------------------------------------


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_without_tensorboard_the_writer_says_which_setting_needs_it(no_tensorboard, tmp_path):
    with pytest.raises(ConfigError) as info:
        ScalarLog(tmp_path / "tb")
    assert str(info.value) == MISSING
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ConfigError, match=r"^exporting TensorBoard event files needs the tensorboard package; "):
        export_curves(tmp_path / "export", {"a": [(1.0, 1, {"loss": 1.0})]})
    assert not (tmp_path / "export").exists()


def test_a_tensorboard_too_old_for_torch_is_named_with_the_cause(monkeypatch, tmp_path):
    import types

    import torch.utils.tensorboard  # noqa: F401  (so that monkeypatch puts it back afterwards)

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")  # torch checks the version as it imports it
    monkeypatch.setitem(sys.modules, "tensorboard", types.SimpleNamespace(__version__="1.14"))
    with pytest.raises(ConfigError) as info:
        ScalarLog(tmp_path)
    assert str(info.value) == (
        "output.tensorboard = true needs a working tensorboard package (importing it failed: TensorBoard logging "
        "requires TensorBoard version 1.15 or above); install it with pip install --upgrade 'hivecli[tensorboard]', "
        "or set output.tensorboard = false"
    )


def test_without_tensorboard_the_trainer_refuses_to_start(no_tensorboard, tmp_path):
    from hivecli.training import Trainer

    recipe = load_recipe(None, ["output.tensorboard=true", 'model.name="mlp"'], env={})
    with local_swarm(1) as dhts, pytest.raises(ConfigError) as info:
        Trainer(recipe, dhts[0], tmp_path / "peer", Events(), run_id=new_run_id())
    assert str(info.value) == MISSING
    assert not (tmp_path / "peer" / "metrics.jsonl").exists()  # refused before it trained or wrote anything


# ---- a real training run ------------------------------------------------------------------------------------


def test_a_training_run_writes_its_progress_rows_as_scalars(tmp_path):
    from hivecli.training import Trainer

    overrides = [
        f'output.dir="{tmp_path}"', "output.tensorboard=true", "output.report_every_seconds=0.02",
        "output.eval_every_steps=40", "limits.max_steps=150", 'model.name="mlp"', "data.batch_size=16",
        "run.prefix=tensorboard-test", "run.total_samples=1000000",
    ]  # fmt: skip
    recipe = load_recipe(None, overrides, env={})
    run_dir, stop, result = tmp_path / "peer", threading.Event(), []
    with local_swarm(1) as dhts:
        trainer = Trainer(recipe, dhts[0], run_dir, Events(), run_id=new_run_id())
        thread = threading.Thread(target=lambda: result.append(trainer.run(stop)))
        try:
            thread.start()
            wait_for(lambda: not thread.is_alive(), 90, "the run to reach limits.max_steps")
        finally:
            stop.set()
            thread.join(timeout=60)
            trainer.close()
    assert result == ["max_steps"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [row for row in rows if row["event"] == "progress"]
    assert len(progress) >= 2 and progress[-1]["step"] == 150
    acc = read(run_dir / "tensorboard")
    assert {"train/loss", "train/samples_per_s", "eval/accuracy", "run/peers", "run/samples", "run/goal_samples",
            "run/eta_s", "averaging/rounds", "averaging/last_group_size"} <= set(acc.Tags()["scalars"])  # fmt: skip
    for field, tb_tag in (("loss", "train/loss"), ("run_samples", "run/samples"), ("peers", "run/peers"),
                          ("eta_s", "run/eta_s"), ("accuracy", "eval/accuracy")):  # fmt: skip
        expected = [(row["step"], f32(row[field])) for row in progress if row[field] is not None]
        assert expected, field
        assert [(step, value) for _, step, value in points(acc, tb_tag)] == expected, field
    for row, (wall_time, _, _) in zip(progress, points(acc, "run/peers"), strict=True):
        assert abs(wall_time - row["time"]) < 1.0  # the real time of the report


# ---- the recipe key -----------------------------------------------------------------------------------------


def test_output_tensorboard_is_off_by_default_and_strictly_true_or_false(tmp_path):
    assert load_recipe(None, env={}).output.tensorboard is False
    assert load_recipe(None, env={"HIVE_OUTPUT_TENSORBOARD": "true"}).output.tensorboard is True
    path = tmp_path / "recipe.toml"
    path.write_text('[output]\ntensorboard = "yes"\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(path, env={})
    assert str(info.value) == (
        f'{path}: output.tensorboard = "yes": must be true or false, not text (write true or false, without quotes)'
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(None, ["output.tensorboard=1"], env={})
    assert str(info.value) == "--set output.tensorboard=1: must be true or false, not a number"
