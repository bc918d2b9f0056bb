"""Moves of `@champion` made by hand are seen by serving and recorded in the audit.

In this process: two ingress watchers (two ingress replicas) see a move made with a plain
`MlflowClient().set_registered_model_alias` (what the MLflow UI sends) and record it once.

In a real browser (slow): `mobile-vla mlflow-ui` serves the MLflow UI over the store the Serve app
follows; headless Debian Chromium, driven by Playwright, opens version 2's page and adds `champion`
to it through the alias editor exactly as a person does; `/v1/model` and `/v1/act` then answer with
version 2 and the audit shows the `detected` move 1 -> 2, recorded by the serving watcher. With
CI=true a missing Chromium or Playwright fails the test; elsewhere it skips, saying what is missing.
Playwright drives the system's Chromium (`executable_path`): never `playwright install`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.local_processes import stop_process_group
from tests.serve.conftest import deployed_app, free_port, two_version_home, wait_until
from tests.serve.test_hot_swap import IMAGE

NAME = "mobile-vla-policy"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium package (apt-get install chromium)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def audit_home(tmp_path_factory, use_home, serve_home):
    """v1 @champion and v2 (actions offset by 0.1, no alias): copies of the session's exported tiny model."""
    from mobile_vla.serve.auth import create_tokens_file

    home = two_version_home(tmp_path_factory.mktemp("alias-audit-home"), use_home, serve_home, NAME)
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


@pytest.fixture()
def in_home(audit_home, monkeypatch, ray_cluster):
    """This process on the module's home and store (Ray connected: the watcher creates its metrics)."""
    monkeypatch.setenv("MOBILE_VLA_HOME", str(audit_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return audit_home


def champion_records():
    from mobile_vla.tracking import alias_history

    return alias_history(NAME, "champion")


def test_ingress_watchers_record_a_move_made_by_hand_once(in_home, tmp_path):
    from mlflow import MlflowClient

    from mobile_vla.serve.router import ServedVersions
    from mobile_vla.serve.schemas import BackendStatus
    from mobile_vla.serve.settings import IngressConfig
    from mobile_vla.serve.watcher import AliasWatcher
    from mobile_vla.tracking import configure_mlflow, set_alias

    set_alias(NAME, "champion", "1", actor="test", reason="start from version 1")

    async def primary_serves_1():
        return [
            BackendStatus(role="primary", deployment="OnnxPolicy", backend="onnx-cpu", loaded=True, model_version="1")
        ]

    settings = IngressConfig(
        model_uri=f"models:/{NAME}/1",
        alias="champion",
        tokens_file=str(tmp_path / "tokens"),
        memory_secret_file=str(tmp_path / "secret"),
        feedback_dir=str(tmp_path / "feedback"),
        alias_poll_s=0.3,
    )
    watchers = [AliasWatcher(settings, ServedVersions(), primary_serves_1) for _ in range(2)]
    for watcher in watchers:
        asyncio.run(watcher.refresh())
    before = champion_records()
    assert before[0].to_version == "1" and before[0].actor != "detected"  # nothing to detect yet

    configure_mlflow()
    MlflowClient().set_registered_model_alias(NAME, "champion", "2")  # what the MLflow UI sends
    for _ in range(2):
        for watcher in watchers:
            asyncio.run(watcher.refresh())
    after = champion_records()
    assert len(after) == len(before) + 1
    move = after[0]
    assert (move.actor, move.from_version, move.to_version, move.seq) == ("detected", "1", "2", before[0].seq + 1)
    assert move.by.startswith("serve ingress watcher (") and "moved outside the platform" in move.reason
    assert all(w.versions.alias_version == "2" for w in watchers)


# -- the MLflow UI in a real browser --------------------------------------------------------------------


def require_browser() -> None:
    """Chromium and Playwright, or a skip naming what is missing (a failure with CI=true)."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium chromium-driver)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]'; never `playwright install`)")
    if missing:
        message = "the real-browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-chromium"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"no-chromium \(apt-get install -y chromium"):
        require_browser()


@pytest.fixture(scope="module")
def browser_available() -> None:
    """Checked before the app and the UI start, so a missing browser costs no minute of setup."""
    require_browser()


@pytest.fixture(scope="module")
def mlflow_ui(audit_home):
    """`mobile-vla mlflow-ui` on a free loopback port over the module's store; its URL once /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MOBILE_VLA_HOME"] = str(audit_home)
    process = subprocess.Popen(
        [sys.executable, "-m", "mobile_vla.cli", "mlflow-ui", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own group: the mlflow server child stops with it
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if process.poll() is not None:
            pytest.fail(f"mobile-vla mlflow-ui exited with {process.returncode}")
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 300, every_s=1.0, what="the MLflow UI answering")
        yield url
    finally:
        stop_process_group(process, signal.SIGTERM, 30)


@pytest.fixture(scope="module")
def app(ray_cluster, audit_home):
    from mobile_vla.serve.app import ServeAppConfig

    args = ServeAppConfig(
        tokens_file=str(audit_home / "tokens"),
        max_batch_size=4,
        batch_wait_timeout_s=0.01,
        alias_poll_s=0.3,
        deadline_s=30.0,  # a loaded 2-core box: this test is about the promotion, not latency
    )
    with deployed_app("mobile-vla-alias-audit", audit_home, args) as client:
        yield client


@pytest.fixture()
def browser_page(browser_available, tmp_path):
    """A page of headless Debian Chromium with a fresh profile (Playwright, the system's browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(60_000)  # a loaded 2-core box renders the UI slowly
        try:
            yield context.new_page()
        finally:
            context.close()


def set_alias_in_the_ui(page, ui_url: str, version: str, alias: str, previous: str, shots: Path) -> None:
    """What a person does: open the version's page, edit its aliases, add `alias`, confirm, save."""
    from playwright.sync_api import expect

    page.goto(f"{ui_url}/#/models/{NAME}/versions/{version}")
    expect(page.get_by_role("heading", name=f"Version {version}")).to_be_visible()
    # The Aliases field's button: "Add" (title "Add aliases") on a version without aliases, a pencil
    # ("Edit aliases") on one with some; both open the same editor.
    page.get_by_title(re.compile(r"^(Add|Edit) aliases$")).click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"Add/Edit alias for model version {version}")).to_be_visible()
    field = dialog.get_by_role("combobox")
    field.click()
    field.press_sequentially(alias)
    field.press("Enter")
    # The UI warns that the alias leaves the version that holds it: the person sees it before saving.
    expect(dialog.get_by_text(f'The "{alias}" alias is also being used on version {previous}')).to_be_visible()
    page.screenshot(path=str(shots / "alias-editor.png"))
    dialog.get_by_role("button", name="Save aliases").click()
    expect(dialog).to_be_hidden()
    expect(page.locator(f'[title="{alias}"]')).to_be_visible()  # the version's page shows @alias now
    page.screenshot(path=str(shots / "saved.png"))


@pytest.mark.slow  # a Serve app, an mlflow server and Chromium: about a minute on 2 cores
def test_champion_set_in_the_mlflow_ui_is_served_and_audited(
    browser_available, app, mlflow_ui, audit_home, use_home, browser_page, tmp_path, capsys
):
    from mobile_vla.cli import main
    from mobile_vla.tracking import set_alias

    with use_home(audit_home):
        set_alias(NAME, "champion", "1", actor="test", reason="start from version 1")  # whatever ran before

    def serving(version: str) -> bool:
        info = app.model()
        return info["version"] == info["alias_version"] == version

    wait_until(lambda: serving("1"), 120, every_s=0.5, what="the app serving version 1")
    assert app.act(IMAGE).json()["model"]["version"] == "1"
    with use_home(audit_home):
        before = champion_records()

    try:
        set_alias_in_the_ui(browser_page, mlflow_ui, version="2", alias="champion", previous="1", shots=tmp_path)
    except Exception:
        browser_page.screenshot(path=str(tmp_path / "failure.png"))  # what the page showed, for the CI log
        print(f"the MLflow UI at the failure: {tmp_path / 'failure.png'}")
        raise

    wait_until(lambda: serving("2"), 120, every_s=0.5, what="/v1/model naming version 2")
    answer = app.act(IMAGE)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "2", answer.text

    def recorded():
        with use_home(audit_home):
            records = champion_records()
        return records if len(records) > len(before) else None

    records = wait_until(recorded, 60, every_s=0.5, what="the audit record of the UI move")
    move = records[0]
    assert (move.actor, move.from_version, move.to_version, move.seq) == ("detected", "1", "2", before[0].seq + 1)
    assert move.by.startswith("serve ingress watcher (")  # recorded by serving, not by this test
    assert len(records) == len(before) + 1  # once, however many watchers saw it

    capsys.readouterr()
    with use_home(audit_home):
        assert main(["models", "history", "--model", NAME, "--alias", "champion", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == move.to_dict()
