"""Every `mobile-vla ...` line in the code blocks of README.md and docs/quickstart.md exists: it parses
with the real CLI, its subcommand answers --help, the config files it names are in the repo, and a
test runs that subcommand for real (COVERAGE below says which; the check fails if a listed test is
renamed or removed). `mobile-vla mlflow-ui` and `train --check` are run here."""

from __future__ import annotations

import ast
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.local_processes import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/quickstart.md"]

# subcommand -> tests that run it for real (the same entry point or the in-process function it calls)
COVERAGE = {
    # mobile-vla demo   (README "The flow"; make demo / make demo-tiny)
    "demo": ["tests/demo/test_demo.py::test_demo_exits_zero_and_prints_the_summary"],
    # mobile-vla data generate --out data/mini --episodes 200
    "data generate": [
        "tests/sim/test_generate.py::test_same_seed_same_episodes_whatever_the_task_size",
        "tests/demo/test_demo.py::test_summary_data_training_and_evaluation",
    ],
    # mobile-vla data inspect data/mini
    "data inspect": ["tests/data/test_importer.py::test_inspect_prints_counts_splits_and_stats"],
    # mobile-vla model info --preset small
    "model info": ["tests/policy/test_model_info.py::test_model_info_prints_tables"],
    # mobile-vla train --config jobs/configs/small.yaml [data.path=data/mini]
    # mobile-vla train --config jobs/configs/small.yaml data.path=data/mini --check  (run below)
    "train": [
        "tests/train/test_training.py::test_two_worker_run_learns_and_is_tracked_in_mlflow",
        "tests/demo/test_demo.py::test_summary_data_training_and_evaluation",
        "tests/test_docs_commands.py::test_documented_train_check_runs",
    ],
    # mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/mini --closed-loop [--episodes 200]
    "evaluate": [
        "tests/evaluate/test_commands.py::test_offline_and_closed_loop_onto_the_version",
        "tests/demo/test_demo.py::test_summary_data_training_and_evaluation",
    ],
    # mobile-vla export --model models:/mobile-vla-policy@challenger --fp16
    "export": ["tests/export/test_commands.py::test_export_attaches_graphs_to_the_same_model_version"],
    # mobile-vla promote --model mobile-vla-policy --from-alias challenger [--gate jobs/configs/gate.yaml]
    "promote": [
        "tests/tracking/test_lifecycle.py::test_promote_cli_exit_codes_and_shipped_gate_file",
        "tests/demo/test_demo.py::test_first_champion_is_served_and_robots_drive_over_http",
    ],
    # mobile-vla serve --config serve_configs/local.yaml  (run as a command: test_serve_command; config:
    # test_configs; the app it deploys over HTTP: test_app_http and the demo)
    "serve": [
        "tests/serve/test_serve_command.py::test_serve_command_answers_on_loopback_and_stops_on_ctrl_c",
        "tests/serve/test_configs.py::test_mobile_vla_serve_pins_loopback_and_names_bad_fields",
        "tests/serve/test_configs.py::test_config_validates_against_ray_schema_and_app_args",
        "tests/demo/test_demo.py::test_first_champion_is_served_and_robots_drive_over_http",
    ],
    # mobile-vla online-update --config jobs/configs/online_update.yaml replay.data=data/mini
    "online-update": [
        "tests/online/test_online_update.py::test_online_update_learns_corrections_and_takes_over_only_through_the_gate"
    ],
    # mobile-vla data import --format minuum-h5 SRC DST  (quickstart prose)
    "data import": ["tests/data/test_importer.py::test_import_converts_good_files_and_names_the_bad_ones"],
    # mobile-vla tune --config jobs/configs/tune_small.yaml  (quickstart prose)
    "tune": ["tests/tune/test_sweep.py::test_asha_stops_weak_trials_early_and_the_good_one_completes"],
    # mobile-vla mlflow-ui  (run below)
    "mlflow-ui": ["tests/test_docs_commands.py::test_documented_mlflow_ui_serves_the_embedded_store"],
}


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for each `mobile-vla` line in a fenced code block (continuations joined,
    trailing comments dropped), then each inline `mobile-vla ...` span of the prose."""
    found = []
    for name in DOCS:
        text = (REPO / name).read_text()
        fence = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
        for block in fence.findall(text):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                if line.strip().startswith("mobile-vla "):
                    found.append((name, shlex.join(shlex.split(line, comments=True))))
        for span in re.findall(r"`(mobile-vla [^`]+)`", fence.sub("", text)):
            found.append((name, shlex.join(shlex.split(span))))
    return found


COMMANDS = documented_commands()


def subcommand_path(tokens: list[str]) -> list[str]:
    """['data', 'generate'] for `mobile-vla data generate --out X`: the chain of subparsers named."""
    import argparse

    from mobile_vla.cli import build_parser

    parser, path = build_parser(), []
    for token in tokens:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or token not in actions[0].choices:
            break
        parser = actions[0].choices[token]
        path.append(token)
    return path


def test_the_docs_show_the_flow():
    paths = {" ".join(subcommand_path(shlex.split(c)[1:])) for _, c in COMMANDS}
    assert {"data generate", "train", "evaluate", "export", "promote", "serve", "demo"} <= paths


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_parses_and_has_help(doc, command, capsys):
    from mobile_vla.cli import build_parser

    tokens = shlex.split(command)[1:]
    path = subcommand_path(tokens)
    assert path, f"{doc}: {command!r}: no such subcommand"
    parsed = build_parser().parse_args(tokens)  # argparse exits (fails the test) on unknown options
    assert callable(getattr(parsed, "func", None)), f"{doc}: {command!r} names no runnable subcommand"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*path, "--help"])
    assert exit_info.value.code == 0 and f"usage: mobile-vla {' '.join(path)}" in capsys.readouterr().out
    for flag in ("--config", "--gate"):  # config files the line names are in the repo
        if flag in tokens:
            assert (REPO / tokens[tokens.index(flag) + 1]).is_file(), f"{doc}: {command!r}: file not in repo"


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_is_run_for_real_by_a_test(doc, command):
    path = " ".join(subcommand_path(shlex.split(command)[1:]))
    assert path in COVERAGE, f"{doc}: {command!r}: no test runs `mobile-vla {path}`; add one to COVERAGE"
    for node in COVERAGE[path]:
        file, test = node.split("::")
        tree = ast.parse((REPO / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert test in names, f"COVERAGE[{path!r}]: {node} does not exist"


def test_documented_train_check_runs(ray_cluster, tiny_dataset, platform_home, capsys):
    """The quickstart's `train ... --check` line as written, pointed at the session's tiny dataset."""
    from mobile_vla.cli import main

    line = next(c for _, c in COMMANDS if c.endswith("--check") and " train " in f" {c} ")
    tokens = [f"data.path={tiny_dataset}" if t.startswith("data.path=") else t for t in shlex.split(line)[1:]]
    assert main(tokens) == 0
    assert "ok" in capsys.readouterr().out.lower()


def test_documented_mlflow_ui_serves_the_embedded_store(platform_home):
    """`mobile-vla mlflow-ui` starts the UI on 127.0.0.1 over the embedded SQLite store."""
    assert any(c == "mobile-vla mlflow-ui" for _, c in COMMANDS)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mobile_vla.cli", "mlflow-ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own group: the mlflow server child stops too
    try:
        deadline, status = time.monotonic() + 300, None  # seconds on CI; minutes on a swamped box
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    status = answer.status
                    break
            except OSError:
                time.sleep(1.0)
        assert status == 200, f"UI did not answer on 127.0.0.1:{port}"
        assert (platform_home / "mlflow.db").is_file()
    finally:
        stop_process_group(process, signal.SIGTERM, timeout_s=30)
    printed = process.stdout.read()
    assert f"sqlite:///{platform_home / 'mlflow.db'}" in printed and "--host 127.0.0.1" in printed
