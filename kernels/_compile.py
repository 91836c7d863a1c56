"""Rung 3 of the ladder: compile kernels for a real NVIDIA chip on a machine with no GPU.

Every kernel module exposes ``compile_specs(arch) -> list[KernelSpec]`` listing *every*
configuration its launcher can pick on that architecture (dtype x block sizes x warps x
stages x constexpr flags).  ``compile_spec`` builds PTX and cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads back what
the chip would see: registers, shared memory, local memory (spills) and whether the PTX uses
``wgmma`` (Hopper tensor-core GEMM) or ``mma.sync`` (Ampere).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed triton; (99, 0) without triton (the newest tables apply)."""
    try:
        import triton
    except ImportError:
        return (99, 0)
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


# The one version rule of the configuration tables.  Each triton wheel bundles its own ptxas;
# the tables are chosen (and compile without spills) for triton 3.9's.  Triton older than 3.9
# -- 3.6.0 is what the GPU machines run -- spills in a few configurations, which the op's config
# function then replaces by a measured spill-free one (``_gemm._table``, ``attention._table_config``,
# ``add_layernorm._config``, ``embeddings_layernorm._config``; each cites its measurement).
OLD_PTXAS = triton_version() < (3, 9)

# Opt-in shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class KernelSpec:
    """One launchable configuration of one Triton kernel."""

    op: str  # public op name, e.g. "linear"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument -> triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 2
    expect_tensor_cores: bool = False  # GEMM kernels: assert wgmma (sm_90) / mma (sm_80)
    label: str = ""  # short description of the configuration for the table
    # arguments the launch may specialise as divisible by 16 (aligned pointers, strides and
    # sizes that are multiples of 16: what the runtime JIT builds for BERT shapes).  Empty: the
    # generic kernel.  Ops list both variants where both can run.
    divisible: tuple = ()

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__


@dataclass
class CompileResult:
    op: str
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    error: str = ""
    registers: int = -1
    shared_bytes: int = -1
    local_bytes: int = -1  # > 0 means register spills to local memory
    spill_stores: int = -1
    spill_loads: int = -1
    wgmma: bool = False
    mma: bool = False
    expect_tensor_cores: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def shared_limit(self) -> int:
        return SHARED_MEMORY_LIMIT.get(self.arch, 101376)


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else tool


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, static shared bytes, local bytes) of the first function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return -1, -1, -1
    return int(m.group(1)), int(m.group(3)), int(m.group(4))


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int]:
    """Spill stores / loads as ptxas reports them (-v)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False, mode="w") as f:
        f.write(ptx)
        path = f.name
    try:
        proc = subprocess.run(
            [_nvidia_bin("ptxas"), "-v", f"--gpu-name={gpu}", path, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(path)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", proc.stderr))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", proc.stderr))
    return stores, loads


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = CompileResult(
        op=spec.op, kernel=spec.name, label=spec.label + (" aligned" if spec.divisible else ""), arch=arch, num_warps=spec.num_warps,
        num_stages=spec.num_stages, ok=False, expect_tensor_cores=spec.expect_tensor_cores,
    )
    fn = getattr(spec.fn, "launched_fn", spec.fn)  # a _launch.Kernel compiles its triton.jit function
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        res.error = "kernel was decorated under TRITON_INTERPRET=1; compile in a process without it"
        return res
    try:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        k = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        )
    except Exception as e:  # report, do not crash the whole table
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return res
    ptx = k.asm["ptx"]
    regs, static_shared, local = _resource_usage(k.asm["cubin"])
    stores, loads = _ptxas_spills(ptx, arch)
    res.ok = True
    res.registers = regs
    res.shared_bytes = int(k.metadata.shared) + max(static_shared, 0)
    res.local_bytes = local
    res.spill_stores, res.spill_loads = stores, loads
    res.wgmma = "wgmma" in ptx
    res.mma = "mma.sync" in ptx or res.wgmma
    return res
