"""`mobile-vla doctor`: one line per check, the fix beside each WARN/FAIL, exit 1 on any FAIL, --json.

The failure cases replace one probe's input (environment, files, a dead port, a fake module); the one
real run (all checks, on this box) is at the end.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import types

import pytest

from mobile_vla.cli import main
from mobile_vla.doctor import checks
from mobile_vla.doctor.checks import CHECKS, FAIL, OK, WARN, Check
from mobile_vla.serve.auth import create_tokens_file


@pytest.fixture()
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("MOBILE_VLA_HOME", str(folder))
    for name in ("MLFLOW_TRACKING_URI", "MOBILE_VLA_TOKENS_FILE", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    return folder


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def _fake(name: str, status: str) -> Check:
    return Check(name, status, f"{name} seen", "do this" if status != OK else "")


def test_lines_exit_code_and_json_follow_the_worst_check(monkeypatch, capsys):
    statuses = dict.fromkeys(CHECKS, OK) | {"tensorrt": WARN}
    for name, function in CHECKS.items():
        monkeypatch.setattr(checks, function, lambda name=name: _fake(name, statuses[name]))
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[statuses[n], n] for n in CHECKS]
    assert "tensorrt seen  -> fix: do this" in lines[3] and lines[-1] == "doctor: WARN"

    statuses["ray"] = FAIL
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == FAIL and [c["name"] for c in report["checks"]] == list(CHECKS)
    assert report["checks"][6] == {"name": "ray", "status": FAIL, "detail": "ray seen", "fix": "do this"}


def test_a_probe_that_raises_is_its_own_fail_and_the_report_finishes(monkeypatch, capsys):
    monkeypatch.setattr(checks, "check_home", lambda: 1 / 0)
    monkeypatch.setattr(checks, "check_mlflow", lambda: _fake("mlflow", OK))
    assert main(["doctor", "--check", "home", "--check", "mlflow"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  home    the check itself failed: ZeroDivisionError" in out and "OK    mlflow" in out


def test_egl_failure_and_a_non_egl_platform(monkeypatch):
    monkeypatch.setattr(checks, "_RENDER_PROBE", "raise SystemExit('libEGL.so.1: cannot open shared object file')")
    result = checks.check_egl()
    assert result.status == FAIL and "libEGL.so.1" in result.detail and "libegl1" in result.fix
    monkeypatch.setenv("PYOPENGL_PLATFORM", "glx")
    assert checks.check_egl().status == WARN


def test_onnxruntime_without_cuda_on_a_gpu_machine_warns(monkeypatch):
    fake = types.SimpleNamespace(__version__="9.9", get_available_providers=lambda: ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(checks, "gpu_visible", lambda: False)
    assert checks.check_onnxruntime().status == OK
    monkeypatch.setattr(checks, "gpu_visible", lambda: True)
    result = checks.check_onnxruntime()
    assert result.status == WARN and "no CUDA provider" in result.detail and "onnxruntime-gpu" in result.fix
    fake.get_available_providers = lambda: ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert "CUDA is not the first" in checks.check_onnxruntime().detail
    fake.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert checks.check_onnxruntime().status == OK


def test_torch_that_cannot_see_a_visible_gpu_fails(monkeypatch):
    cuda = types.SimpleNamespace(is_available=lambda: False)
    fake = types.SimpleNamespace(__version__="2.x+cpu", cuda=cuda, version=types.SimpleNamespace(cuda=None))
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setattr(checks, "gpu_visible", lambda: True)
    assert checks.check_torch().status == FAIL
    monkeypatch.setattr(checks, "gpu_visible", lambda: False)
    assert checks.check_torch().status == OK


def test_tensorrt_absent_is_a_warning_never_a_failure(monkeypatch):
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(checks, "gpu_visible", lambda: True)
    assert checks.check_tensorrt().status == WARN


def test_home_not_writable_fails(home, monkeypatch):
    home.parent.mkdir(exist_ok=True)
    home.write_text("a file, not a folder")
    result = checks.check_home()
    assert result.status == FAIL and "MOBILE_VLA_HOME" in result.fix


def test_mlflow_server_down_fails_and_a_damaged_store_fails(home, monkeypatch):
    assert checks.check_mlflow().status == OK  # no store yet: the first run creates it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_dead_port()}")
    result = checks.check_mlflow()
    assert result.status == FAIL and "unreachable" in result.detail and "mlflow-ui" in result.fix
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    home.mkdir()
    (home / "mlflow.db").write_bytes(b"not a database, " * 100)
    assert checks.check_mlflow().status == FAIL


def test_ray_address_auth_mode_and_token(home, tmp_path, monkeypatch):
    assert checks.check_ray().status == OK  # no address: a local cluster per command
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_dead_port()}")
    assert "unreachable" in checks.check_ray().detail
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{listener.getsockname()[1]}")
        result = checks.check_ray()
        assert result.status == WARN and result.fix == "export RAY_AUTH_MODE=token"
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        result = checks.check_ray()
        assert result.status == FAIL and "no token" in result.detail and "~/.ray/auth_token" in result.fix
        (tmp_path / "no-token").write_text("abc\n")
        assert checks.check_ray().status == OK


def test_serve_tokens_missing_bad_open_and_good(home, tmp_path, monkeypatch):
    assert checks.check_serve_tokens().status == WARN  # `mobile-vla serve` creates the home's file
    path = tmp_path / "tokens"
    monkeypatch.setenv("MOBILE_VLA_TOKENS_FILE", str(path))
    assert checks.check_serve_tokens().status == FAIL  # named, but absent
    create_tokens_file(path)
    assert checks.check_serve_tokens().status == OK
    os.chmod(path, 0o644)
    assert checks.check_serve_tokens().fix == f"chmod 600 {path}"
    path.write_text("tok robots=r1 scopes=nonsense\n")
    assert checks.check_serve_tokens().status == FAIL


@pytest.mark.slow
def test_the_real_checks_pass_on_this_box(home, capsys):
    """Every probe for real (a MiniWorld frame rendered offscreen, imports, a fresh home): no FAIL here;
    TensorRT is absent on this CPU box (WARN) and the home has no tokens file yet (WARN)."""
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in report["checks"]}
    assert list(by_name) == ["egl", "torch", "onnxruntime", "tensorrt", "home", "mlflow", "ray", "serve-tokens"]
    assert report["status"] in (OK, WARN) and all(c["status"] != FAIL for c in report["checks"])
    assert by_name["egl"]["status"] == OK and by_name["serve-tokens"]["status"] == WARN
    assert home.is_dir() and by_name["home"]["status"] == OK
