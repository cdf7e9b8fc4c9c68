"""Build and load a Llama / Qwen3 classifier under ZeRO-3 the way training does (build_model with the run's
DeepSpeed config, load_pretrained), then report what each rank holds; run under torchrun by test_zero3_build.py.

Writes OUT/rank_N.json: whether the backbone was partitioned as it was built, how many of its elements this rank
holds, the largest difference of every gathered parameter from the checkpoint's tensor, and the head's init.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from dist_finetune.config import from_dict
from dist_finetune.decoder_weights import hf_name, shard_files
from dist_finetune.distributed import init_distributed, shutdown
from dist_finetune.engine import deepspeed_config, plan_batches, skip_shm_comm_op
from dist_finetune.model import build_model, count_parameters
from dist_finetune.weights import load_pretrained
from dist_finetune.zero3 import is_partitioned, writable


def checkpoint_tensors(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in shard_files(folder):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def main(folder: str, out: str, precision: str) -> None:
    env = init_distributed(120)
    cfg = from_dict({"model": {"name": "auto", "weights": folder}, "zero": {"stage": 3}, "precision": precision,
                     "train": {"micro_batch_size": 2}})
    ds_config = deepspeed_config(cfg, plan_batches(cfg, env.world_size), precision)
    skip_shm_comm_op(env)
    torch.manual_seed(7)
    model = build_model(cfg.model, 3, ds_config=ds_config)
    backbone = list(model.backbone.parameters())
    report = {
        "partitioned": all(is_partitioned(p) for p in backbone),
        "head_partitioned": any(is_partitioned(p) for p in model.head.parameters()),
        "local_elements": sum(p.ds_tensor.numel() for p in backbone if is_partitioned(p)),
        "dtypes": sorted({str(p.dtype) for p in backbone}),
        "counts": count_parameters(model),
    }
    load_pretrained(model, folder)
    expected, worst = checkpoint_tensors(folder), 0.0
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            with writable(param):  # gathered on every rank, in the same order
                want = expected[hf_name(name)].to(param.dtype)
                worst = max(worst, (param.float() - want.float()).abs().max().item())
    report["max_abs_diff"] = worst
    report["head"] = model.head.weight.detach().float().tolist()
    torch.manual_seed(7)
    whole = build_model(cfg.model, 3)  # no ZeRO-3: the head's init must be the same
    report["head_whole"] = whole.head.weight.detach().float().tolist()
    report["counts_whole"] = count_parameters(whole)
    Path(out, f"rank_{env.rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
