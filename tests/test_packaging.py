"""The package layout keeps the standard library importable and the CLI thin."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_still_imports_from_repo_root():
    # platform/ holds our package (src-style); it must never shadow the standard library module.
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform, mobile_vla; print(platform.python_version(), mobile_vla.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == ".".join(map(str, sys.version_info[:3]))
    assert Path(out[1]).is_relative_to(REPO / "platform" / "mobile_vla")


COMMANDS = ["data", "model", "train", "tune", "ensemble", "evaluate", "export", "mlflow-ui", "models", "serve",
            "rollout", "promote", "online-update", "collect", "doctor", "demo"]  # fmt: skip


def test_cli_help_lists_commands_and_bad_command_fails():
    ok = subprocess.run([sys.executable, "-m", "mobile_vla.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: mobile-vla ")
    listed = re.findall(r"^ {4}(\S+)", ok.stdout, flags=re.M)  # one subcommand per 4-space-indented line
    assert listed == COMMANDS, listed
    bad = subprocess.run([sys.executable, "-m", "mobile_vla.cli", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_importing_the_package_loads_no_heavy_modules():
    heavy = ("torch", "ray", "mlflow", "transformers", "onnxruntime", "miniworld")
    code = f"import sys, mobile_vla.cli; mobile_vla.cli.build_parser(); print(sorted(set({heavy}) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
