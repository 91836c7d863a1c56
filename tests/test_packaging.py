"""One import name of its own: bertfast and its kernels (``bertfast.kernels``) live beside Hugging
Face's ``kernels`` package (which transformers >= 5.25 requires) and transformers in one process,
from the checkout root and from any other directory.  CI's .ci/wheel checks the built wheel the
same way from outside the checkout."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    importlib.metadata.distribution("kernels")
    HF_KERNELS = True
except importlib.metadata.PackageNotFoundError:  # transformers < 5.25 does not need it
    HF_KERNELS = False

_CHECK = r"""
import importlib, importlib.util, json, os, sys
import transformers
from transformers import BertModel  # noqa: F401
hub = None
if HF_KERNELS:
    import kernels
    importlib.import_module("transformers.integrations.hub_kernels")
    hub = os.path.realpath(kernels.__file__)
spec = importlib.util.find_spec("kernels")
import bertfast
import bertfast.kernels
from bertfast.kernels import HAS_TRITON, linear_reference  # noqa: F401
from bertfast.kernels.linear import linear_reference as ref2
json.dump({"hub": hub, "spec_origin": spec and spec.origin, "bertfast": os.path.realpath(bertfast.__file__),
           "bertfast_kernels": os.path.realpath(bertfast.kernels.__file__),
           "ref_module": ref2.__module__, "same": ref2 is linear_reference}, sys.stdout)
"""


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if os.environ.get("PYTHONPATH"):  # a plain checkout (no install): keep it on the path from anywhere
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_transformers_hf_kernels_and_bertfast_in_one_process(where, tmp_path):
    cwd = ROOT if where == "checkout root" else str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", f"HF_KERNELS = {HF_KERNELS}\n" + _CHECK], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    import bertfast

    pkg = os.path.realpath(os.path.dirname(bertfast.__file__))
    assert out["bertfast"] == os.path.realpath(bertfast.__file__)
    # bertfast runs its own kernels: the package file of bertfast.kernels, beside bertfast
    assert os.path.basename(out["bertfast_kernels"]) == "_package.py"
    assert os.path.dirname(out["bertfast_kernels"]) in (os.path.join(pkg, "kernels"),
                                                        os.path.join(os.path.dirname(pkg), "kernels"))
    assert out["ref_module"] == "bertfast.kernels.linear" and out["same"]
    ours = os.path.realpath(os.path.join(ROOT, "kernels"))
    if HF_KERNELS:  # `import kernels` is Hugging Face's, never our folder
        assert not out["hub"].startswith(ours + os.sep), out
        assert os.path.realpath(out["spec_origin"]) == out["hub"]
    else:  # nothing named kernels is a regular package of ours (a namespace folder at most)
        assert out["spec_origin"] in (None, "namespace") or not os.path.realpath(out["spec_origin"]).startswith(ours)


def test_no_top_level_kernels_package_in_the_tree_or_the_distribution():
    """A kernels/__init__.py at the checkout root would shadow Hugging Face's package for every
    process started there; the distribution installs one top-level name, bertfast."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert all(p == "bertfast" or p.startswith("bertfast.") for p in setuptools["packages"]), setuptools
    assert setuptools["package-dir"] == {"bertfast.kernels": "kernels"}


def test_no_code_imports_a_top_level_kernels_module():
    import re

    bad = []
    for top in ("bertfast", "kernels", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith((".py", ".sh")) and os.path.realpath(path) != os.path.realpath(__file__):
                    with open(path, encoding="utf-8") as f:
                        for i, line in enumerate(f, 1):
                            if re.search(r"^\s*(import kernels\b|from kernels\b)|import_module\(f?[\"']kernels\.|"
                                         r"-m[\"', ]+kernels\.", line):
                                bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
