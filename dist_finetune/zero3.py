"""Parameters partitioned across the ranks by ZeRO-3, before and after deepspeed.initialize.

A Llama / Qwen3 run under zero.stage=3 builds its backbone inside `deepspeed.zero.Init`: each layer is split
across the ranks as soon as it is built, so no rank ever holds the whole model, only its 1/world_size share and
one whole layer while that layer is made. Loading the checkpoint then goes one parameter at a time through
`writable`: every rank gathers it (a collective), rank 0 copies the checkpoint tensor in, and on exit DeepSpeed
broadcasts rank 0's values and splits them again.

Everything here is a no-op for ordinary (unpartitioned) parameters, so callers need not know which they hold.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """A parameter's element count, also while ZeRO-3 holds only this rank's share of it."""
    return getattr(param, "ds_numel", param.numel())


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def partitioned_build(ds_config: dict[str, Any]):
    """The context to build modules in so that their parameters are partitioned as they are made (every rank
    enters it: building is then collective). The dtype is the run's (bf16 under precision=bf16)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # The process group exists already (distributed.py); DeepSpeed adopts it, as deepspeed.initialize does.
    deepspeed.comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                    dist_init_required=False, verbose=False)
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


@contextmanager
def writable(param: nn.Parameter) -> Iterator[bool]:
    """`param` whole for a write; yields whether this rank writes. Partitioned: every rank must enter (a
    collective, in the same order on every rank), rank 0 writes, and its values reach every rank on exit."""
    if not is_partitioned(param):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        yield torch.distributed.get_rank() == 0


def match_partitioned_dtype(model: nn.Module) -> None:
    """Before deepspeed.initialize: DeepSpeed leaves a model built partitioned as it is (its parameters are in the
    run's dtype already), so the ones made whole afterwards (the head, LoRA adapters) are cast to that dtype too,
    as it would cast all of a model built whole."""
    dtypes = {p.dtype for p in model.parameters() if is_partitioned(p)}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for p in model.parameters():
        if not is_partitioned(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
