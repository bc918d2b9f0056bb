"""Every `mobile-vla ...` line in the code blocks of README.md and docs/quickstart.md exists: it parses
with the real CLI, its subcommand answers --help, the config files it names are in the repo, and a
test runs that subcommand for real through the CLI (COVERAGE below says which; the check reads each
listed test's source and fails unless it, or a fixture or helper of its module that it names, calls
`main([<subcommand>, ...])` or starts `python -m mobile_vla.cli <subcommand>` or the installed console
script). The commands no other test runs through the CLI (`data generate`, `train`, `mlflow-ui`) are
run here, small; `tune` is run by the ASHA sweep of tests/tune/test_sweep.py, through the console script.
"""

from __future__ import annotations

import ast
import json
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
MODEL = "mobile-vla-policy"
DOCS = ["README.md", "docs/quickstart.md"]

# subcommand -> tests that run it for real through the CLI (checked by test_documented_command_is_run_for_real)
COVERAGE = {
    # mobile-vla demo   (README "The flow"; make demo / make demo-tiny)
    "demo": ["tests/demo/test_demo.py::test_demo_exits_zero_and_prints_the_summary"],
    # mobile-vla data generate --out data/mini --episodes 200
    "data generate": ["tests/test_docs_commands.py::test_documented_data_generate_writes_a_dataset"],
    # mobile-vla data inspect data/mini
    "data inspect": ["tests/data/test_importer.py::test_inspect_prints_counts_splits_and_stats"],
    # mobile-vla model info --preset small
    "model info": ["tests/policy/test_model_info.py::test_model_info_prints_tables"],
    # mobile-vla train --config jobs/configs/small.yaml [data.path=data/mini]
    # mobile-vla train --config jobs/configs/small.yaml data.path=data/mini --check
    "train": [
        "tests/test_docs_commands.py::test_documented_train_trains_and_registers_a_tiny_run",
        "tests/test_docs_commands.py::test_documented_train_check_runs",
    ],
    # mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/mini --closed-loop [--episodes 200]
    "evaluate": ["tests/evaluate/test_commands.py::test_offline_and_closed_loop_onto_the_version"],
    # mobile-vla export --model models:/mobile-vla-policy@challenger --fp16
    "export": ["tests/export/test_commands.py::test_export_attaches_graphs_to_the_same_model_version"],
    # mobile-vla promote --model mobile-vla-policy --from-alias challenger [--gate jobs/configs/gate.yaml]
    "promote": ["tests/tracking/test_lifecycle.py::test_promote_cli_exit_codes_and_shipped_gate_file"],
    # mobile-vla models history  (quickstart prose, after promote)
    "models history": [
        "tests/tracking/test_audit.py::test_cli_promote_records_each_move_with_its_reason_and_history_prints_them"
    ],
    # mobile-vla serve --config serve_configs/local.yaml
    "serve": ["tests/serve/test_serve_command.py::test_serve_command_answers_on_loopback_and_stops_on_ctrl_c"],
    # mobile-vla online-update --config jobs/configs/online_update.yaml replay.data=data/mini
    "online-update": [
        "tests/online/test_online_update.py::test_online_update_learns_corrections_and_takes_over_only_through_the_gate"
    ],
    # mobile-vla collect --model models:/mobile-vla-policy@champion --data data/mini --episodes 50 --in-process
    "collect": ["tests/online/test_collect.py::test_the_command_runs_a_round_and_prints_where_the_corrections_went"],
    # mobile-vla data import --format minuum-h5 SRC DST  (quickstart prose)
    "data import": [
        "tests/data/test_importer.py::test_import_converts_good_files_and_names_the_bad_ones",
        "tests/data/test_lerobot.py::test_export_then_import_is_lossless",  # --format lerobot
    ],
    # mobile-vla data export --format lerobot data/mini DST  (quickstart prose)
    "data export": ["tests/data/test_lerobot.py::test_export_writes_the_v3_layout"],
    # mobile-vla tune --config jobs/configs/tune_small.yaml  (quickstart prose)
    "tune": ["tests/tune/test_sweep.py::test_tune_console_script_exits_cleanly_and_records_the_code_that_ran"],
    # mobile-vla doctor  (quickstart troubleshooting, README)
    "doctor": ["tests/test_doctor.py::test_the_real_checks_pass_on_this_box"],
    # mobile-vla mlflow-ui
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


def _leading_strings(node: ast.AST) -> tuple[str, ...]:
    """("data", "generate") for the list literal `["data", "generate", "--out", str(x)]`."""
    words = []
    for element in node.elts if isinstance(node, ast.List) else []:
        if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
            break
        words.append(element.value)
    return tuple(words)


def _cli_calls(function: ast.FunctionDef) -> set[tuple[str, ...]]:
    """Argument lists the function hands the CLI: `main([...])` (or `main(argv)` with `argv = [...]` in
    the function) and process command lists `[..., "mobile_vla.cli", <args>]` / `[".../mobile-vla", <args>]`
    / `[MOBILE_VLA_SCRIPT, <args>]` (a test module's name for the installed console script)."""
    lists = {
        target.id: node.value
        for node in ast.walk(function)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    calls = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name == "main":
                argv = node.args[0]
                calls.add(_leading_strings(lists.get(argv.id) if isinstance(argv, ast.Name) else argv))
        if isinstance(node, ast.List):
            for index, element in enumerate(node.elts):
                value = element.value if isinstance(element, ast.Constant) else None
                if isinstance(element, ast.Name) and element.id == "MOBILE_VLA_SCRIPT":
                    value = "mobile-vla"
                if value == "mobile_vla.cli" or (isinstance(value, str) and value.endswith("mobile-vla")):
                    calls.add(_leading_strings(ast.List(elts=node.elts[index + 1 :])))
    return calls


def cli_invocations(file: str, test: str) -> set[tuple[str, ...]]:
    """What `file::test` runs through the CLI (`--help` runs nothing): its own calls and those of the
    module-level functions (fixtures, helpers) it names, followed through the module. Raises KeyError
    when there is no such test."""
    functions = {
        node.name: node for node in ast.parse((REPO / file).read_text()).body if isinstance(node, ast.FunctionDef)
    }
    seen, todo, calls = set(), [functions[test]], set()
    while todo:
        function = todo.pop()
        if function.name in seen:
            continue
        seen.add(function.name)
        calls |= _cli_calls(function)
        named = {a.arg for a in function.args.args} | {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        todo += [functions[name] for name in named if name in functions]
    return {call for call in calls if "--help" not in call}


SAMPLE_TESTS = """
from mobile_vla.cli import main
from mobile_vla.train.trainer import run_training


@pytest.fixture()
def trained():
    argv = ["train", "--config", "x.yaml"]
    return main(argv)


def test_through_a_fixture(trained):
    assert trained == 0


def test_through_the_function_behind_the_cli(cfg):
    run_training(cfg)
    assert main(["train", "--help"]) == 0


def test_as_a_process():
    subprocess.run([sys.executable, "-m", "mobile_vla.cli", "data", "generate", "--out", str(out)])


def test_as_the_console_script():
    subprocess.run([MOBILE_VLA_SCRIPT, "tune", "--config", str(config)])
"""


def test_the_coverage_check_sees_real_invocations_only(tmp_path):
    """The reader behind the next test: CLI calls count, also from a fixture the test names; a call of
    the function behind the CLI does not (and `--help` runs nothing)."""
    module = tmp_path / "test_sample.py"
    module.write_text(SAMPLE_TESTS)
    assert cli_invocations(str(module), "test_through_a_fixture") == {("train", "--config", "x.yaml")}
    assert cli_invocations(str(module), "test_through_the_function_behind_the_cli") == set()
    assert cli_invocations(str(module), "test_as_a_process") == {("data", "generate", "--out")}
    assert cli_invocations(str(module), "test_as_the_console_script") == {("tune", "--config")}
    with pytest.raises(KeyError):
        cli_invocations(str(module), "test_renamed")


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_is_run_for_real_by_a_test(doc, command):
    path = tuple(subcommand_path(shlex.split(command)[1:]))
    shown = " ".join(path)
    assert shown in COVERAGE, f"{doc}: {command!r}: no test runs `mobile-vla {shown}`; add one to COVERAGE"
    for node in COVERAGE[shown]:
        file, test = node.split("::")
        try:
            calls = cli_invocations(file, test)
        except (KeyError, OSError):
            pytest.fail(f"COVERAGE[{shown!r}]: {node} does not exist")
        assert any(call[: len(path)] == path for call in calls), (
            f"COVERAGE[{shown!r}]: {node} never runs `mobile-vla {shown}` through the CLI (it runs {sorted(calls)})"
        )


@pytest.mark.unseeded_home  # asserts that --check creates no store
def test_documented_train_check_runs(ray_cluster, tiny_dataset, platform_home, capsys):
    """The quickstart's `train ... --check` line as written, pointed at the session's tiny dataset: it
    checks the config, data and resources and trains nothing; a missing dataset fails the check."""
    from mobile_vla.cli import main

    line = next(c for _, c in COMMANDS if c.endswith("--check") and " train " in f" {c} ")
    tokens = [f"data.path={tiny_dataset}" if t.startswith("data.path=") else t for t in shlex.split(line)[2:]]
    assert main(["train", *tokens]) == 0
    config = tokens[tokens.index("--config") + 1]
    assert f"ok: {config} is valid; data, model and resources check out" in " ".join(capsys.readouterr().out.split())
    assert not (platform_home / "ray_results").exists() and not (platform_home / "mlflow.db").exists()
    missing = [f"data.path={platform_home / 'no-data'}" if t.startswith("data.path=") else t for t in tokens]
    assert main(["train", *missing]) == 2


def test_documented_data_generate_writes_a_dataset(ray_cluster, tmp_path):
    """`mobile-vla data generate --out DIR --episodes N`, with 2 episodes."""
    from mobile_vla.cli import main

    out = tmp_path / "mini"
    assert main(["data", "generate", "--out", str(out), "--episodes", "2", "--seed", "0", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = [name for names in manifest["splits"].values() for name in names]
    assert len(files) == 2 and all((out / name).is_file() for name in files)


@pytest.mark.slow
def test_documented_train_trains_and_registers_a_tiny_run(ray_cluster, tiny_dataset, platform_home, capsys):
    """`mobile-vla train --config PRESET data.path=DIR`: one short epoch of the tiny preset, tracked in
    the platform's MLflow store (with the commit and version that ran it) and registered as @challenger;
    the terminal shows rank 0's progress while it trains."""
    from mlflow import MlflowClient

    from mobile_vla.cli import main
    from mobile_vla.tracking import configure_mlflow

    code = main(
        [
            "train",
            "--config",
            str(REPO / "jobs" / "configs" / "tiny.yaml"),
            f"data.path={tiny_dataset}",
            "run.name=docs-train",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
        ]
    )
    assert code == 0
    configure_mlflow()
    client = MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "docs-train"
    assert (platform_home / "mlflow.db").is_file()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == head.strip() and run.data.tags["mobile_vla.version"] == "0.1.0"
    progress = re.findall(r"train: epoch 1/1 · step (\d+)/(\d+) · loss \d+\.\d+ · .* ETA \S+", capsys.readouterr().err)
    assert progress and progress[-1][0] == progress[-1][1], progress  # the last line: the last step


@pytest.mark.slow  # an `mlflow server` process: half a minute to answer on 2 cores
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
