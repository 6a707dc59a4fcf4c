"""Faults during a search: nothing lost, nothing counted twice (issue 13).

Fast tests pin the mechanisms (the driver lock, the checkpoint fallback, reports not
logged twice after a restore, untracked spend in the budget); the slow ones run the
chaos harness of ``bench/chaos.py`` (kills, Ctrl-C, a killed trial, a truncated
checkpoint; an MLflow server outage and a node out of memory) and audit the result.
Losing a worker node and getting it back is tested on the two-node cluster of
tests/test_cluster.py (the harness's own ``node`` fault is exercised by the bench).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from search.budget import BudgetPolicy, BudgetStopper, set_untracked_spend
from search.lock import SearchLock, SearchLocked
from search.trainable import STATE_FILE, load_state
from tests.bench_scripts import load_bench
from trainers.tracking import TrialTracker, experiment_id, find_or_create_parent

ROOT = Path(__file__).resolve().parents[1]


def _bench_chaos():
    return load_bench("chaos")


def test_a_second_driver_of_the_same_search_refuses_in_one_line(tmp_path: Path) -> None:
    storage = tmp_path / "ray"
    with SearchLock(storage / "twice"):
        cmd = [sys.executable, "-m", "recscale", "search", "--data", "synthetic",
               "--max-rows", "3000", "--name", "twice", "--budget-flops", "1e10",
               "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
               "--gpus", "off", "-v", "0"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT),
                                  "RECSCALE_CACHE": str(tmp_path / "cache")})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert lines[-1].startswith("recscale: error: search 'twice' is already running")
    assert f"pid {os.getpid()}" in lines[-1]
    assert not (tmp_path / "m.db").exists()  # refused before touching MLflow


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """SIGKILL leaves no stale lock: the next driver takes it."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\nfrom search.lock import SearchLock\n"
            f"with SearchLock(Path({str(tmp_path)!r}) / 's'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SearchLocked, match=f"pid {holder.pid}"), SearchLock(tmp_path / "s"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with SearchLock(tmp_path / "s") as lock:
            assert lock.owner()["pid"] == os.getpid()
    finally:
        holder.kill()


def _checkpoint(root: Path, i: int, value: float) -> Path:
    d = root / f"checkpoint_{i:06d}"
    d.mkdir(parents=True)
    torch.save({"examples_seen": i, "w": torch.full((64,), value)}, d / STATE_FILE)
    return d


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    old, new = _checkpoint(tmp_path, 1, 1.0), _checkpoint(tmp_path, 2, 2.0)
    assert load_state(str(new))["examples_seen"] == 2  # type: ignore[index]
    data = (new / STATE_FILE).read_bytes()
    (new / STATE_FILE).write_bytes(data[: len(data) // 2])
    state = load_state(str(new))
    assert state is not None and state["examples_seen"] == 1 and float(state["w"][0]) == 1.0
    (old / STATE_FILE).write_bytes(b"")
    assert load_state(str(new)) is None  # nothing readable: the trial starts over


def test_a_restored_trial_does_not_log_its_reports_twice(tmp_path: Path) -> None:
    """A trial restored from a checkpoint older than its last logged report re-runs
    those reports (exact resume): they are not logged again."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    first = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")
    for step in (100, 200, 300):
        first.log({"val_logloss": 0.6 - step / 1e4, "train_flops": float(step)})
    first.flush()
    again = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")  # restored
    assert again.run_id == first.run_id and again.logged_upto == 300
    for step in (200, 300, 400):
        again.log({"val_logloss": 0.6 - step / 1e4, "train_flops": float(step)})
    again.flush()
    steps = [m.step for m in sorted(client.get_metric_history(first.run_id, "val_logloss"),
                                    key=lambda m: m.timestamp)]
    assert steps == [100, 200, 300, 400]
    assert experiment_id(client, "s") == exp_id


def test_a_report_lost_with_a_killed_worker_is_filled_in_its_place(tmp_path: Path) -> None:
    """MLflow writes a trial's batches on several threads: a worker killed while the
    report at 300 still retried through an outage leaves 400 in MLflow and 300 out. The
    restored trial (checkpoint at 300, history 100-300) fills 300 in, in its place, and
    the audit finds no gap and nothing out of order; a report MLflow holds is not
    logged again."""
    from analysis.audit import _series_problems

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    first = TrialTracker(uri, exp_id, parent, "t1", "wukong", {"train.batch_size": 1}, "s")
    client.log_metric(first.run_id, "flops_per_example", 100 / 3, step=0)
    for step in (100, 200, 400):  # 300 lost with the worker
        first.log({"val_logloss": 0.6 - step / 1e4, "train_flops": float(step)})
    first.flush()
    run = client.get_run(first.run_id)
    assert any("gap" in p for p in _series_problems(client, run, "t1", 100.0))

    again = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")  # restored at 300
    assert sorted(again.logged_steps) == [100, 200, 400] and again.logged_upto == 400
    for step in (100, 200, 300, 400, 500):  # the checkpoint's history, then trained on
        again.log({"val_logloss": 0.6 - step / 1e4, "train_flops": float(step)})
    again.flush()
    history = client.get_metric_history(first.run_id, "val_logloss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert steps == [100, 200, 300, 400, 500]
    stamps = {m.step: m.timestamp for m in history}
    assert stamps[300] == stamps[200] <= stamps[400] <= stamps[500]
    assert _series_problems(client, client.get_run(first.run_id), "t1", 100.0) == []


def test_reports_tune_received_but_mlflow_lacks_are_written_at_the_end(tmp_path: Path) -> None:
    """Tune ends a search by killing the trials' actors, without waiting for their
    writes: a run may lack reports Tune received (here 200 and the last, 300; a cut
    line in result.json is skipped). The driver's last pass writes them in place, with
    the report's metrics only, so MLflow's result for the trial is Tune's."""
    import json
    from types import SimpleNamespace

    import pyarrow.fs

    from analysis.audit import _series_problems
    from search.tracking import settle_trial_runs, tune_reports

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    tracker = TrialTracker(uri, exp_id, parent, "t1", "wukong", {"train.batch_size": 1}, "s",
                           constants={"flops_per_example": 100 / 3})
    received = [{"val_logloss": 0.6 - s / 1e4, "val_auc": 0.5 + s / 1e4, "train_flops": s,
                 "trial_id": "t1", "pid": os.getpid(), "node_id": "elsewhere",
                 "device": "cpu"} for s in (100, 200, 300)]  # what Tune got; MLflow: 100
    tracker.log({k: received[0][k] for k in ("val_logloss", "val_auc", "train_flops")})
    tracker.flush()
    trial_dir = tmp_path / "run_trial_t1"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text(
        "".join(json.dumps(r) + "\n" for r in received) + '{"val_logloss": 0.5, "train_fl')
    trial = SimpleNamespace(trial_id="t1", storage=SimpleNamespace(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(trial_dir)))
    assert [r["train_flops"] for r in tune_reports(trial)] == [100, 200, 300]

    runs = settle_trial_runs(client, exp_id, parent, [trial])
    (run,) = runs
    assert run.data.metrics["val_logloss"] == pytest.approx(0.57)  # Tune's last, 300
    assert run.data.metrics["val_auc"] == pytest.approx(0.53)
    assert "pid" not in run.data.metrics and "device" not in run.data.metrics
    assert _series_problems(client, run, "t1", 100.0) == []
    again = settle_trial_runs(client, exp_id, parent, [trial])  # nothing more to write
    assert len(client.get_metric_history(again[0].info.run_id, "val_logloss")) == 3


def test_a_retried_trial_does_not_give_back_its_spend() -> None:
    """Tune retries a failed trial (killed worker, lost node, memory kill) from its last
    checkpoint: its reports start lower again, but what it trained before stays spent."""
    stopper = BudgetStopper(1000.0)
    assert not stopper("a", {"train_flops": 600.0})
    assert not stopper("a", {"train_flops": 300.0})  # retried from the 300 checkpoint
    assert stopper.total == 600.0
    assert stopper("b", {"train_flops": 400.0})


def test_untracked_spend_counts_against_the_budget() -> None:
    stopper = BudgetStopper(1000.0)
    policy = BudgetPolicy(1000.0, 100.0, (100.0, 300.0, 1000.0))
    try:
        assert not stopper("a", {"train_flops": 700.0})
        assert policy.decide({"a": 700.0}, []) == "start"
        set_untracked_spend(250.0)  # e.g. trials lost to a driver kill
        assert stopper.total == 950.0 and policy.decide({"a": 700.0}, []) == "done"
        assert stopper("a", {"train_flops": 760.0})
    finally:
        set_untracked_spend(0.0)


class _TuneTrial:
    """What :func:`search.budget.note_tune_trials` reads of a Tune trial."""

    def __init__(self, trial_id: str, finished: bool) -> None:
        self.trial_id, self.finished = trial_id, finished

    def is_finished(self) -> bool:
        return self.finished


def test_a_trial_tune_drops_without_telling_the_searcher_does_not_hold_the_search() -> None:
    """Tune (ray 2.60) sets a trial to ERROR without telling the searcher when it cannot
    reuse an actor for it. The searcher learns it from Tune's trials at the next step:
    the reservation is freed (before, the search waited for ever) and Optuna is told the
    trial failed; a trial suggested in the current step is never taken for such a one."""
    import optuna

    from search.budget import note_tune_trials
    from tests.searchers import small_searcher

    search = small_searcher(BudgetPolicy(1.5e6, 1e6, (1e6, 1e7)))  # room for one trial
    try:
        note_tune_trials([])
        assert search.suggest("a") is not None
        assert search.suggest("b") is None  # "a" holds the room (same step: not checked)
        note_tune_trials([_TuneTrial("a", finished=False)])
        assert search.suggest("b") is None  # "a" runs
        note_tune_trials([_TuneTrial("a", finished=True)])  # finished, the searcher not told
        assert search.suggest("b") is not None
        assert search._ot_study.trials[0].state == optuna.trial.TrialState.FAIL
        assert search.suggest("c") is None  # "b", suggested in this step, holds the room
        note_tune_trials([_TuneTrial("a", True), _TuneTrial("b", False)])
        assert search.suggest("c") is None
    finally:  # this process's view of Tune: empty again for the tests that follow
        note_tune_trials([])


@pytest.mark.slow
def test_a_search_survives_kills_ctrl_c_a_killed_trial_and_a_truncated_checkpoint(
        tmp_path: Path) -> None:
    from analysis.audit import audit_search

    chaos_mod = _bench_chaos()
    chaos = chaos_mod.Chaos(tmp_path / "chaos", budget_flops=4e10, trial_flops=6e9, seed=3)
    start = time.time()
    try:
        rc = chaos.run(["kill", "truncate", "ctrl-c", "trial"])
        structure = chaos_mod.analyze(chaos) if rc == 0 else None
    finally:
        chaos.stop()
    assert rc == 0, chaos.log
    faults = [e for e in chaos.log if e["fault"]]
    assert [e["fault"] for e in faults] == ["kill", "truncate", "ctrl-c", "trial"][:len(faults)]
    ctrl_c = [e for e in faults if e["fault"] == "ctrl-c" and "exit" in e]
    for e in ctrl_c:  # exit 130, one line saying how to resume, the parent run KILLED
        assert e["exit"] == 130, e
        assert e["last_line"].startswith("recscale: interrupted"), e
        assert "same command again to resume" in e["last_line"], e
        assert e["parent_status"] == "KILLED", e
    report = audit_search(chaos.name, chaos.uri)  # no trial run or logged twice, ...
    assert report.ok, (report.problems, chaos.log)
    n = report.numbers
    assert n["trained_flops"] <= n["spent_flops"] <= n["overshoot_bound"]
    assert structure is not None and set(structure["keys"]) >= REPORT_KEYS
    # the driver's memory series of every segment kept, one sample per finished trial
    client = MlflowClient(chaos.uri)
    exp = client.get_experiment_by_name(chaos.name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'search'")
    assert parent.info.status == "FINISHED"
    memory = [int(m.step) for m in client.get_metric_history(parent.info.run_id,
                                                             "search.driver_rss_mb")]
    runs = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'trial'",
                              max_results=1000)
    finished = sum(r.data.tags.get("trial_status") in {"COMPLETED", "STOPPED", "DIVERGED", "ERROR"}
                   for r in runs if "recscale.reference" not in r.data.tags)
    assert memory and memory == sorted(set(memory)), memory
    assert finished - 2 <= memory[-1] <= finished, (memory, finished, chaos.log)
    assert time.time() - start < 1200


#: what every report of a finished search holds, faulted or not
REPORT_KEYS = {"search", "n_trials", "frontier", "fits", "recommendation", "references"}


@pytest.mark.slow
def test_a_search_survives_an_mlflow_server_outage_and_a_node_out_of_memory(
        tmp_path: Path) -> None:
    """Logging to an MLflow server (127.0.0.1) that goes down for 10 s mid-search, then
    the node running out of memory (Ray's memory monitor kills a trial's worker), both
    in one driver: the search goes on by itself after each and to its end, exit 0, the
    audit is clean and ``recscale analyze`` reads it whole."""
    from analysis.audit import audit_search

    chaos_mod = _bench_chaos()
    # a budget the search is still spending when the memory fault strikes on a quiet
    # machine too (there it had spent 2.1e10-2.4e10 by then); Ray's kill threshold 6 GiB
    # above the memory in use at the start, so that a test on the other pytest-xdist
    # worker growing by a few GiB does not reach it before the fault
    chaos = chaos_mod.Chaos(tmp_path / "chaos", budget_flops=6e10, trial_flops=6e9, seed=5,
                            server=True, outage=10.0, oom_headroom=6.0)
    try:
        rc = chaos.run([("mlflow-down", "oom")], wait=(1.0, 3.0))
        report = audit_search(chaos.name, chaos.uri)
        structure = chaos_mod.analyze(chaos) if rc == 0 else None
    finally:
        chaos.stop()
    assert rc == 0, chaos.log
    down, oom = chaos.log[0], chaos.log[1]
    assert len(chaos.log) == 2, chaos.log  # one driver, from the start to its end
    assert down["fault"] == "mlflow-down" and down["outage_s"] == 10.0, chaos.log
    # after the outage the same driver kept training and logging
    assert down["reports_after"] >= 2, chaos.log
    # then Ray's memory monitor killed a running trial's worker; the same driver went on
    # (Tune retried the trial) and ended the search by itself
    assert oom["fault"] == "oom" and oom["oom_kills"] >= 1, chaos.log
    assert oom["reports_after"] >= 2 and oom.get("ended") == 0, chaos.log
    assert report.ok, (report.problems, chaos.log)
    n = report.numbers
    assert n["trained_flops"] <= n["spent_flops"] <= n["overshoot_bound"]
    assert structure is not None and set(structure["keys"]) >= REPORT_KEYS


def test_the_audit_finds_a_dropped_report(tmp_path: Path) -> None:
    """Two reports further apart than the trial's evaluation interval mean one was not
    logged: the audit names the gap; a whole series passes."""
    from analysis.audit import _series_problems, eval_interval

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp_id = client.create_experiment("gaps", artifact_location=str(tmp_path / "art"))
    every = eval_interval(2e4, 10.0, 100)  # 21000 FLOPs
    for name, steps in (("whole", [1, 2, 3, 4]), ("dropped", [1, 2, 4])):
        run = client.create_run(exp_id)
        client.log_param(run.info.run_id, "train.batch_size", 100)
        client.log_metric(run.info.run_id, "flops_per_example", 10.0)
        for k in steps:
            for key in ("val_logloss", "train_flops"):
                client.log_metric(run.info.run_id, key, 0.5, step=int(k * every))
        got = _series_problems(client, client.get_run(run.info.run_id), name, 2e4)
        if name == "whole":
            assert got == []
        else:
            assert len(got) == 2 and all("1 gap(s)" in g for g in got), got
            assert _series_problems(client, client.get_run(run.info.run_id), name, None) == []


def test_the_report_structure_ignores_numbers_but_not_keys() -> None:
    from analysis.audit import report_structure

    a = {"n_trials": 3, "fits": {"joint": {"a": 1}}, "files": ["x.png"]}
    b = {"n_trials": 9, "fits": {"joint": {"a": 2}}, "files": ["x.png"]}
    assert report_structure(a) == report_structure(b)
    assert report_structure(a) != report_structure({**b, "fits": {}})
    assert report_structure(a) != report_structure({**b, "files": []})
    counts = {**a, "trial_status": {"STOPPED": 2}}  # counts keyed by data are not shape
    assert report_structure(counts) == report_structure({**counts, "trial_status": {"LOST": 1}})


def test_the_fault_schedule_holds_every_fault_class() -> None:
    chaos_mod = _bench_chaos()
    faults = chaos_mod.schedule(10, seed=0, server=True, cluster=True)
    assert faults.count("kill") == 9 and len(faults) == 15
    assert {"truncate", "ctrl-c", "trial", "oom", "mlflow-down", "node"} <= set(faults)
    assert faults == chaos_mod.schedule(10, seed=0, server=True, cluster=True)  # seeded


def test_a_state_cut_short_by_a_kill_is_set_aside(tmp_path: Path) -> None:
    """Tune rewrites its state files in place; a kill mid-write leaves one empty. The
    newest whole session is restored instead; with none whole the search starts afresh."""
    from search.runner import repair_tune_state

    def session(stamp: str, state: str) -> None:
        (tmp_path / f"experiment_state-{stamp}.json").write_text(state)
        (tmp_path / f"search_gen_state-{stamp}.json").write_bytes(b"\x80\x04N.")
        (tmp_path / f"callback-states-{stamp}.pkl").write_bytes(b"\x80\x04N.")

    session("2026-11-30_10-00-00", '{"trial_data": []}')
    session("2026-11-30_11-00-00", "")  # killed while writing
    assert repair_tune_state(tmp_path) is False
    assert [p.name for p in tmp_path.glob("experiment_state-*")] == [
        "experiment_state-2026-11-30_10-00-00.json"]
    assert (tmp_path / ".unreadable" / "experiment_state-2026-11-30_11-00-00.json").exists()
    assert not (tmp_path / "search_gen_state-2026-11-30_11-00-00.json").exists()
    (tmp_path / "experiment_state-2026-11-30_10-00-00.json").write_text('{"trial_da')
    assert repair_tune_state(tmp_path) is True  # nothing whole is left
    assert repair_tune_state(tmp_path / "absent") is False


def test_a_trial_run_killed_before_its_config_is_left_out_of_the_analysis(
        tmp_path: Path) -> None:
    """A driver killed between creating a trial's run and writing its config.json leaves
    a run with no typed config (and no report): the search still reads back, without it."""
    import json

    from analysis.runs import load_search
    from trainers.contracts import KIND_SEARCH, KIND_TRIAL, TAG_CONFIG, TAG_KIND, TAG_PARENT
    from trainers.experiment import ExperimentConfig

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("half", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp_id, tags={TAG_KIND: KIND_SEARCH})
    cfg = ExperimentConfig(model={"block": "tokenmixer", "d_model": 16, "n_tokens": 4})
    for trial_id, tags in (("whole", {TAG_CONFIG: json.dumps(cfg.to_dict())}), ("half", {})):
        run = client.create_run(exp_id, tags={TAG_KIND: KIND_TRIAL, "trial_id": trial_id,
                                              TAG_PARENT: parent.info.run_id, **tags})
        if tags:
            client.log_metric(run.info.run_id, "val_logloss", 0.6, step=100)
    runs = load_search("half", uri)
    assert list(runs.trials["trial_id"]) == ["whole"]


def _memory_crash() -> RuntimeError:
    """What Ray 2.60's Tune raises when Ray's memory monitor kills a trial's worker."""
    from ray.exceptions import OutOfMemoryError

    try:
        try:
            raise OutOfMemoryError("1 worker(s) were killed due to the node running low on "
                                   "memory.\nOOM kill reason: usage over the threshold")
        except OutOfMemoryError as err:
            raise RuntimeError(f"Caught unexpected exception: {err}") from err
    except RuntimeError as crash:
        return crash


def test_a_search_stopped_by_a_memory_kill_resumes_in_the_same_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune ends ``fit`` when Ray kills a trial worker for memory; ``run_search`` shuts
    Ray down and runs the search again from its saved state, as rerunning the command
    would, and gives up with one line after ``MEMORY_RESTARTS``. Other errors pass."""
    import ray

    from search import runner
    from search.settings import SearchConfig
    from trainers.data import DataConfig, SyntheticConfig

    cfg = SearchConfig(name="oom", budget_flops=1e10, data=DataConfig(
        name="synthetic", synthetic=SyntheticConfig(n_rows=2000)))
    calls: list[int] = []
    shutdowns: list[int] = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))

    def crashes_twice(plan, uri, address, verbose):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) <= 2:
            raise _memory_crash()
        return "outcome"

    monkeypatch.setattr(runner, "_run_search", crashes_twice)
    assert runner.run_search(cfg, storage=tmp_path) == "outcome"
    assert len(calls) == 3 and len(shutdowns) == 2

    calls.clear()
    monkeypatch.setattr(runner, "_run_search",
                        lambda *a: (calls.append(1), (_ for _ in ()).throw(_memory_crash())))
    with pytest.raises(runner.SearchError, match="ran out of memory 6 times"):
        runner.run_search(cfg, storage=tmp_path)
    assert len(calls) == runner.MEMORY_RESTARTS + 1

    def other(*a):  # type: ignore[no-untyped-def]
        raise RuntimeError("Caught unexpected exception: something else")

    monkeypatch.setattr(runner, "_run_search", other)
    with pytest.raises(RuntimeError, match="something else"):
        runner.run_search(cfg, storage=tmp_path)
    assert runner.killed_for_memory(_memory_crash())
    assert not runner.killed_for_memory(RuntimeError("x"))


def test_an_interrupted_trial_keeps_its_run_open_until_the_search_ends(tmp_path: Path) -> None:
    """Tune calls ``on_experiment_end`` on Ctrl-C and on a crash too: a trial it has not
    finished keeps an open run (so it resumes and trains on, instead of being read back
    as STOPPED); a finished one is closed. At the search's real end the driver closes
    the trials the budget stopped with the experiment."""
    from types import SimpleNamespace

    from search.runner import close_stopped_runs
    from search.tracking import TrialStatusCallback
    from trainers.tracking import trial_runs

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    for trial_id in ("done", "mid", "early"):
        TrialTracker(uri, exp_id, parent, trial_id, "wukong", {}, "s").log(
            {"val_logloss": 0.6, "train_flops": 100.0})
    trials = [SimpleNamespace(trial_id="done", status="TERMINATED",
                              last_result={"val_logloss": 0.6, "trial_status": "completed"}),
              SimpleNamespace(trial_id="mid", status="RUNNING",
                              last_result={"val_logloss": 0.6, "trial_status": "running"}),
              SimpleNamespace(trial_id="early", status="PENDING", last_result={"trial_id": "x"})]
    TrialStatusCallback(uri, exp_id, parent).on_experiment_end(trials=trials)

    def statuses() -> dict[str, str]:
        return {r.data.tags["trial_id"]: r.data.tags["trial_status"]
                for r in trial_runs(client, exp_id, parent)}

    assert statuses() == {"done": "COMPLETED", "mid": "RUNNING", "early": "RUNNING"}
    # the search ends (the budget stopped "mid" and "early" with it)
    assert close_stopped_runs(client, trial_runs(client, exp_id, parent), trials) == 2
    assert statuses() == {"done": "COMPLETED", "mid": "STOPPED", "early": "STOPPED"}


def test_a_restored_trial_is_counted_once_by_the_stopper_and_the_searcher() -> None:
    """A trial killed at 900 and restored from scratch (Tune had saved its state before
    the trial's first checkpoint): its run's 900 is its floor, not a charge. The search
    costs 900 at once; re-running 0..900 costs only as it is trained (the trial's work
    goes 900 -> 1200 -> 1800), and a search whose budget ends while the trial is still
    re-running is charged what was done, not the whole segment ahead of time."""
    from search.budget import counted_spend, set_work_floors

    policy = BudgetPolicy(2000.0, 100.0, (300.0, 900.0, 2000.0))
    try:
        set_work_floors({"t1": 900.0})
        stopper = BudgetStopper(2000.0)
        assert stopper.total == 900.0  # before "t1" reports in this process
        assert policy.decide({}, ["t1"], {}) == "start"  # 900 + its 300 to the first rung
        assert not stopper("t1", {"train_flops": 300.0, "work_flops": 1200.0})
        assert stopper.total == 1200.0  # not 900 + 900 charged + 300
        assert not stopper("t1", {"train_flops": 900.0, "work_flops": 1800.0})
        assert stopper("t2", {"train_flops": 200.0, "work_flops": 200.0})  # 2000: spent
        # an older report (no work_flops) counts its train_flops, under the floor
        assert counted_spend({"t3": 100.0}) == 900.0 + 100.0
    finally:
        set_work_floors({})


def test_a_restored_trial_with_nothing_to_report_does_not_end_the_search(monkeypatch) -> None:
    """A trial stopped before its first report, restored as unfinished, returns at once;
    Tune re-sends its restored last_result (config, no metric). Its strict metric check
    ended a whole chaos search with a ValueError; the search driver turns it off."""
    from types import SimpleNamespace

    from ray.tune.execution.tune_controller import TuneController

    import search.runner as runner

    restored = {"trial_id": "074a6cb1", "done": True, "pid": 1, "hostname": "vm",
                "config/model.block": "fm", "config/train.lr": 7e-4}
    fake = SimpleNamespace(_metric="val_logloss",
                           _scheduler_alg=SimpleNamespace(metric="val_logloss"),
                           _search_alg=SimpleNamespace(metric="val_logloss"))
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "0")  # restored after
    monkeypatch.delenv("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    with pytest.raises(ValueError, match="did not include the specified metric"):
        TuneController._validate_result_metrics(fake, restored)

    class Planned(Exception):
        pass

    def stop_at_plan(*args: object, **kwargs: object) -> None:
        raise Planned

    monkeypatch.setattr(runner, "plan_search", stop_at_plan)
    with pytest.raises(Planned):
        runner.run_search(None)  # type: ignore[arg-type]
    assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "1"
    TuneController._validate_result_metrics(fake, restored)  # no longer raises
