"""Host memory per rank of building, loading and starting a Llama / Qwen3 classifier, with and without ZeRO-3's
partitioned build (zero3.py).

    python benchmarks/zero3_memory.py [--preset smollm2-360m] [--nproc 2] [--shard-mb 1000] [--only MODE ...]
                                      [--override KEY=VALUE ...] [--json PATH]

A random checkpoint of the preset's architecture (bf16 safetensors, in shards of --shard-mb) is written to a
temporary folder. Each mode then runs under torchrun with --nproc ranks, bf16, model.trainable=lora, and does
what training does before its first step: build_model, load_pretrained (shard by shard), set_trainable,
build_engine (deepspeed.initialize), then one optimizer step on a batch of 16 tokens.

    zero2              ZeRO-2: every rank holds the whole model, by design.
    zero3_whole        ZeRO-3, the backbone built whole on each rank and partitioned by deepspeed.initialize
                       (how a decoder was built before zero3.py).
    zero3_partitioned  ZeRO-3, the backbone partitioned as it is built (deepspeed.zero.Init), loaded one
                       gathered parameter at a time.

Per rank and phase (build, load, engine start, step; end: after the step, once malloc_trim has returned what
malloc kept of freed tensors): the peak anonymous resident set (RssAnon, sampled every
5 ms: the tensors a rank holds) and the peak resident set (VmHWM, reset before each phase through
/proc/self/clear_refs). Rank 0 reads the checkpoint, whose pages stay mapped while a shard is open: its resident
peak of the load includes up to one shard of page cache, its anonymous peak does not.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = ("zero2", "zero3_whole", "zero3_partitioned")
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            rms_norm_eps=1e-5, rope_theta=10000.0)  # --preset tiny: the script end to end in seconds (tests)
REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(folder: Path, preset: str, shard_mb: int) -> int:
    """A random bf16 checkpoint of `preset`'s architecture; returns its parameter count."""
    from safetensors.torch import save_file

    from dist_finetune.config import DECODER_PRESETS
    from dist_finetune.decoder import Decoder, DecoderConfig
    from dist_finetune.decoder_weights import INDEX_FILE, hf_name

    hf = TINY if preset == "tiny" else DECODER_PRESETS[preset]
    with torch.device("meta"):
        shapes = {hf_name(n): tuple(p.shape) for n, p in Decoder(DecoderConfig.from_hf(hf)).named_parameters()}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf))
    generator, weight_map, shard, size, index = torch.Generator().manual_seed(0), {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard and size + tensor.nbytes > shard_mb * 2**20:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(math.prod(s) for s in shapes.values())


def _status(key: str) -> int:
    """A /proc/self/status figure in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident set


class AnonPeak:
    """The largest anonymous resident set (RssAnon: tensors, not mapped checkpoint pages) seen by a thread that
    reads it every 5 ms; `take` returns it and starts again."""

    def __init__(self) -> None:
        import threading

        self.peak = _status("RssAnon")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _status("RssAnon"))

    def take(self) -> int:
        peak, self.peak = max(self.peak, _status("RssAnon")), _status("RssAnon")
        return peak


def worker(folder: str, mode: str, overrides: list[str]) -> None:
    from dist_finetune.config import from_dict, replace
    from dist_finetune.distributed import DistEnv, init_distributed, shutdown
    from dist_finetune.engine import build_engine, deepspeed_config, plan_batches, skip_shm_comm_op
    from dist_finetune.model import build_model, set_trainable
    from dist_finetune.weights import load_pretrained

    cfg = from_dict({"model": {"name": "auto", "weights": folder, "trainable": "lora"}, "precision": "bf16",
                     "zero": {"stage": 2 if mode == "zero2" else 3}, "train": {"micro_batch_size": 1}})
    if mode != "zero2":
        cfg = replace(cfg, overrides)
    env: DistEnv = init_distributed(600)
    plan = plan_batches(cfg, env.world_size)
    skip_shm_comm_op(env)
    ds_config = deepspeed_config(cfg, plan, "bf16") if mode == "zero3_partitioned" else None
    row: dict[str, int] = {"start_rss": _status("VmRSS"), "start_anon": _status("RssAnon")}
    anon = AnonPeak()

    def phase(name: str) -> None:
        row[f"{name}_rss"], row[f"{name}_anon"] = _status("VmHWM"), anon.take()
        _reset_peak()

    _reset_peak()
    model = build_model(cfg.model, 2, ds_config=ds_config)
    phase("build")
    load_pretrained(model, folder)
    phase("load")
    set_trainable(model, "lora", cfg.lora)
    engine, _ = build_engine(model, cfg, env, plan, total_steps=1)
    phase("engine")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    loss = engine(ids).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    phase("step")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what malloc keeps of freed tensors is not the model's
    row["end_rss"], row["end_anon"] = _status("VmRSS"), _status("RssAnon")
    rows: list = [None] * env.world_size
    torch.distributed.all_gather_object(rows, row)
    if env.is_main:
        print("RESULT " + json.dumps(rows))
    shutdown()


def run_mode(folder: Path, mode: str, nproc: int, overrides: list[str]) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", mode, "--folder", str(folder),
           *(f"--override={o}" for o in overrides)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-360m", help="a model.name preset, or tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=1000)
    parser.add_argument("--only", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the ZeRO-3 modes, e.g. "
                             "deepspeed.zero_optimization.stage3_max_live_parameters=20000000")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.folder, args.worker, args.override)
        return
    with tempfile.TemporaryDirectory(prefix="zero3_memory_") as tmp:
        params = write_checkpoint(Path(tmp) / "ckpt", args.preset, args.shard_mb)
        print(f"{args.preset}: {params / 1e6:.0f}M parameters ({params * 4 / 2**20:.0f} MiB in fp32, "
              f"{params * 2 / 2**20:.0f} MiB in bf16), {args.nproc} ranks, bf16, LoRA")
        results = {}
        print("peak MiB per phase, anonymous (tensors) / resident (also mapped checkpoint pages); the start is the "
              "process after its imports")
        phases = ("start", "build", "load", "engine", "step", "end")
        print("| mode | rank | " + " | ".join(phases) + " |\n|" + "---|" * (len(phases) + 2))
        for mode in args.only:
            results[mode] = run_mode(Path(tmp) / "ckpt", mode, args.nproc, args.override)
            for rank, r in enumerate(results[mode]):
                cells = " | ".join(f"{r[p + '_anon']} / {r[p + '_rss']}" for p in phases)
                print(f"| {mode} | {rank} | {cells} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "parameters": params, "nproc": args.nproc,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
