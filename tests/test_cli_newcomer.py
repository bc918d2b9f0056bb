"""Issue 19's newcomer traps, the fast checks: one override syntax (`tune` takes plain KEY=VALUE like
`train`), every documented preset line fits the 2-core machine it is written for.

The executed commands (the console script running a sweep) are in tests/test_docs_commands.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mobile_vla.cli import main
from mobile_vla.config import has_key
from mobile_vla.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TUNE_TINY = str(REPO / "jobs" / "configs" / "tune_tiny.yaml")


def test_has_key_follows_sections_and_open_dicts():
    from mobile_vla.train.job_config import TrainJobConfig

    assert has_key(TrainJobConfig, "data.path") and has_key(TrainJobConfig, "train.epochs")
    assert has_key(TrainJobConfig, "model.overrides.lstm_hidden")  # a dict field takes any key below it
    assert has_key(TrainJobConfig, "scaling.resources_per_worker.CPU")
    assert not has_key(TrainJobConfig, "data.path.deeper")  # a value field takes none
    assert not has_key(TrainJobConfig, "tune.num_samples") and not has_key(TrainJobConfig, "dta.path")


def test_tune_overrides_go_to_the_config_that_has_the_key():
    from mobile_vla.tune.sweep_config import split_overrides

    sweep, training = split_overrides(
        ["data.path=/d", "tune.num_samples=1", "train.epochs=2", "run.name=s", "train.config=x.yaml", "optim.lr=1e-3"]
    )
    assert sweep == ["tune.num_samples=1", "run.name=s", "train.config=x.yaml"]
    assert training == ["data.path=/d", "train.epochs=2", "optim.lr=1e-3"]
    with pytest.raises(ConfigError, match="'dta.path' is a key of neither"):
        split_overrides(["dta.path=/d"])


def test_tune_config_gets_plain_train_overrides_after_its_own():
    from mobile_vla.tune.sweep_config import load_base_train_config, load_tune_config, split_overrides

    sweep, training = split_overrides(["data.path=/somewhere", "train.epochs=1", "tune.num_samples=2"])
    cfg = load_tune_config(TUNE_TINY, sweep, training)
    assert cfg.tune.num_samples == 2
    assert cfg.train.overrides[-2:] == ["data.path=/somewhere", "train.epochs=1"]
    base = load_base_train_config(cfg, Path(TUNE_TINY).parent)
    assert base.data.path == "/somewhere" and base.train.epochs == 1 and base.scaling.num_workers == 1


@pytest.mark.parametrize(
    "words",
    [["data.path={missing}"], ["--train-override", "data.path={missing}"]],
    ids=["plain", "deprecated --train-override"],
)
def test_tune_check_reads_data_path_either_way(words, tmp_path, capsys):
    """Before: a plain data.path=DIR was refused as "unknown key 'data'". Now it reaches the training
    preset (the check fails on the missing folder by name); the old spelling still works, with a warning."""
    missing = tmp_path / "no-data"
    argv = ["tune", "--config", TUNE_TINY, *(w.format(missing=missing) for w in words), "--check"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.path = '{missing}': no such folder" in err and "unknown key" not in err
    assert ("--train-override is deprecated" in err) == ("--train-override" in words)


def test_tune_refuses_a_key_neither_config_has(capsys):
    assert main(["tune", "--config", TUNE_TINY, "dta.path=/d", "--check"]) == 2
    assert "'dta.path' is a key of neither the tune config nor the training preset" in capsys.readouterr().err


def _header_lines(config: Path) -> list[str]:
    """The `mobile-vla train|tune ...` and `python jobs/train.py|tune.py ...` lines of a preset's header."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").split("   #")[0]
        words = shlex.split(text) if text.startswith(("mobile-vla train", "mobile-vla tune", "python jobs/")) else []
        if words:
            lines.append(text)
    return lines


LOCAL_PRESETS = ["tiny.yaml", "small.yaml", "small_aux.yaml", "small_drive.yaml", "small_measured.yaml"]


@pytest.mark.parametrize("name", [*LOCAL_PRESETS, "tune_tiny.yaml", "tune_small.yaml"])
def test_header_launch_lines_fit_a_two_core_machine(name):
    """Every local launch line in a CPU preset's header passes the resource preflight of a fresh
    `ray.init()` on 2 cores (before: tiny's own line asked 2 workers x 1 CPU, all of the machine)."""
    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.preflight import ClusterCapacity, check_resources
    from mobile_vla.tune.sweep_config import load_base_train_config, load_tune_config, split_overrides
    from mobile_vla.tune.trial_resources import concurrency

    config = REPO / "jobs" / "configs" / name
    lines = _header_lines(config)
    assert lines, f"{name}: no launch line in the header"
    two_cores = ClusterCapacity(nodes=[{"CPU": 2.0, "memory": 8e9}])
    for line in lines:
        words = shlex.split(line)
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        if "tune" in words[1] or words[1].endswith("tune.py"):
            sweep, training = split_overrides(overrides)
            cfg = load_tune_config(config, sweep, training)
            assert concurrency(cfg, load_base_train_config(cfg, config.parent), {"CPU": 2.0, "memory": 8e9}) >= 1
        else:
            check_resources(load_train_config(config, overrides), two_cores)  # ResourceError fails the test


@pytest.mark.parametrize("deprecated", [False, True], ids=["plain", "deprecated --set"])
def test_data_generate_takes_plain_overrides_too(deprecated, capsys):
    override = "held_out_templates=[approach, avoiding]"
    words = ["--set", override] if deprecated else [override]
    assert main(["data", "generate", "--show-split-spec", *words]) == 0
    captured = capsys.readouterr()
    assert "held_out_templates:\n- approach\n- avoiding\n" in captured.out
    assert ("--set is deprecated" in captured.err) == deprecated


def test_a_sweep_finds_its_training_preset_from_any_working_directory(tmp_path, monkeypatch, capsys):
    """tune_tiny.yaml names `jobs/configs/tiny.yaml` from the repository root; run from elsewhere (as the
    executed-command test does) the sweep failed with "train.config ...: no such file"."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-data"
    assert main(["tune", "--config", TUNE_TINY, f"data.path={missing}", "--check"]) == 2
    err = capsys.readouterr().err
    assert f"data.path = '{missing}': no such folder" in err and "train.config" not in err


def test_the_quickstart_curl_line_sends_a_request_that_is_in_the_repo_and_valid():
    """Before: `-d @request.json` named a file that existed nowhere. The body it names now ships in the
    repository (relative to the root, where the quickstart's commands run) and is a valid /v1/act request."""
    import base64
    import io
    import json
    import re

    from PIL import Image

    from mobile_vla.serve.schemas import ActRequest

    text = (REPO / "docs" / "quickstart.md").read_text()
    bodies = re.findall(r"/v1/act -d @(\S+)", text)
    assert bodies, "no curl line to /v1/act in the quickstart"
    for body in bodies:
        request = ActRequest.model_validate(json.loads((REPO / body).read_text()))  # FileNotFoundError fails
        frame = Image.open(io.BytesIO(base64.b64decode(request.image)))
        assert frame.format == "JPEG" and min(frame.size) >= 32 and len(request.state) == 3
