"""Encoding on more than one process, on existing engines: torchrun (torch.distributed) and
Ray Data.  No scheduler of bertfast's own: the unit of work is a chunk of input rows
(bertfast.corpus), and each engine hands chunks or batches to workers that each load one model.

**torchrun** (one machine with many GPUs, or many machines)::

    torchrun --nproc-per-node 8 -m bertfast encode --input corpus.txt --output corpus.npy

Each rank encodes a contiguous range of chunks (so the merged output keeps the input order),
on ``cuda:LOCAL_RANK`` when there are GPUs (NCCL) or on the CPU (gloo); rank 0 prepares the
run, and after a barrier assembles the output and writes the manifest.  The chunk files must be
on a file system every rank sees (one machine; or a shared file system across machines).

**Ray Data** (``pip install 'bertfast[ray]'``)::

    import ray, bertfast.distributed as bd
    ds = ray.data.read_parquet("s3://bucket/passages/")
    ds = bd.encode_dataset(ds, model="minilm", column="text", output="s3://bucket/embeddings/")

maps batches through an actor pool (one model per actor: one actor per GPU where the cluster
has GPUs, CPU actors otherwise) and writes parquet shards.  ``bertfast encode --ray`` runs the
chunks of a corpus file through :func:`encode_dataset` and writes the usual output + manifest
from the driver, so a Ray run resumes like any other.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Dict, Optional

import numpy as np

from bertfast.corpus import EMBEDDING_COLUMN, OUTPUT_DTYPES, EncodeJob, output_lock

__all__ = ["encode_dataset", "encode_file_ray", "encode_file_torchrun", "DIST_TIMEOUT"]

# how long a rank waits at a barrier for the others (encoding a large shard takes hours)
DIST_TIMEOUT = timedelta(hours=24)
# Ray: input rows per map_batches call of the encoder actors
RAY_BATCH_ROWS = 512


class RankError(ValueError):
    """A rank other than 0 stops because rank 0 reported an error (printed there)."""


def _job_kwargs(common: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("model", "field", "input_format", "dtype", "max_length", "normalize", "output_dtype", "skip_empty",
            "chunk_size")
    return {k: common[k] for k in keys if k in common}


def _encoder_kwargs(common: Dict[str, Any]) -> Dict[str, Any]:
    return {k: common.get(k) for k in ("dtype", "max_length", "backend")}


# ---------------------------------------------------------------------------- torchrun
def _torchrun_env() -> tuple:
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ValueError("WORLD_SIZE is set but RANK is not: start the processes with torchrun "
                         "(torchrun --nproc-per-node N -m bertfast encode ...)") from None


def encode_file_torchrun(input, output, *, model="minilm", device=None, batch_size: int = 32,
                         progress: Optional[bool] = None, resume: Optional[bool] = None, overwrite: bool = False,
                         _kill_after_chunks: Optional[int] = None, **common) -> Optional[dict]:
    """One rank's part of ``torchrun ... -m bertfast encode --input --output``.  Returns the
    complete manifest on rank 0, None on the other ranks.  Initialises the default process group
    from torchrun's environment when it is not yet (gloo on CPU, NCCL on CUDA) and destroys it
    at the end; ``device=None`` / ``"cuda"`` means ``cuda:LOCAL_RANK`` when there are GPUs."""
    import torch
    import torch.distributed as dist

    from bertfast.sentence import SentenceEncoder, parse_device

    rank, world, local = _torchrun_env()
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif str(device) == "cuda":
        device = f"cuda:{local}"
    dev = parse_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    lock = contextlib.ExitStack()  # rank 0 holds the output's lock from prepare to finalize
    try:
        job = EncodeJob(input, output, world_size=world, **_job_kwargs(dict(common, model=model)))
        # rank 0 checks the output / an earlier run and writes the parts manifest; the others wait for it
        # (and the chunks still to do, listed before any rank writes one)
        message: list = [None]
        if rank == 0:
            try:
                lock.enter_context(output_lock(job.output))
                prepared = job.prepare(resume=resume, overwrite=overwrite)
                todo = [] if prepared.get("complete") else job.chunks_left()
                message = [("ok", prepared, todo)]
            except (ValueError, OSError) as e:
                message = [("error", f"{type(e).__name__}: {e}", None)]
                dist.broadcast_object_list(message, src=0)
                raise
        dist.broadcast_object_list(message, src=0)
        status, payload, todo = message[0]
        if status == "error":
            raise RankError(f"rank {rank}: rank 0 stopped ({payload})")
        job.attach(payload)
        if not payload.get("complete"):
            encoder = SentenceEncoder(model, device=dev, **_encoder_kwargs(common))
            job.encode_chunks(encoder, job.rank_chunks(rank, world, todo), batch_size=batch_size,
                              progress=progress if rank == 0 else False,
                              desc=f"rank 0/{world} encoding {job.reader.path.name}", kill_after=_kill_after_chunks)
        dist.barrier()  # every rank's chunk files are written
        manifest = None
        if rank == 0:
            manifest = payload if payload.get("complete") else job.finalize()
        dist.barrier()  # the others wait until the output is complete
        return manifest
    finally:
        lock.close()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- Ray Data
def _need_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'bertfast[ray]'") from None
    return ray


class _RayEncoder:
    """The actor class of :func:`encode_dataset`: one SentenceEncoder per actor, on the actor's
    GPU (Ray sets CUDA_VISIBLE_DEVICES, so it is ``cuda``) or on the CPU with ``threads`` threads."""

    def __init__(self, model, column, output_column, dtype, max_length, backend, normalize, output_dtype,
                 batch_size, threads):
        import torch

        from bertfast.sentence import SentenceEncoder

        if not torch.cuda.is_available() and threads:
            torch.set_num_threads(int(threads))
        self.encoder = SentenceEncoder(model, device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype,
                                       max_length=max_length, backend=backend)
        self.column, self.output_column = column, output_column
        self.normalize, self.output_dtype, self.batch_size = normalize, np.dtype(output_dtype), batch_size

    def __call__(self, batch):  # a pyarrow.Table -> the same with the embedding column added
        import pyarrow as pa

        if self.column not in batch.column_names:
            raise ValueError(f"encode_dataset: no column {self.column!r} (columns: {', '.join(batch.column_names)})")
        texts = ["" if t is None else t for t in batch.column(self.column).to_pylist()]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"encode_dataset: column {self.column!r} holds a {type(t).__name__}, not text")
        dim = self.encoder.embedding_dim
        if texts:
            emb = self.encoder.encode(texts, batch_size=self.batch_size, normalize=self.normalize,
                                      show_progress=False, convert_to_numpy=True)  # (n, D) float32
        else:
            emb = np.zeros((0, dim), dtype=np.float32)
        flat = pa.array(np.ascontiguousarray(emb, dtype=self.output_dtype).reshape(-1))
        return batch.append_column(self.output_column, pa.FixedSizeListArray.from_arrays(flat, dim))


def _ray_init(ray) -> None:
    """Connect to the Ray cluster (RAY_ADDRESS, a running one, else a new local one) unless this
    process already is; a cluster that cannot be reached or started is a one-line ValueError
    naming RAY_ADDRESS, not Ray's traceback."""
    if ray.is_initialized():
        return
    try:
        ray.init()
    except Exception as e:  # ConnectionError (no cluster at RAY_ADDRESS), RuntimeError, ...
        address = os.environ.get("RAY_ADDRESS")
        where = f"RAY_ADDRESS={address}" if address else "a new local Ray cluster"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"Ray: cannot connect to {where} ({type(e).__name__}: {first}); start one with "
                         f"`ray start --head`, or unset RAY_ADDRESS to start a local one") from None


def _ray_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker, free_cpus: int = 1) -> tuple:
    """(workers, gpus per worker, cpus per worker): one per GPU when the cluster has GPUs, else
    CPU workers (default 2, each with num_cpus_per_worker threads).  The default leaves
    ``free_cpus`` of the cluster's CPUs to the dataset's own tasks (reading a parquet file needs a
    CPU slot: with every CPU held by an encoder actor, it would wait forever, and so would the
    actors), down to one worker."""
    _ray_init(ray)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if gpus else 0
    if num_cpus_per_worker is None:
        num_cpus_per_worker = 1
    if num_workers is None:
        num_workers = max(1, int(gpus // num_gpus_per_worker)) if num_gpus_per_worker else 2
        if num_cpus_per_worker and cpus:
            num_workers = max(1, min(num_workers, int((cpus - free_cpus) // num_cpus_per_worker)))
    return int(num_workers), num_gpus_per_worker, num_cpus_per_worker


def encode_dataset(ds, *, model="minilm", column: str = "text", output_column: str = EMBEDDING_COLUMN,
                   output: Optional[str] = None, batch_size: int = 32, rows_per_batch: int = RAY_BATCH_ROWS,
                   normalize: bool = True, dtype=None, max_length: Optional[int] = None, backend: Optional[str] = None,
                   output_dtype: str = "float32", num_workers: Optional[int] = None,
                   num_gpus_per_worker: Optional[float] = None, num_cpus_per_worker: Optional[float] = None,
                   free_cpus: int = 1):
    """Add ``output_column`` (a fixed-size list of ``output_dtype``, the embedding of
    ``column``) to a Ray dataset, through an actor pool of ``num_workers`` actors, each holding
    one model (default: one actor per GPU of the cluster, else 2 CPU actors; either way no more
    than leave ``free_cpus`` CPUs of the cluster to the tasks that read ``ds``: on a 2-CPU cluster,
    one actor, since two would hold both CPUs and the read tasks would never run).  Blank and null
    texts get the embedding of ``[CLS] [SEP]``, as in bertfast.corpus.  Returns the (lazy)
    dataset; with ``output`` (a directory or URI), also writes it there as parquet shards."""
    ray = _need_ray()
    import ray.data

    if not isinstance(ds, ray.data.Dataset):
        raise TypeError(f"encode_dataset: expected a ray.data.Dataset, got {type(ds).__name__}")
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown output dtype {output_dtype!r} (choose from {', '.join(OUTPUT_DTYPES)})")
    from bertfast.loading import resolve_model_path

    model_path = str(resolve_model_path(model))  # fail here, not in every actor; actors get a path
    workers, gpus, cpus = _ray_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker, free_cpus)
    out = ds.map_batches(
        _RayEncoder,
        fn_constructor_kwargs=dict(model=model_path, column=column, output_column=output_column, dtype=dtype,
                                   max_length=max_length, backend=backend, normalize=normalize,
                                   output_dtype=output_dtype, batch_size=batch_size, threads=cpus),
        batch_size=rows_per_batch, batch_format="pyarrow", concurrency=workers, num_gpus=gpus, num_cpus=cpus,
    )
    if output is not None:
        out.write_parquet(output)
    return out


def _read_chunk_rows(batch, job: EncodeJob):
    """Ray map_batches: chunk numbers -> their rows (id, text), blank rows dropped with skip_empty."""
    import pyarrow as pa

    ids, texts = [], []
    for j in batch.column("chunk").to_pylist():
        i, t = job.chunk_texts(j)
        ids.append(i)
        texts.extend(t)
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})


def encode_file_ray(input, output, *, model="minilm", num_workers: Optional[int] = None, device=None,
                    batch_size: int = 32, progress: Optional[bool] = None, resume: Optional[bool] = None,
                    overwrite: bool = False, **common) -> dict:
    """``bertfast encode --input --output --ray``: the chunks still to do become a Ray dataset,
    read by Ray tasks and encoded by :func:`encode_dataset`'s actors; the driver writes each
    chunk file as its rows come back (in order) and assembles the output as bertfast.corpus
    does.  Returns the complete manifest.  ``device`` is not used: Ray places the workers."""
    ray = _need_ray()
    import ray.data  # noqa: F401

    job = EncodeJob(input, output, **_job_kwargs(dict(common, model=model)))
    _ray_init(ray)  # before any dataset: Ray Data would start one itself, with a traceback on failure
    with output_lock(job.output):
        return _encode_file_ray(job, ray, model=model, num_workers=num_workers, batch_size=batch_size,
                                progress=progress, resume=resume, overwrite=overwrite, **common)


def _encode_file_ray(job: EncodeJob, ray, *, model, num_workers, batch_size, progress, resume, overwrite,
                     **common) -> dict:
    from bertfast.progress import Progress

    manifest = job.prepare(resume=resume, overwrite=overwrite)
    if manifest.get("complete"):
        return manifest
    from bertfast.loading import load_config

    manifest["embedding_dim"] = int(load_config(model).hidden_size)
    todo = job.chunks_left()  # the parts directory listed once
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows come back in chunk order
    total = manifest["input_rows"]
    bar = Progress(total, f"ray encoding {job.reader.path.name}", unit="rows", done=total - job.chunk_rows(todo),
                   show=progress)
    try:
        chunks = ray.data.from_items([{"chunk": j} for j in todo])
        rows = chunks.map_batches(_read_chunk_rows, fn_kwargs={"job": job}, batch_size=1, batch_format="pyarrow",
                                  num_cpus=0)  # no CPU slot: the actors may hold them all
        encoded = encode_dataset(rows, model=model, column="text", batch_size=batch_size,
                                 normalize=manifest["normalize"], dtype=common.get("dtype"),
                                 max_length=common.get("max_length"), backend=common.get("backend"),
                                 output_dtype=manifest["output"]["dtype"], num_workers=num_workers,
                                 free_cpus=0)  # the chunks are read by tasks that take no CPU slot
        pending = iter(todo)
        current, buf_ids, buf_emb = None, [], []

        def flush_until(j_stop):  # write every chunk before j_stop (blank-only chunks are empty)
            nonlocal current, buf_ids, buf_emb
            while current is not None and current < j_stop:
                ids = np.concatenate(buf_ids) if buf_ids else np.zeros(0, np.int64)
                emb = (np.concatenate(buf_emb) if buf_emb
                       else np.zeros((0, manifest["embedding_dim"]), np.float32))
                lo, hi = job.chunk_range(current)
                if not manifest["skip_empty"] and len(ids) != hi - lo:
                    raise ValueError(f"Ray returned {len(ids)} rows for chunk {current} ({hi - lo} expected)")
                job.write_chunk(current, ids, emb)
                job.record_progress()
                bar.update(hi - lo)
                buf_ids, buf_emb = [], []
                current = next(pending, None)

        current = next(pending, None)
        dim, cs = manifest["embedding_dim"], manifest["chunk_size"]
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = batch.column("id").to_numpy()
            emb = batch.column(EMBEDDING_COLUMN).combine_chunks().flatten().to_numpy().reshape(len(ids), dim)
            of_chunk = ids // cs
            for j in np.unique(of_chunk):  # a batch may span chunks
                sel = of_chunk == j
                flush_until(int(j))
                buf_ids.append(ids[sel])
                buf_emb.append(emb[sel])
        flush_until(manifest["n_chunks"])
    finally:
        bar.close()
        ctx.execution_options.preserve_order = saved_order
    return job.finalize()
