"""The repository's promises: .ci/run runs exactly the README's test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.strip() for b in _bash_blocks(readme)]
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1, "README must hold exactly one test command"
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_cmd[0] in ci.splitlines()


def test_readme_main_job_installs_torch_first():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for block in _bash_blocks(readme):
        assert block.strip().startswith("python3 -m pip install torch==2.13.0")
