"""bertfast on existing distributed engines, on the CPU: torchrun encoding with 2 gloo ranks
gives the single-process output; DDP (and FSDP2) fine-tuning with 2 gloo ranks gives the gradients
of a single-process run on the same global batch (torch path and Triton custom ops under the
interpreter, padding-free included); Ray Data with 2 CPU workers gives the single-process vectors.
Multi-GPU (NCCL) and multi-node runs are not tested here (no GPU, one machine)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bertfast.corpus import encode_file, manifest_path, read_manifest

from test_corpus import BATCH_ATOL, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = [f"line {i}: a few words about {i % 17}" if i % 23 else "" for i in range(400)]
# DDP/FSDP average the gradients of the ranks' halves: equal to the full-batch gradient up to the
# float32 rounding of a different summation order
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tiny = make_tiny_model(d / "tiny")
    src = d / "corpus.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ref = d / "ref.npy"
    encode_file(src, ref, model=tiny, chunk_size=64, progress=False)
    return tiny, src, ref


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _torchrun(*args, timeout=300, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env(**env))


# ---------------------------------------------------------------------------- torchrun encoding
def test_torchrun_two_gloo_ranks_equal_one_process(setup, tmp_path):
    tiny, src, ref = setup
    out = tmp_path / "emb.npy"
    proc = _torchrun("-m", "bertfast", "encode", "--input", src, "--output", out, "--model", tiny,
                     "--chunk-size", 64, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{out}: 400 rows x 32" in proc.stdout and proc.stdout.count("rows x 32") == 1  # rank 0 reports
    # the same chunks, encoded by two processes: the same bytes, in input order
    np.testing.assert_array_equal(np.load(out), np.load(ref))
    m = read_manifest(manifest_path(out))
    assert m["complete"] and m["rows"] == 400 and not (tmp_path / "emb.npy.parts").exists()


# ---------------------------------------------------------------------------- DDP / FSDP gradients
TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from bertfast import BertConfig, BertForSequenceClassification

    out, cases = sys.argv[1], [c.split(":") for c in sys.argv[2:]]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (8, 12), generator=g)                  # the global batch (8, 12)
    mask = torch.ones_like(ids)
    for i, n in enumerate([12, 5, 9, 3, 12, 7, 2, 10]):                # right padding in every half
        mask[i, n:] = 0
    labels = torch.randint(0, 3, (8,), generator=g)
    results = {}
    for backend, mode in cases:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=3)
        model = BertForSequenceClassification(cfg).set_backend(backend)   # unpad=True: padding-free
        names = [n for n, _ in model.named_parameters()]
        rows, net = slice(rank * 8 // world, (rank + 1) * 8 // world), model
        if mode == "single":                  # every rank: the whole global batch, no communication
            rows = slice(0, 8)
        elif mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(model)
        else:                                 # FSDP2: parameters sharded over the ranks
            from torch.distributed.fsdp import fully_shard
            for layer in model.bert.encoder.layer:
                fully_shard(layer)
            net = fully_shard(model)
        loss = net(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss  # mean over rows
        loss.backward()                       # DDP / FSDP average over ranks: the gradient of the global mean
        grads = {}
        for n, p in zip(names, model.parameters()):
            gr = p.grad
            if gr is not None and hasattr(gr, "full_tensor"):
                gr = gr.full_tensor()         # FSDP2: a sharded DTensor
            grads[n] = None if gr is None else gr.detach().clone()
        results[backend + ":" + mode] = grads
        results["packed " + backend + ":" + mode] = model.bert.packing_for(mask[rows]) is not None
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
""")
CASES = ["torch:single", "torch:ddp", "torch:fsdp", "triton:single", "triton:ddp"]


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """One torchrun launch (2 gloo ranks) runs every case; Triton kernels under the interpreter."""
    from conftest import interpreter_problem

    if interpreter_problem():  # e.g. triton 3.6 with numpy >= 2.4, as on the GPU machine
        pytest.skip(f"the run forces TRITON_INTERPRET=1, and {interpreter_problem()}")
    d = tmp_path_factory.mktemp("ddp")
    script = d / "train_step.py"
    script.write_text(TRAIN_SCRIPT)
    out = d / "grads.pt"
    proc = _torchrun(script, out, *CASES, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("backend, mode", [("torch", "ddp"), ("torch", "fsdp"), ("triton", "ddp")])
def test_two_gloo_ranks_give_single_process_gradients(gradients, backend, mode):
    single, dist = gradients[f"{backend}:single"], gradients[f"{backend}:{mode}"]
    assert gradients[f"packed {backend}:{mode}"] and gradients[f"packed {backend}:single"]  # padding-free ran
    assert single.keys() == dist.keys()
    for name, g in single.items():
        assert g is not None and dist[name] is not None, name
        torch.testing.assert_close(dist[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")
    nonzero = [n for n, g in single.items() if g.abs().max() > 0]
    assert len(nonzero) >= len(single) - 1, set(single) - set(nonzero)  # a test that could not fail otherwise
    # the two backends agree too (Triton custom ops vs the torch path)
    if backend == "triton":
        for name, g in gradients["torch:single"].items():
            torch.testing.assert_close(single[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- Ray Data
@pytest.mark.slow
def test_ray_two_cpu_workers_equal_one_process(setup, tmp_path):
    saved_env = dict(os.environ)  # before importing ray, which sets RAY_* variables in the driver
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        os.environ.clear()
        os.environ.update(saved_env)
        pytest.skip("ray is not installed (pip install 'bertfast[ray]'); the Ray Data path is untested here")
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow")
    from bertfast.distributed import encode_dataset, encode_file_ray
    from bertfast.sentence import SentenceEncoder

    tiny, src, ref = setup
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}})
        # the CLI path: chunks -> Ray read tasks -> 2 encoder actors -> the driver writes chunks + output
        out = tmp_path / "emb.npy"
        m = encode_file_ray(src, out, model=tiny, num_workers=2, chunk_size=64, progress=False)
        assert m["complete"] and m["rows"] == 400
        np.testing.assert_allclose(np.load(out), np.load(ref), atol=BATCH_ATOL, rtol=0)
        # a user's dataset, written as parquet shards
        ds = ray.data.from_items([{"text": t, "n": i} for i, t in enumerate(LINES[:100])])
        encode_dataset(ds, model=tiny, column="text", num_workers=2, output=str(tmp_path / "shards"))
        ray.shutdown()
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / "shards").sort_by("n")
        assert table.column("n").to_pylist() == list(range(100))
        got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(100, 32)
        want = SentenceEncoder(tiny, device="cpu").encode(LINES[:100], convert_to_numpy=True)
        np.testing.assert_allclose(got, want, atol=BATCH_ATOL, rtol=0)
    finally:
        ray.shutdown()
        for k in set(os.environ) - set(saved_env):  # ray sets RAY_* variables in the driver
            del os.environ[k]
        os.environ.update(saved_env)


def test_unreachable_ray_cluster_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """RAY_ADDRESS=auto with no cluster running: ``bertfast encode --ray`` says so in one line
    (Ray's ``ray.init`` raises ConnectionError, which once escaped as a 12-frame traceback).  A
    stand-in ``ray`` module whose init fails as Ray's does: this runs whether Ray is installed
    or not, and no cluster is started."""
    import types

    from bertfast.cli import main

    calls = []

    def init(*a, **k):
        calls.append(1)
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.\nmore lines")

    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = init
    fake.data = types.ModuleType("ray.data")
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    tiny, src, _ = setup
    out = tmp_path / "emb.npy"
    rc = main(["encode", "--input", str(src), "--output", str(out), "--model", str(tiny), "--ray"])
    err = capsys.readouterr().err
    assert rc == 1 and calls == [1] and err.count("\n") == 1, err
    assert err.startswith("bertfast: error: Ray: cannot connect to RAY_ADDRESS=auto (ConnectionError: Could not "
                          "find any running Ray instance.")
    assert not out.exists() and not (tmp_path / "emb.npy.parts").exists()


def test_default_ray_workers_leave_a_cpu_for_reading(monkeypatch):
    """The default number of encoder actors leaves a CPU of the cluster to the tasks that read
    the user's dataset: on a 2-CPU cluster, 2 actors held both CPUs and read_parquet never ran
    (encode_dataset hung).  ``bertfast encode --ray`` reads with tasks that take no CPU slot
    (free_cpus=0): 2 actors there."""
    import types

    from bertfast.distributed import _ray_workers

    def fake(resources):
        return types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: resources)

    assert _ray_workers(fake({"CPU": 2.0}), None, None, None) == (1, 0, 1)
    assert _ray_workers(fake({"CPU": 8.0}), None, None, None) == (2, 0, 1)
    assert _ray_workers(fake({"CPU": 2.0}), None, None, None, free_cpus=0) == (2, 0, 1)
    assert _ray_workers(fake({"CPU": 16.0, "GPU": 4.0}), None, None, None) == (4, 1, 1)
    assert _ray_workers(fake({"CPU": 2.0, "GPU": 2.0}), None, None, None) == (1, 1, 1)
    assert _ray_workers(fake({"CPU": 2.0}), 2, None, None) == (2, 0, 1)  # asked for: as given


@pytest.mark.slow
def test_readme_ray_api_on_a_two_cpu_cluster_finishes(setup, tmp_path):
    """README's ``encode_dataset(ray.data.read_parquet(...), model=..., column=..., output=...)``
    with its defaults on a 2-CPU Ray cluster: finishes, with the single-process vectors."""
    saved_env = dict(os.environ)
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        os.environ.clear()
        os.environ.update(saved_env)
        pytest.skip("ray is not installed (pip install 'bertfast[ray]')")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from bertfast.distributed import encode_dataset
    from bertfast.sentence import SentenceEncoder

    tiny, _, _ = setup
    texts = LINES[:120]
    pq.write_table(pa.table({"text": texts, "n": list(range(120))}), tmp_path / "in.parquet")
    code = textwrap.dedent(f"""
        import ray
        from bertfast.distributed import encode_dataset
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={{"env_vars": {{"OMP_NUM_THREADS": "1"}}}})
        ds = ray.data.read_parquet({str(tmp_path / "in.parquet")!r})
        encode_dataset(ds, model={str(tiny)!r}, column="text", output={str(tmp_path / "shards")!r})
        ray.shutdown()
    """)
    try:  # in a child process with a time limit: the failure this guards against is a hang
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env=_env(), cwd=ROOT)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "shards").sort_by("n")
    got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(120, 32)
    want = SentenceEncoder(tiny, device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=BATCH_ATOL, rtol=0)
