"""The repository's promises: .ci/run runs exactly the README's test command, and that command
(like the main job's) builds its own virtual environment, installing the pinned torch first."""
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _steps(command):
    """One shell line of ``a && b && c`` -> [["a", ...], ["b", ...], ...] (words per step)."""
    return [shlex.split(step) for step in command.split("&&")]


def _readme_test_command():
    test_cmd = [b for b in _bash_blocks(_read("README.md")) if "pytest" in b]
    assert len(test_cmd) == 1, "README must hold exactly one test command"
    return test_cmd[0]


def test_ci_runs_the_readme_test_command():
    cmd = _readme_test_command()
    assert "\n" not in cmd, "the README test command must be one line (CI runs it as written)"
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert cmd in ci_lines
    # first; then only the other CI steps, each a script beside it (the wheel, the GPU machine's
    # versions), and nothing else that installs packages or runs tests
    others = [line for line in ci_lines if line != cmd and not line.startswith("#")]
    assert not [line for line in others if re.search(r"\bpip\b.*\binstall\b|\bpytest\b", line)], others
    steps = [line.split()[1] for line in others if line.startswith("bash .ci/")]
    assert steps == [".ci/wheel", ".ci/gpu-versions"], steps
    assert ci_lines.index(cmd) < min(ci_lines.index(f"bash {s}") for s in steps)
    for step in steps:
        text = _read(*step.split("/"))
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, step
        assert "python3 -m venv" in text or '-m venv "$work/venv"' in text, f"{step} builds its own venv"


@pytest.mark.parametrize("which", ["main job", "tests"])
def test_readme_commands_build_a_venv_and_install_torch_first(which):
    blocks = _bash_blocks(_read("README.md"))
    assert len(blocks) == 2, blocks
    block = [b for b in blocks if ("pytest" in b) == (which == "tests")][0]
    steps = _steps(block)
    # a new virtual environment, activated before anything is installed
    assert steps[0][:3] == ["python3", "-m", "venv"], block
    venv = steps[0][-1]
    assert steps[1] in ([".", f"{venv}/bin/activate"], ["source", f"{venv}/bin/activate"]), block
    installs = [s for s in steps if "pip" in s and "install" in s]
    assert installs, block
    # inside the venv: "python" is the venv's interpreter; python3 could be another on PATH
    assert all(s[0] == "python" for s in steps[2:] if s[0].startswith("python")), block
    # pinned torch first: an unpinned torch pulls several GB of CUDA packages
    assert installs[0][-1] == "torch==2.13.0", block
    assert steps.index(installs[0]) == 2, block


def test_test_extras_hold_the_plugins_the_command_uses():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads(_read("pyproject.toml"))["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~;\[ ]", e, maxsplit=1)[0].lower() for e in extras}
    words = shlex.split(_readme_test_command())
    assert ".[test]" in words
    assert "pytest" in names
    if "-n" in words or any(w.startswith("--numprocesses") for w in words):
        assert "pytest-xdist" in names
    if any("randomly" in w for w in words):
        assert "pytest-randomly" in names
    assert "torch" not in names, "torch is installed (pinned) by the command itself, first"


def test_ci_script_is_executable_bash():
    path = os.path.join(ROOT, ".ci", "run")
    assert os.access(path, os.X_OK)
    text = _read(".ci", "run")
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "PIP_DISABLE_PIP_VERSION_CHECK=1" in text


def test_loading_does_not_import_modeling():
    """One direction only: modeling uses loading (from_pretrained), loading never imports modeling."""
    import ast

    with open(os.path.join(ROOT, "bertfast", "loading.py")) as f:
        tree = ast.parse(f.read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("modeling" in n for n in names), names
