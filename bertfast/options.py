"""How a model runs (not what it computes): one ``RuntimeOptions`` object per encoder.

It is kept on the encoder's root module (bertfast's ``BertModel``, or the transformers
``BertModel`` inside a model given to ``bertfast.optimize``) as ``module.__dict__[ATTR]``, and
read only through ``options_of(module)``.  bertfast's heads share their encoder's object.

* ``backend``: ``"auto"`` / ``"torch"`` / ``"triton"`` (bertfast/backend.py decides what each
  means on a device).
* ``unpad``: padding-free execution: ``True`` (where exact, the default), ``"always"`` (masked
  semantics, opt-in) or ``False`` (see bertfast/modeling.py).
* ``graphs``: CUDA-graph replay for inference on CUDA (bertfast/cuda_graphs.py); ``False`` turns
  it off.

None of these is saved with a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

ATTR = "_bertfast_runtime"


@dataclass
class RuntimeOptions:
    backend: str = "auto"
    unpad: Union[bool, str] = True
    graphs: bool = True

    def __post_init__(self):
        self.update(backend=self.backend, unpad=self.unpad, graphs=self.graphs)

    def update(self, *, backend=None, unpad=None, graphs=None) -> "RuntimeOptions":
        """Set the given fields (None: unchanged), each checked by value first."""
        from bertfast.backend import check_backend
        from bertfast.config import unpad_mode

        if backend is not None:
            check_backend(backend)
        if unpad is not None:
            unpad = {"off": False, "exact": True, "always": "always"}[unpad_mode(unpad)]
        if graphs is not None and not isinstance(graphs, bool):
            raise ValueError(f"graphs must be True or False, got {graphs!r}")
        for name, value in (("backend", backend), ("unpad", unpad), ("graphs", graphs)):
            if value is not None:
                object.__setattr__(self, name, value)
        return self


def options_of(module) -> RuntimeOptions:
    """The RuntimeOptions of an encoder root module (KeyError-free: a module without one, e.g. a
    transformers model not given to ``optimize``, gets the defaults, not stored)."""
    opts = module.__dict__.get(ATTR)
    return opts if opts is not None else RuntimeOptions()


def attach(module, opts: RuntimeOptions) -> RuntimeOptions:
    module.__dict__[ATTR] = opts
    return opts
