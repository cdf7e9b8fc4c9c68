"""Hugging Face Llama / Qwen3 checkpoints (config.json + safetensors, single or sharded) into a Decoder.

Loading is tensor by tensor: the model is built first (on the meta device by `load_decoder`, so no
random init and no second copy), then every shard is opened with `safe_open` in turn and each tensor
is read, copied into its parameter (cast to the parameter's dtype and device) and dropped before the
next is read. Host memory thus holds the model plus one checkpoint tensor, never two copies.

All names and shapes are checked against the headers of every shard before anything is read, so a bad
folder fails in one error naming the file and tensor, never with a half-loaded model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dist_finetune.decoder import Decoder, DecoderConfig
from dist_finetune.weights import WeightsError
from dist_finetune.zero3 import full_shape, partitioned_build, writable

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_TOP_LEVEL = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
              "lm_head.weight": "lm_head.weight"}
_IN_LAYER = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
             "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
             "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
             "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}
_OURS_IN_BLOCK = {ours: hf for hf, ours in _IN_LAYER.items()}
_BLOCK_PARAM = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
# Non-weights some older exports carry; transformers ignores them too.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class DecoderWeightsError(WeightsError):
    """A Llama / Qwen3 checkpoint folder that cannot be loaded; the message names the file and tensor."""


def hf_name(ours: str) -> str:
    """The Hugging Face tensor name of one of our Decoder's parameters (blocks.0.attn.q_proj.weight ->
    model.layers.0.self_attn.q_proj.weight)."""
    for hf, name in _TOP_LEVEL.items():
        if name == ours:
            return hf
    m = _BLOCK_PARAM.match(ours)
    if m is None or m[2] not in _OURS_IN_BLOCK:
        raise KeyError(f"{ours!r} is not a Decoder parameter")
    return f"model.layers.{m[1]}.{_OURS_IN_BLOCK[m[2]]}.{m[3]}"


def read_config(folder: str | Path) -> DecoderConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise DecoderWeightsError(f"{path}: not found; a Hugging Face checkpoint folder has a config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(hf, dict):
            raise ValueError(f"expected a JSON object, found {type(hf).__name__}")
        return DecoderConfig.from_hf(hf)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DecoderWeightsError(f"{path}: {e}") from None


def shard_files(folder: str | Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists (sorted, each once)."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        index_path = folder / INDEX_FILE
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise DecoderWeightsError(f"{index_path}: not a safetensors index with a weight_map ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DecoderWeightsError(f"{index_path}: weight_map must map tensor names to shard file names")
        outside = sorted(name for name in set(weight_map.values()) if not _plain_file_name(name))
        if outside:
            raise DecoderWeightsError(f"{index_path}: shard {outside[0]!r} is not a file name in {folder} (the shards "
                                      "lie beside the index; no folders, no '..'): fix the weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise DecoderWeightsError(f"{path}: listed in {index_path} but not found")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise DecoderWeightsError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                              "checkpoints are read for Llama / Qwen3; convert pytorch_model.bin first)")


def _plain_file_name(name: str) -> bool:
    """A name of a file directly in the folder: no separator, no '..', not absolute (an index from a downloaded
    checkpoint is untrusted: it must not point the loader at files elsewhere)."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and ":" not in name


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor's (file, shape), from the safetensors headers alone (no tensor data is read)."""
    headers: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in headers:
                        raise DecoderWeightsError(f"{path}: tensor {name!r} is also in {headers[name][0]}")
                    headers[name] = (path, tuple(f.get_slice(name).get_shape()))
        except (OSError, SafetensorError) as e:
            raise DecoderWeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return headers


def expected_tensors(model: Decoder) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (our parameter name, shape) for everything the model needs from the checkpoint."""
    return {hf_name(name): (name, full_shape(p)) for name, p in model.named_parameters()}


def check_tensors(folder: Path, headers: dict[str, tuple[Path, tuple[int, ...]]],
                  expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """One error naming the missing, unexpected and wrongly shaped tensors (the first five, and a count)."""
    problems = []
    for name, (path, shape) in headers.items():
        if name in expected and shape != expected[name][1]:
            problems.append(f"{path}: tensor {name!r} has shape {shape}, config.json implies {expected[name][1]}")
        elif name not in expected and not _ignorable(name):
            problems.append(f"{path}: unexpected tensor {name!r} (no such weight in the architecture config.json "
                            "describes)")
    missing = [name for name in expected if name not in headers]
    where = f"{folder / SINGLE_FILE}" if not (folder / INDEX_FILE).is_file() else f"the shards of {folder / INDEX_FILE}"
    problems += [f"{where}: missing tensor {name!r}" for name in missing]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DecoderWeightsError("; ".join(problems[:5]) + more)


def _ignorable(name: str) -> bool:
    # lm_head.weight with tied embeddings (or a model built without the head): transformers ties it too.
    return name == "lm_head.weight" or bool(_IGNORED.search(name))


@torch.no_grad()
def load_into(model: Decoder, folder: str | Path, also: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Copies the checkpoint in `folder` into `model`'s parameters, one tensor at a time. Parameters partitioned
    by ZeRO-3 (zero3.py) are gathered one at a time, and only rank 0 reads the tensor: every rank must call.
    `also`: tensors outside the backbone the checkpoint may hold (a sequence classifier's score.weight), returned
    (on every rank) rather than refused."""
    folder = Path(folder)
    files = shard_files(folder)
    expected = expected_tensors(model)
    headers = read_headers(files)
    check_tensors(folder, {k: v for k, v in headers.items() if k not in also}, expected)
    params = dict(model.named_parameters())
    extra = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in also:
                    extra[name] = f.get_tensor(name)
                elif name in expected:
                    param = params[expected[name][0]]
                    with writable(param) as writes:
                        if writes:
                            param.copy_(f.get_tensor(name))  # the read tensor dies here
    return extra


def unloaded_decoder(config: DecoderConfig, lm_head: bool = True, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", ds_config: dict[str, Any] | None = None) -> Decoder:
    """A Decoder whose every weight is about to be loaded (`load_into`, or a run's checkpoint, whose loads are
    strict), so a random init would be wasted time: built on the meta device and materialised as NaN. With a
    ZeRO-3 `ds_config` it is built partitioned across the ranks instead (zero3.py; every rank calls, `dtype` and
    `device` are the run's); its layers' own init then draws from a forked RNG, so that the global one (the
    classifier head's init, the data order) is the same as without ZeRO-3."""
    if ds_config is not None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), partitioned_build(ds_config):
            return Decoder(config, lm_head=lm_head)
    with torch.device("meta"):
        model = Decoder(config, lm_head=lm_head)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # a weight never loaded is loud (non-finite), never silently random
    return model


def load_decoder(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 lm_head: bool = True) -> Decoder:
    """A Decoder built from `folder`'s config.json and loaded from its safetensors."""
    model = unloaded_decoder(read_config(folder), lm_head, dtype, device)
    load_into(model, folder)
    return model
