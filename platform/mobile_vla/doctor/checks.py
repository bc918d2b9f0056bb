"""The checks of `mobile-vla doctor`: one probe per part of the stack a newcomer's first command needs.

    results = run_checks()                 # [Check(name, status, detail, fix), ...] in CHECKS order
    worst = worst_status(results)          # "OK" | "WARN" | "FAIL"

Each probe returns one `Check` and never raises: an unexpected exception is a FAIL naming it. The
probes are module-level functions looked up by name in `CHECKS`, so tests can replace one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from mobile_vla.config import platform_home
from mobile_vla.errors import MobileVLAError
from mobile_vla.serve.auth import parse_tokens
from mobile_vla.tracking.store import is_embedded, tracking_uri

OK, WARN, FAIL = "OK", "WARN", "FAIL"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
CUDA_PROVIDER = "CUDAExecutionProvider"
TIMEOUT_S = 5.0  # network probes (MLflow server, Ray address)
RENDER_TIMEOUT_S = 120.0  # a cold MiniWorld import on a loaded 2-core box takes ~8 s

# A 32x32 MiniWorld frame rendered offscreen, as the data generator and closed-loop evaluation do
# (sim/navigation_env.py sets the same two switches). In a child process: a GL context in this
# process would outlive the check, and the simulator's own warnings stay out of the report.
_RENDER_PROBE = """
import os
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
import pyglet
pyglet.options["headless"] = True
import gymnasium, miniworld
env = gymnasium.make("MiniWorld-OneRoom-v0", obs_width=32, obs_height=32)
obs, _ = env.reset(seed=0)  # uint8 [32, 32, 3]
from pyglet.gl import gl_info
print("RENDERED", obs.shape[0], obs.shape[1], float(obs.std()), gl_info.get_renderer())
env.close()
"""


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, OK/WARN/FAIL, what was seen, and the fix (if any)."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible here: `nvidia-smi -L` lists one, not hidden by CUDA_VISIBLE_DEVICES."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def check_egl() -> Check:
    """MiniWorld renders offscreen (EGL): data generation and closed-loop evaluation need it."""
    platform = os.environ.get("PYOPENGL_PLATFORM", "egl")
    fix = "install Mesa EGL (Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri), keep PYOPENGL_PLATFORM=egl"
    if platform != "egl":
        return Check("egl", WARN, f"PYOPENGL_PLATFORM={platform}: headless rendering wants egl", "unset it or set egl")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RENDER_PROBE], capture_output=True, text=True, timeout=RENDER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return Check("egl", FAIL, f"a 32x32 MiniWorld render did not finish in {RENDER_TIMEOUT_S:.0f} s", fix)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RENDERED ")), None)
    if done.returncode != 0 or line is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("egl", FAIL, f"offscreen MiniWorld render failed: {last}", fix)
    _, height, width, spread, renderer = line.split(" ", 4)
    if float(spread) == 0.0:
        return Check("egl", FAIL, f"the rendered frame is blank ({renderer})", fix)
    return Check("egl", OK, f"MiniWorld rendered a {height}x{width} frame offscreen ({renderer})")


def check_torch() -> Check:
    """Torch imports; with a GPU visible, CUDA must be usable by it."""
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", FAIL, f"import torch failed: {exc}", "bash scripts/setup.sh (installs from the lock)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("torch", OK, f"torch {torch.__version__}, CUDA {torch.version.cuda}: {names}")
    if gpu_visible():
        return Check(
            "torch",
            FAIL,
            f"a GPU is visible (nvidia-smi) but torch {torch.__version__} cannot use it "
            f"(CUDA build: {torch.version.cuda})",
            "install a torch build matching the driver (nvidia-smi shows its CUDA version)",
        )
    return Check("torch", OK, f"torch {torch.__version__}, no GPU: training and export run on the CPU")


def check_onnxruntime() -> Check:
    """ONNX Runtime's providers; with a GPU visible, CUDA should come first (serving uses it)."""
    try:
        ort = importlib.import_module("onnxruntime")
    except Exception as exc:  # noqa: BLE001
        return Check("onnxruntime", FAIL, f"import onnxruntime failed: {exc}", "bash scripts/setup.sh")
    providers = list(ort.get_available_providers())
    detail = f"onnxruntime {ort.__version__}: {', '.join(providers)}"
    if "CPUExecutionProvider" not in providers:
        return Check("onnxruntime", FAIL, detail + " (no CPU provider)", "reinstall onnxruntime from the lock")
    if gpu_visible():
        if CUDA_PROVIDER not in providers:
            return Check(
                "onnxruntime",
                WARN,
                detail + ": a GPU is visible but this build has no CUDA provider, serving falls back to the CPU",
                "pip uninstall onnxruntime && pip install onnxruntime-gpu (the gpu extra; never both)",
            )
        if providers[0] != CUDA_PROVIDER and providers[:2] != ["TensorrtExecutionProvider", CUDA_PROVIDER]:
            return Check("onnxruntime", WARN, detail + ": CUDA is not the first GPU provider", "check the gpu extra")
    return Check("onnxruntime", OK, detail)


def check_tensorrt() -> Check:
    """TensorRT is optional: absent, the ONNX Runtime replicas serve (a WARN, never a FAIL)."""
    if importlib.util.find_spec("tensorrt") is None:
        where = "a GPU is visible" if gpu_visible() else "no GPU here"
        return Check(
            "tensorrt",
            WARN,
            f"tensorrt is not installed ({where}): serving uses ONNX Runtime, no TensorRT plans",
            "on a GPU node: pip install the gpu extra (TensorRT comes from NVIDIA's index)",
        )
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001 - PyPI's stub package raises on import
        fix = "install it from NVIDIA's index"
        return Check("tensorrt", WARN, f"tensorrt is installed but does not import: {exc}", fix)
    return Check("tensorrt", OK, f"tensorrt {getattr(trt, '__version__', '?')}")


def check_home() -> Check:
    """The platform home (MOBILE_VLA_HOME, default ./.mobile_vla) exists or can be made, and is writable."""
    home = platform_home()
    fix = f"set MOBILE_VLA_HOME to a writable folder (now {home})"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("home", FAIL, f"platform home {home} is not writable: {exc.strerror or exc}", fix)
    return Check("home", OK, f"platform home {home} is writable")


def check_mlflow() -> Check:
    """The tracking URI answers: the embedded SQLite store opens, or the server's /health says OK."""
    uri = tracking_uri()
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "embedded"
    if is_embedded(uri):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.exists():
            return Check("mlflow", OK, f"{uri} ({source}): created by the first run")
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=TIMEOUT_S) as connection:
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            return Check("mlflow", FAIL, f"{uri} ({source}) does not open: {exc}", "move the damaged file aside")
        if tables and "alembic_version" not in tables:
            return Check("mlflow", FAIL, f"{uri} ({source}) is not an MLflow store", "move the file aside")
        return Check("mlflow", OK, f"{uri} ({source}) opens ({len(tables)} tables)")
    if urlparse(uri).scheme in ("http", "https"):
        fix = "start the server (mobile-vla mlflow-ui, or mlflow server) or fix MLFLOW_TRACKING_URI"
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TIMEOUT_S) as answer:
                body = answer.read(64).decode("utf-8", "replace").strip()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Check("mlflow", FAIL, f"{uri} ({source}) unreachable: {getattr(exc, 'reason', exc)}", fix)
        return Check("mlflow", OK, f"{uri} ({source}) answers /health: {body}")
    return Check("mlflow", WARN, f"{uri} ({source}): not probed (only sqlite and http(s) are)", "")


def ray_token_source() -> str | None:
    """Where Ray would read its auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return str(path) if path.is_file() and path.read_text().strip() else None


def _reachable(address: str) -> str | None:
    """None when a TCP connection to address's host:port opens, else why not."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        return f"cannot read host:port from {address!r}"
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=TIMEOUT_S):
            return None
    except OSError as exc:
        return str(exc.strerror or exc)


def check_ray() -> Check:
    """Ray: a local cluster per command, or RAY_ADDRESS reachable with token auth on and a token."""
    try:
        ray = importlib.import_module("ray")
    except Exception as exc:  # noqa: BLE001
        return Check("ray", FAIL, f"import ray failed: {exc}", "bash scripts/setup.sh")
    address = os.environ.get("RAY_ADDRESS", "")
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token = ray_token_source()
    if not address:
        note = f"token {token}" if token else "a token is generated at ~/.ray/auth_token on first start"
        return Check("ray", OK, f"ray {ray.__version__}: no RAY_ADDRESS, each command starts a local cluster ({note})")
    if address != "auto":
        unreachable = _reachable(address)
        if unreachable:
            fix = "start the head or fix RAY_ADDRESS"
            return Check("ray", FAIL, f"RAY_ADDRESS={address} unreachable: {unreachable}", fix)
    if mode.lower() == "disabled":
        return Check("ray", WARN, f"RAY_AUTH_MODE=disabled for RAY_ADDRESS={address}", "export RAY_AUTH_MODE=token")
    if mode.lower() != "token":
        return Check(
            "ray",
            WARN,
            f"RAY_ADDRESS={address} but RAY_AUTH_MODE is {mode or 'unset'}: `ray job submit`, `serve deploy` and "
            "`serve status` against a token-auth cluster are refused",
            "export RAY_AUTH_MODE=token",
        )
    if token is None:
        return Check(
            "ray",
            FAIL,
            "RAY_AUTH_MODE=token but no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
            "copy the cluster's token (`ray get-auth-token` on the head) to ~/.ray/auth_token",
        )
    return Check("ray", OK, f"ray {ray.__version__}: RAY_ADDRESS={address}, token auth, token {token}")


def check_serve_tokens() -> Check:
    """The API tokens file serving reads: MOBILE_VLA_TOKENS_FILE, else the home's (as `mobile-vla serve`)."""
    configured = os.environ.get("MOBILE_VLA_TOKENS_FILE")
    path = Path(configured).expanduser() if configured else platform_home() / "serve" / "tokens"
    source = "MOBILE_VLA_TOKENS_FILE" if configured else "platform home"
    if not path.exists():
        if configured:
            return Check("serve-tokens", FAIL, f"{path} ({source}) does not exist", "mobile-vla serve tokens add ...")
        return Check("serve-tokens", WARN, f"no {path} yet: `mobile-vla serve` creates one", "")
    try:
        grants = parse_tokens(path.read_text(), str(path))
    except (OSError, MobileVLAError) as exc:
        return Check("serve-tokens", FAIL, f"{path} ({source}): {exc}", "fix the named line or recreate the file")
    if not grants:
        return Check("serve-tokens", FAIL, f"{path} ({source}) holds no token", "mobile-vla serve tokens add ...")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check("serve-tokens", WARN, f"{path} is readable by others ({len(grants)} tokens)", f"chmod 600 {path}")
    return Check("serve-tokens", OK, f"{path} ({source}): {len(grants)} token(s), readable by its owner only")


CHECKS = {
    "egl": "check_egl",
    "torch": "check_torch",
    "onnxruntime": "check_onnxruntime",
    "tensorrt": "check_tensorrt",
    "home": "check_home",
    "mlflow": "check_mlflow",
    "ray": "check_ray",
    "serve-tokens": "check_serve_tokens",
}


def run_checks(names: list[str] | None = None) -> list[Check]:
    """Runs the named checks (default: all, in CHECKS order); an exception in a probe is its FAIL."""
    results = []
    for name in names or list(CHECKS):
        try:
            results.append(globals()[CHECKS[name]]())
        except Exception as exc:  # noqa: BLE001 - the report must finish
            results.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return results


def worst_status(results: list[Check]) -> str:
    """FAIL if any check failed, else WARN if any warned, else OK."""
    return max((r.status for r in results), key=_RANK.__getitem__, default=OK)
