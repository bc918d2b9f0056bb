"""The launch lines written at the top of every file in jobs/configs/ and serve_configs/ are run.

A launch line is a header comment line that is a command (indented, or after a label such as
`Launch:`, `On a cluster:` or a cron schedule), or a backticked command in the header with arguments.
LAUNCH below says, for every such line, how this suite runs it:
- CHECK: the same command (an identical command with another preset file) with `--check` appended,
  in this process: the preset, its data needs, the model and the cluster fit are validated;
- elsewhere(test): another test runs this line through the CLI (checked here: that test exists and
  calls the subcommand); reported as a skip naming it, so it cannot pass here silently (the tiny train
  line's run is tests/test_docs_commands.py's tiny training run; the tiny sweep line's is the ASHA sweep of
  tests/tune/test_sweep.py: tune_tiny.yaml with that test's search space, through the installed console
  script in its own process, joined to the session's Ray from another directory);
- cannot(reason): it needs what this machine lacks (a GPU, a cluster), said in the skip.
A line added to a header, or changed, fails `test_every_launch_line_is_classified` until it is added here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.test_docs_commands import cli_invocations, subcommand_path

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted([*REPO.glob("jobs/configs/*.yaml"), *REPO.glob("serve_configs/*.yaml")])

_COMMAND = r"(?:[A-Z_]+=\S+ )*(?:mobile-vla|python|\.venv/bin/python|ray|serve|cd)\s"
_LINE = re.compile(r"^#\s+(?:[A-Za-z][\w ,:()]*?:\s+)?(?:(?:\S+\s+){5}\s*(?=cd\s))?(?P<cmd>" + _COMMAND + r".*)$")


def header(path: Path) -> list[str]:
    """The leading comment lines of `path`, a `\\`-continued line joined with the next."""
    joined: list[str] = []
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            break
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + raw.lstrip("#").strip()
        else:
            joined.append(raw)
    return joined


def launch_lines(path: Path) -> list[str]:
    """The commands in `path`'s header, in order, each once (trailing `   # comment` dropped)."""
    found: list[str] = []
    for raw in header(path):
        match = _LINE.match(raw)
        commands = [match.group("cmd").split("   #")[0].strip()] if match else []
        commands += [
            s for s in re.findall(r"`([^`]+)`", raw) if re.match(_COMMAND, s + " ") and re.search(r"\s(--|\S*[=/])", s)
        ]
        found += [c for c in commands if c not in found]
    return found


def CHECK():  # noqa: N802 - the table reads as a list of verbs
    return ("check", "")


def elsewhere(node: str):
    return ("elsewhere", node)


def cannot(reason: str):
    return ("cannot", reason)


GPU = "needs a GPU cluster (`ray up clusters/gpu.yaml`; none here)"
SUBMIT = (
    "`ray job submit` needs a running head; tests/cluster/test_job_submission.py::"
    "test_train_job_submits_and_logs_to_mlflow submits jobs/train.py (tiny) to a local head, and this "
    "preset's own line is CHECKed here"
)
DATA_GENERATE = elsewhere("tests/test_docs_commands.py::test_documented_data_generate_writes_a_dataset")
# the resume itself (same run name, more epochs): tests/train/test_training.py (run_training, not the CLI)
TRAIN_RESUME = CHECK()

# (config file, launch line) -> how it runs here
LAUNCH = {
    ("jobs/configs/full_gpu.yaml", "ray up clusters/gpu.yaml"): cannot(GPU),
    (
        "jobs/configs/full_gpu.yaml",
        "RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py "
        "--config jobs/configs/full_gpu.yaml run.name=full-1 data.path=/shared/data/mini "
        "run.storage_path=/shared/ray_results scaling.num_workers=8",
    ): cannot(GPU + "; pretrained Kosmos-2 + CLIP weights, 8 GPU workers"),
    (
        "jobs/configs/gate.yaml",
        "mobile-vla promote --model mobile-vla-policy --from-alias challenger --gate jobs/configs/gate.yaml",
    ): elsewhere("tests/tracking/test_lifecycle.py::test_promote_cli_exit_codes_and_shipped_gate_file"),
    (
        "jobs/configs/gate.yaml",
        "mobile-vla promote --model mobile-vla-policy --version 7 --gate jobs/configs/gate.yaml min_episodes=400",
    ): elsewhere("tests/tracking/test_lifecycle.py::test_promote_cli_exit_codes_and_shipped_gate_file"),
    (
        "jobs/configs/online_update.yaml",
        "mobile-vla online-update --config jobs/configs/online_update.yaml replay.data=data/mini",
    ): elsewhere(
        "tests/online/test_online_update.py::test_online_update_learns_corrections_and_takes_over_only_through_the_gate"
    ),
    (
        "jobs/configs/online_update.yaml",
        "RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/online_update.py --config "
        "jobs/configs/online_update.yaml replay.data=/shared/data/mini",
    ): cannot("`ray job submit` needs a running head and the cluster's shared /shared/data"),
    (
        "jobs/configs/online_update.yaml",
        "cd /srv/mobile-vla && .venv/bin/python jobs/online_update.py --config jobs/configs/online_update.yaml",
    ): cannot("a cron line for a deployed checkout in /srv/mobile-vla with fleet feedback and a @champion"),
    ("jobs/configs/small.yaml", "mobile-vla data generate --out data/mini --episodes 200"): DATA_GENERATE,
    ("jobs/configs/small.yaml", "mobile-vla train --config jobs/configs/small.yaml run.name=small-1"): CHECK(),
    (
        "jobs/configs/small.yaml",
        "mobile-vla train --config jobs/configs/small.yaml run.name=small-1 train.epochs=20",
    ): TRAIN_RESUME,
    (
        "jobs/configs/small.yaml",
        "ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/small.yaml",
    ): cannot(SUBMIT),
    ("jobs/configs/small_aux.yaml", "mobile-vla data generate --out data/mini --episodes 200"): DATA_GENERATE,
    (
        "jobs/configs/small_aux.yaml",
        "mobile-vla train --config jobs/configs/small_aux.yaml run.name=small-aux-1",
    ): CHECK(),
    (
        "jobs/configs/small_aux.yaml",
        "mobile-vla train --config jobs/configs/small_aux.yaml run.name=small-aux-mae train.select_by=val_mae_now",
    ): CHECK(),
    (
        "jobs/configs/small_aux.yaml",
        "ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/small_aux.yaml",
    ): cannot(SUBMIT),
    ("jobs/configs/small_drive.yaml", "mobile-vla data generate --out data/mini --episodes 200"): DATA_GENERATE,
    (
        "jobs/configs/small_drive.yaml",
        "mobile-vla train --config jobs/configs/small_drive.yaml run.name=drive-1",
    ): CHECK(),
    (
        "jobs/configs/small_drive.yaml",
        "mobile-vla train --config jobs/configs/small_drive.yaml run.name=drive-1 train.epochs=20",
    ): TRAIN_RESUME,
    (
        "jobs/configs/small_drive.yaml",
        "ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/small_drive.yaml",
    ): cannot(SUBMIT),
    ("jobs/configs/small_measured.yaml", "mobile-vla data generate --out data/mini --episodes 200"): DATA_GENERATE,
    (
        "jobs/configs/small_measured.yaml",
        "mobile-vla train --config jobs/configs/small_measured.yaml run.name=measured-1",
    ): CHECK(),
    (
        "jobs/configs/small_measured.yaml",
        "mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/mini --closed-loop --no-offline "
        "--split unseen_layout --split unseen_pair --split unseen_paraphrase --with-val --episodes 200",
    ): elsewhere("tests/evaluate/test_commands.py::test_offline_and_closed_loop_onto_the_version"),
    (
        "jobs/configs/small_measured.yaml",
        "ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/small_measured.yaml",
    ): cannot(SUBMIT),
    (
        "jobs/configs/tiny.yaml",
        "mobile-vla train --config jobs/configs/tiny.yaml data.path=DIR run.name=smoke scaling.num_workers=1",
    ): elsewhere("tests/test_docs_commands.py::test_documented_train_trains_and_registers_a_tiny_run"),
    (
        "jobs/configs/tiny.yaml",
        "python jobs/train.py --config jobs/configs/tiny.yaml data.path=DIR scaling.num_workers=1",
    ): CHECK(),
    ("jobs/configs/tune_small.yaml", "mobile-vla data generate --out data/mini --episodes 200"): DATA_GENERATE,
    (
        "jobs/configs/tune_small.yaml",
        "mobile-vla tune --config jobs/configs/tune_small.yaml run.name=small-sweep-1",
    ): CHECK(),
    (
        "jobs/configs/tune_small.yaml",
        "ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_small.yaml",
    ): cannot("`ray job submit` needs a running head; the same sweep is CHECKed here"),
    (
        "jobs/configs/tune_tiny.yaml",
        "mobile-vla tune --config jobs/configs/tune_tiny.yaml data.path=DIR run.name=tiny-sweep",
    ): elsewhere("tests/tune/test_sweep.py::test_tune_console_script_exits_cleanly_and_records_the_code_that_ran"),
    ("jobs/configs/tune_tiny.yaml", "python jobs/tune.py --config jobs/configs/tune_tiny.yaml data.path=DIR"): CHECK(),
    (
        "jobs/configs/tune_tiny.yaml",
        "mobile-vla ensemble --from-sweep tiny-sweep --members 3 --config jobs/configs/tune_tiny.yaml data.path=DIR",
    ): elsewhere("tests/tune/test_sweep.py::test_ensemble_cli_combines_an_earlier_sweep"),
    (
        "serve_configs/gpu.yaml",
        "RAY_AUTH_MODE=token serve deploy serve_configs/gpu.yaml && RAY_AUTH_MODE=token serve status",
    ): cannot(GPU + "; TensorRT replicas"),
    ("serve_configs/gpu.yaml", "ray up clusters/gpu.yaml"): cannot(GPU),
    ("serve_configs/gpu.yaml", "mobile-vla serve --config serve_configs/gpu.yaml"): cannot(GPU + "; TensorRT replicas"),
    (
        "serve_configs/gpu.yaml",
        "mobile-vla export --model models:/mobile-vla-policy@champion --fp16 --tensorrt --max-batch 64",
    ): cannot("TensorRT needs a GPU (none here)"),
    ("serve_configs/local.yaml", "mobile-vla serve --config serve_configs/local.yaml"): elsewhere(
        "tests/serve/test_serve_command.py::test_serve_command_answers_on_loopback_and_stops_on_ctrl_c"
    ),
    (
        "serve_configs/local.yaml",
        "ray start --head --node-ip-address 127.0.0.1 && RAY_AUTH_MODE=token serve deploy serve_configs/local.yaml",
    ): cannot(
        "a `ray start` head beside the session's cluster costs ~1 min of CI on 2 cores; Ray's own `serve run` of "
        "this config is run by tests/serve/test_serve_command.py, its schema by tests/serve/test_configs.py"
    ),
}


def test_every_launch_line_is_classified():
    found = {(str(path.relative_to(REPO)), line) for path in CONFIG_FILES for line in launch_lines(path)}
    assert sorted(found - set(LAUNCH)) == [], "launch lines no test runs: add them to LAUNCH"
    assert sorted(set(LAUNCH) - found) == [], "LAUNCH names lines no header has any more"


def test_the_parser_reads_labels_continuations_cron_and_backticks(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text(
        "# title: prose, `mobile-vla data generate` alone is no line\n"
        "#   mobile-vla train --config a.yaml k=v   # trailing note\n"
        "# On a cluster:  ray job submit -- \\\n#     python jobs/train.py --config a.yaml\n"
        "#   cron (nightly):  0 3 * * *  cd /srv && python jobs/x.py\n"
        "# (started with `ray up clusters/gpu.yaml`)\n"
        "key: 1\n# mobile-vla after the header\n"
    )
    assert launch_lines(config) == [
        "mobile-vla train --config a.yaml k=v",
        "ray job submit -- python jobs/train.py --config a.yaml",
        "cd /srv && python jobs/x.py",
        "ray up clusters/gpu.yaml",
    ]


def _argv(line: str, dataset: Path) -> list[str]:
    """The line's words with DIR and data/mini pointing at `dataset`, config paths absolute."""
    words = []
    for word in shlex.split(line):
        if "=" in word and word.split("=", 1)[1] in ("DIR", "data/mini"):
            word = f"{word.split('=', 1)[0]}={dataset}"
        elif word.startswith(("jobs/", "serve_configs/")):
            word = str(REPO / word)
        words.append(word)
    return words


CASES = sorted(LAUNCH)


def _case_id(case: tuple[str, str]) -> str:
    return f"{Path(case[0]).name}: {case[1][:70]}"


@pytest.mark.parametrize("case", [c for c in CASES if LAUNCH[c][0] in ("elsewhere", "cannot")], ids=_case_id)
def test_launch_line_run_elsewhere_or_not_here(case):
    kind, what = LAUNCH[case]
    if kind == "elsewhere":
        file, test = what.split("::")
        path = tuple(subcommand_path(shlex.split(case[1])[1:]))
        calls = cli_invocations(file, test)  # KeyError/OSError: the named test is gone
        assert path and any(call[: len(path)] == path for call in calls), (what, path, sorted(calls))
        pytest.skip(f"executed through the CLI by {what}")
    pytest.skip(f"cannot run here: {what}")


@pytest.mark.slow  # Ray Train; the preflight builds each preset's model
@pytest.mark.parametrize("case", [c for c in CASES if LAUNCH[c][0] == "check"], ids=_case_id)
def test_launch_line_checks(case, ray_cluster, tiny_dataset, platform_home, capsys):
    """The line with `--check` appended (`python jobs/X.py` as `mobile-vla X`): it validates the preset (its keys,
    the data it needs, the model it builds, the cluster fit) without training."""
    from mobile_vla.cli import main

    words = _argv(case[1], tiny_dataset)
    if words[0] == "python":  # python jobs/train.py|tune.py ARGS == mobile-vla train|tune ARGS
        words = ["mobile-vla", Path(words[1]).stem, *words[2:]]
    argv = [*words[1:], "--check"]
    if not any(w.startswith("data.path=") for w in argv):
        argv.insert(-1, f"data.path={tiny_dataset}")
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "ok" in capsys.readouterr().out.lower()
