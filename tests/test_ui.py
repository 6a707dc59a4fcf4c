"""MLflow as the place to compare trials (issue 12), on the real stack.

One small search (local Ray, MLflow in SQLite, synthetic data) and its report, then:

* one "best": the same winner, with the same value, step and AUC, in Ray's final table,
  MLflow's parent run, ``summary.json``, ``report.html`` and the exported YAML;
* a real browser (Debian's headless ``chromium``) against a real ``recscale ui`` on
  127.0.0.1: the runs view opens in the machine-learning mode and lists the trials under
  the parent; the parent's page shows the winner and its artifacts. Assertions are on
  the rendered DOM; the screenshots are kept under ``test-artifacts/ui/`` (or
  ``$RECSCALE_TEST_ARTIFACTS/ui``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.pipeline import write_report
from analysis.runs import load_search, milestone_losses
from search.runner import SearchOutcome, run_search
from search.settings import ResourceConfig, SearchConfig
from tests.browser import Browser
from trainers.data import DataConfig, SyntheticConfig, load_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=6_000, n_cat_fields=6,
                                                              cardinality=20, seed=1))
CAP = 4e5
NAME = "ui-test"


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchConfig, SearchOutcome, Path]:
    """A finished search of a few trials and its report (as ``recscale analyze`` writes)."""
    import ray

    tmp = tmp_path_factory.mktemp("ui")
    raytmp = tempfile.mkdtemp(prefix="ru", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=raytmp, logging_level="ERROR",
             log_to_driver=False)
    try:
        cfg = SearchConfig(name=NAME, space="unified", data=DATA, budget_flops=2e10,
                           trial_flops=4e9, grace_flops=4e9 / 9, max_flops_per_example=CAP,
                           eval_max_examples=500, max_concurrent=2, seed=0,
                           resources=ResourceConfig(gpus="off"))
        outcome = run_search(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                             storage=tmp / "ray", verbose=0,
                             dataset=load_dataset(DATA, cache_dir=tmp / "cache"))
    finally:
        ray.shutdown()
    report = write_report(NAME, outcome.tracking_uri, tmp / "report", CAP)
    return cfg, outcome, report


def test_one_best_everywhere(searched: tuple[SearchConfig, SearchOutcome, Path]) -> None:
    """The winner and its result (value, step, AUC: one report, the last) agree across
    Ray's final table, MLflow's parent, summary.json, report.html and the export."""
    _, out, report = searched
    ray_best = out.winner()
    assert ray_best is not None
    assert out.best(1).iloc[0]["trial_id"] == ray_best["trial_id"]  # the printed table's top row
    value, auc, flops = (float(ray_best[k]) for k in ("val_logloss", "val_auc", "train_flops"))
    run_id = ray_best["mlflow_run_id"]

    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    m, tags = parent.data.metrics, parent.data.tags
    assert (m["search.best_val_logloss"], m["search.best_val_auc"],
            m["search.best_train_flops"]) == (value, auc, flops)
    assert tags["recscale.best_run_id"] == run_id
    assert "recscale.config" not in tags  # the settings are the search.json artifact
    assert tags["recscale.best_trial_id"] == ray_best["trial_id"]
    # the child's own final metrics are that same report, at that step
    child = client.get_run(run_id)
    assert (child.data.metrics["val_logloss"], child.data.metrics["val_auc"]) == (value, auc)
    assert client.get_metric_history(run_id, "val_logloss")[-1].step == int(flops)

    summary = json.loads((report / "summary.json").read_text())
    best = summary["recommendation"]["best_overall"]
    assert (best["trial_id"], best["run_id"]) == (ray_best["trial_id"], run_id)
    assert (best["val_logloss"], best["val_auc"], best["train_flops"]) == (value, auc, flops)
    assert best["result_step"] == flops and summary["settings"]["result_report"] == "last"
    assert summary["recommendation"]["best_under_cap"]["run_id"] == run_id

    page = (report / "report.html").read_text()
    assert f"Winning config: {best['block']} trial {best['trial_id']}" in page
    # every trial links to its run in the MLflow UI that recscale ui serves
    for trial_run in out.trials["mlflow_run_id"]:
        assert f"/#/experiments/{out.experiment_id}/runs/{trial_run}'" in page
    row = re.search(r"<td>best trial</td>(.*?)</tr>", page)
    assert row is not None
    assert [f"{value:.4g}", f"{auc:.4g}", f"{flops:.4g}"] == re.findall(
        r"<td>([^<]*)</td>", row.group(1))[2:5]

    exported = yaml.safe_load((report / "best.yaml").read_text())["provenance"]
    assert (exported["run_id"], exported["val_logloss"], exported["val_auc"],
            exported["result_train_flops"]) == (run_id, value, auc, flops)
    artifacts = {f.path for f in client.list_artifacts(out.parent_run_id)}
    assert {"best.yaml", "report", "search.json"} <= artifacts
    assert {f.path for f in client.list_artifacts(out.parent_run_id, "report")} >= {
        "report/report.html", "report/plotly.min.js", "report/summary.json"}
    assert (report / "report.html").stat().st_size < 300_000
    splits = summary["data"]["splits"]  # how many positives each split holds, stated
    assert set(splits) == {"train", "val", "test"} and all(v["positives"] > 0
                                                          for v in splits.values())
    assert f"val {splits['val']['rows']} rows ({splits['val']['positives']} positives" in page
    noise = summary["validation"]  # the SE of the compared number is stated
    assert 0 < noise["se_median"] < 0.05 and noise["eval_examples"] == 500
    assert "Validation noise" in page and noise["rungs"]
    # the gap ASHA cut at has the paired SE (both trials scored on the same examples),
    # from the per-example losses every trial logs at its milestone reports
    cut = [r for r in noise["rungs"] if r["cut_gap"] is not None]
    assert cut and all(r["paired_se"] is not None and r["paired_se"] > 0 for r in cut)
    assert all(0 <= r["within_noise"] <= r["cut"] for r in cut)
    assert "stopped within 2 paired SE of the last kept" in page
    runs = load_search(NAME, out.tracking_uri)
    logged = milestone_losses(runs, run_id)
    assert logged, "the winner logged no per-example validation losses"
    hist = runs.history.set_index(["run_id", "step"])
    for step, losses in logged.items():
        assert losses.shape == (500,)  # eval_max_examples: the fixed validation set
        assert float(losses.mean()) == pytest.approx(hist.loc[(run_id, step), "val_logloss"],
                                                     abs=2e-3)  # float16 storage
    note = tags["mlflow.note.content"]
    assert str((report / "report.html").absolute()) in note and ray_best["trial_id"] in note


# ---- the browser ------------------------------------------------------------------------


def _artifacts() -> Path:
    out = Path(os.environ.get("RECSCALE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser() -> Any:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium: `make test` installs Debian's chromium when run as root "
                    "with apt-get; here it is neither installed nor installable")
    page = Browser(found)
    yield page
    page.close()


@pytest.fixture(scope="module")
def ui(searched: tuple[SearchConfig, SearchOutcome, Path]) -> Any:
    """A real ``recscale ui`` on 127.0.0.1 (its own process group, stopped by PID)."""
    _, out, _ = searched
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recscale", "ui", NAME, "--tracking-uri", out.tracking_uri,
         "--port", str(port), "--no-browser"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the address, printed once the server answers
        match = re.search(r"http://\S+", line)
        assert match, f"recscale ui printed {line!r} (exit code {proc.poll()})"
        yield match.group(0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


EXPANDERS = "document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]')"


def test_ui_opens_the_runs_in_the_machine_learning_mode(
        searched: tuple[SearchConfig, SearchOutcome, Path], ui: str, browser: Browser) -> None:
    """The address ``recscale ui`` prints opens the runs table in the machine-learning
    mode; expanding the parent (MLflow opens it collapsed) lists every trial under it."""
    _, out, _ = searched
    assert ui.endswith(f"/#/experiments/{out.experiment_id}/runs?workflowType=machine_learning"
                       "&viewStateShareKey=recscale")
    shots = _artifacts()
    t0 = time.monotonic()
    browser.open(ui)
    assert browser.wait_for(f"{EXPANDERS}.length > 0", 60), browser.text()[:2000]
    browser.screenshot(shots / "runs.png")
    text = browser.text()
    assert "Model training" in text and NAME in text and "Runs" in text
    # recscale's shared view: the result columns, not MLflow's Dataset / Source / Models
    headers = browser.evaluate(
        "[...document.querySelectorAll('[role=\"columnheader\"]')].map(h => h.textContent.trim())")
    assert {"val_logloss", "val_auc", "train_flops", "block", "trial_status"} <= set(headers)
    assert not {"Dataset", "Source", "Models"} & set(headers), headers
    for genai in ("Detect issues", "Evaluations", "token"):
        assert genai not in text, f"GenAI mode: {genai!r} on the page"
    assert browser.evaluate(f"{EXPANDERS}.length") == 1  # one parent: the search
    browser.evaluate(f"{EXPANDERS}.forEach(b => b.click())")
    trials = out.trials.dropna(subset=["mlflow_run_id"])
    names = [f"{b}-{t}" for b, t in zip(trials["model.block"], trials["trial_id"], strict=True)]
    assert browser.wait_for(f"document.body.innerText.includes({json.dumps(names[0])})", 30)
    browser.screenshot(shots / "runs_expanded.png")
    (shots / "runs_expanded.html").write_text(browser.dom())
    text = browser.text()
    missing = [n for n in names if n not in text]
    assert not missing, f"trials not listed under the parent: {missing}"
    # the trials come after the parent row, indented under it (one level down)
    rows = browser.evaluate(
        "[...document.querySelectorAll('a[href*=\"/runs/\"]')].map(a => a.textContent)")
    rows = [r for r in rows if r == NAME or r in names]
    assert rows[0] == NAME and sorted(rows[1:]) == sorted(names)
    assert time.monotonic() - t0 < 120


def test_parent_page_shows_the_winner_and_its_artifacts(
        searched: tuple[SearchConfig, SearchOutcome, Path], ui: str, browser: Browser) -> None:
    _, out, _ = searched
    winner = out.winner()
    assert winner is not None
    page = f"{ui.split('#', 1)[0]}#/experiments/{out.experiment_id}/runs/{out.parent_run_id}"
    browser.open(f"{page}?workflowType=machine_learning")
    assert browser.wait_for("document.body && document.body.innerText.includes('Winner')", 60)
    browser.screenshot(_artifacts() / "parent.png")
    text = browser.text()
    assert f"trial {winner['trial_id']}" in text and str(winner["mlflow_run_id"]) in text
    assert "search.best_val_logloss" in text and "spent" in text
    browser.open(f"{page}/artifacts?workflowType=machine_learning")
    assert browser.wait_for("document.body.innerText.includes('best.yaml')", 60)
    browser.screenshot(_artifacts() / "parent_artifacts.png")
    assert "report" in browser.text()


def test_ui_address_and_which_search_it_opens(tmp_path: Path) -> None:
    """Without a name ``recscale ui`` opens the search that started last; experiments
    get the machine-learning mode and recscale's view, older ones included."""
    from analysis.runs import find_search
    from recscale.commands import ui_url
    from trainers.tracking import experiment_id, find_or_create_parent

    assert ui_url("127.0.0.1", 5000, None) == "http://127.0.0.1:5000/"
    assert ui_url("127.0.0.1", 5001, "3") == ("http://127.0.0.1:5001/#/experiments/3/runs?"
                                              "workflowType=machine_learning"
                                              "&viewStateShareKey=recscale")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert find_search(None, uri) is None  # no store: nothing to open
    client = MlflowClient(uri)
    old = client.create_experiment("older")  # as an older recscale made it: no tags
    client.create_experiment("not-a-search")
    for name in ("first", "second"):
        find_or_create_parent(client, name, {}, {})
        time.sleep(0.01)
    assert find_search(None, uri) == (client.get_experiment_by_name("second").experiment_id,
                                      "second")
    assert find_search("first", uri) == (client.get_experiment_by_name("first").experiment_id,
                                         "first")
    assert find_search("missing", uri) is None
    assert experiment_id(client, "older") == old
    for exp_id in (old, client.get_experiment_by_name("first").experiment_id):
        tags = client.get_experiment(exp_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert "metrics.`val_logloss`" in json.loads(
            tags["mlflow.sharedViewState.recscale"])["selectedColumns"]
