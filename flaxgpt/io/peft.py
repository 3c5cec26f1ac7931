"""LoRA adapters of a GPT-2 language model in Hugging Face PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(
base), adapter_dir)``; PEFT itself is not needed to write them.

Module mapping (flaxgpt layer -> ``GPT2LMHeadModel`` module)::

    trf_blocks_N/att/W_query, W_key, W_value -> transformer.h.N.attn.c_attn (one fused module, q | k | v)
    trf_blocks_N/att/out_proj                -> transformer.h.N.attn.c_proj
    trf_blocks_N/ff/fc1, ff/fc2              -> transformer.h.N.mlp.c_fc, mlp.c_proj
    out_head                                 -> lm_head (untied configs only; a tied head has no kernel)

GPT-2 computes q, k and v with one ``Conv1D`` of output width 3C. The k of them that are adapted (rank r each)
become one exact rank-(k r) adapter: ``A`` stacked along the rank axis, ``B`` block diagonal, each projection's
block placed at its output columns (0, C or 2C) and zeros elsewhere, so ``x A B`` is the sum of the
projections' terms at their columns. The scaling ``alpha / rank`` is folded into ``B`` and the config makes
PEFT's scaling 1 everywhere (``lora_alpha = r``, and ``rank_pattern`` = ``alpha_pattern`` = k r for each
fused module). PEFT stores ``lora_A.weight`` as (rank, in) and ``lora_B.weight`` as (out, rank), i.e. the
transposes of flaxgpt's ``A`` (in, rank) and ``B`` (rank, out); its forward adds ``lora_B(lora_A(x))`` for
``Conv1D`` and ``nn.Linear`` alike. The exported tensors are float32 (PEFT's default adapter dtype).

``fan_in_fan_out`` is one flag in PEFT's config although GPT-2 mixes ``Conv1D`` (fan-in-fan-out, the blocks)
and ``nn.Linear`` (``lm_head``). PEFT 0.21 resolves it per module (true for ``Conv1D``, false for
``nn.Linear``, with a warning when the flag disagrees), and the flag only matters for merging; the config
holds true (the blocks' convention), so PEFT warns once when ``lm_head`` is adapted. With LoRA dropout, PEFT
draws one dropout mask for the fused q|k|v input where flaxgpt draws one per projection (training only).

The safetensors metadata keeps flaxgpt's own description (``flaxgpt_lora``: rank, alpha, dropout and where
each layer's block lies), so that :func:`load_peft` splits the adapters back exactly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from flaxgpt.config import GPTConfig
from flaxgpt.files import read_json, write_json
from flaxgpt.io.safetensors_io import OutTensor, SafetensorsReader, check_finite, write_safetensors
from flaxgpt.nn.lora import LoRA, check_lora
from flaxgpt.nn.params import param_shapes
from flaxgpt.pytree import unflatten_dict

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "peft_module", "save_peft", "load_peft"]

PathLike = str | os.PathLike[str]
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModelForCausalLM's name of the wrapped model's modules
_META_KEY = "flaxgpt_lora"
_QKV = ("W_query", "W_key", "W_value")  # c_attn's output order
_BLOCK_MODULES = {"att/out_proj": "attn.c_proj", "ff/fc1": "mlp.c_fc", "ff/fc2": "mlp.c_proj"}
_LAYER = re.compile(r"^trf_blocks(?:_(\d+))?/(.+)$")


def peft_module(layer: str) -> tuple[str, int | None]:
    """The ``GPT2LMHeadModel`` module of a flaxgpt linear layer (unrolled name).

    Args:
      layer: e.g. "trf_blocks_3/att/W_key" or "out_head".

    Returns:
      (module name, slot): e.g. ("transformer.h.3.attn.c_attn", 1); the slot (0, 1, 2 for q, k, v) is None
      for modules that are not fused.

    Raises:
      ValueError: a layer with no GPT-2 counterpart.
    """
    if layer == "out_head":
        return "lm_head", None
    m = _LAYER.match(layer)
    if m and m.group(1) is not None:
        block, sub = int(m.group(1)), m.group(2)
        if sub.startswith("att/") and sub[4:] in _QKV:
            return f"transformer.h.{block}.attn.c_attn", _QKV.index(sub[4:])
        if sub in _BLOCK_MODULES:
            return f"transformer.h.{block}.{_BLOCK_MODULES[sub]}", None
    raise ValueError(f"LoRA layer {layer!r} has no GPT2LMHeadModel module (PEFT export knows {_QKV}, "
                     f"{sorted(_BLOCK_MODULES)} of each block and out_head)")


def _unrolled_layers(lora: LoRA) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"trf_blocks_N/...": (A (in, r), B (r, out))}`` as float32 numpy, from either layout."""
    out = {}
    for path, ab in lora.layers.items():
        a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
        if path.startswith("trf_blocks/"):  # scanned: (L, in, r), (L, r, out)
            sub = path[len("trf_blocks/"):]
            for i in range(a.shape[0]):
                out[f"trf_blocks_{i}/{sub}"] = (a[i], b[i])
        else:
            out[path] = (a, b)
    return out


def _fuse(cfg: GPTConfig, lora: LoRA) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list]]:
    """PEFT's per-module (lora_A (R, in), lora_B (out, R)) with the scaling folded into B, and the layout
    ``{flaxgpt layer: [module, rank start, column start, width]}``."""
    groups: dict[str, list[tuple[int, str, np.ndarray, np.ndarray]]] = {}
    for layer, (a, b) in sorted(_unrolled_layers(lora).items()):
        module, slot = peft_module(layer)
        groups.setdefault(module, []).append((slot or 0, layer, a, b))
    modules, layout = {}, {}
    r, c = lora.rank, cfg.emb_dim
    for module, parts in groups.items():
        parts.sort(key=lambda p: p[0])
        fused = module.endswith("attn.c_attn")
        a_all = np.concatenate([p[2] for p in parts], axis=1)  # (in, k r)
        width = 3 * c if fused else parts[0][3].shape[1]
        b_all = np.zeros((len(parts) * r, width), np.float32)  # (k r, out): block diagonal
        for j, (slot, layer, _, b) in enumerate(parts):
            col = slot * c if fused else 0
            b_all[j * r:(j + 1) * r, col:col + b.shape[1]] = lora.scale * b
            layout[layer] = [module, j * r, col, int(b.shape[1])]
        modules[module] = (np.ascontiguousarray(a_all.T), np.ascontiguousarray(b_all.T))  # (R, in), (out, R)
    return modules, layout


def _peft_config(lora: LoRA, ranks: dict[str, int], base: str | None, task_type: str | None, conv1d: bool) -> dict:
    """adapter_config.json: PEFT's scaling lora_alpha / r is 1 for every module."""
    r = lora.rank
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": float(lora.dropout),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_peft(
    path: PathLike,
    cfg: GPTConfig,
    lora: LoRA,
    *,
    base_model_name_or_path: str | None = "gpt2",
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Exports a language model's adapters as a Hugging Face PEFT LoRA adapter folder.

    Args:
      path: the output folder (created if needed; its two files are replaced atomically).
      cfg: the base model's config (a language model: ``cfg.num_classes`` is None).
      lora: adapters for that model, either layer layout.
      base_model_name_or_path: what PEFT records as the base model (a hub id or a folder).
      task_type: PEFT's task type ("CAUSAL_LM" for ``GPT2LMHeadModel``).

    Returns:
      The folder.

    Raises:
      ValueError: a classifier config, adapters that do not fit ``cfg`` (naming the layer and shapes), a
        tensor holding NaN or inf, ``path`` being a file.
    """
    if cfg.num_classes is not None:
        raise ValueError(
            f"save_peft exports language-model adapters, but cfg.num_classes={cfg.num_classes} is a classifier "
            "whose head has no GPT2LMHeadModel counterpart; use save_lora (or merge_lora) for it"
        )
    if not isinstance(lora, LoRA):
        raise ValueError(f"save_peft expects a flaxgpt LoRA, got {type(lora).__name__}")
    if task_type is not None and not isinstance(task_type, str):
        raise ValueError(f"task_type must be a PEFT task type name such as 'CAUSAL_LM', got {task_type!r}")
    check_lora(param_shapes(cfg.replace(scan_layers="trf_blocks" in lora.adapters)), lora)
    modules, layout = _fuse(cfg, lora)
    tensors = []
    for module, (a, b) in sorted(modules.items()):
        for name, arr in ((f"{_PREFIX}{module}.lora_A.weight", a), (f"{_PREFIX}{module}.lora_B.weight", b)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"LoRA adapter of {module!r} ({name}) holds NaN or inf; refusing to export it")
            tensors.append(OutTensor(name, tuple(arr.shape), arr.dtype, lambda arr=arr: arr))
    meta = {"version": 1, "rank": lora.rank, "alpha": float(lora.alpha), "dropout": float(lora.dropout),
            "layers": layout}
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_peft writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / PEFT_WEIGHTS_FILE, tensors, {"format": "pt", _META_KEY: json.dumps(meta)})
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    conv1d = any(m != "lm_head" for m in modules)
    write_json(folder / PEFT_CONFIG_FILE, _peft_config(lora, ranks, base_model_name_or_path, task_type, conv1d))
    return folder


def _read_meta(file: Path) -> dict[str, Any]:
    """The ``flaxgpt_lora`` metadata of an adapter file that :func:`save_peft` wrote."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if _META_KEY not in metadata:
        raise ValueError(
            f"{file} was not exported by flaxgpt's save_peft (no {_META_KEY!r} metadata), so its fused q|k|v "
            "adapters cannot be split back exactly; load_peft reads only adapters flaxgpt exported"
        )
    try:
        meta = json.loads(metadata[_META_KEY])
        if meta.get("version") != 1 or not isinstance(meta.get("layers"), dict):
            raise ValueError(f"version {meta.get('version')!r}, layers {type(meta.get('layers')).__name__}")
    except (json.JSONDecodeError, AttributeError, ValueError) as e:
        raise ValueError(f"{file}: malformed {_META_KEY!r} metadata: {e}") from e
    return meta


def _split(st: SafetensorsReader, meta: dict[str, Any], file: Path, allow_non_finite: bool) -> dict[str, Any]:
    """``{"trf_blocks_N/...": {"A", "B"}}`` from the fused PEFT tensors, checking that nothing else is in them."""
    r, scale = int(meta["rank"]), float(meta["alpha"]) / int(meta["rank"])
    by_module: dict[str, list] = {}
    for layer, (module, start, col, width) in meta["layers"].items():
        by_module.setdefault(module, []).append((layer, int(start), int(col), int(width)))
    out = {}
    for module, parts in by_module.items():
        names = [f"{_PREFIX}{module}.lora_{x}.weight" for x in "AB"]
        missing = [n for n in names if n not in st]
        if missing:
            raise ValueError(f"{file} lacks {missing} (its metadata lists {module!r})")
        a_t, b_t = (np.asarray(st[n]) for n in names)  # (R, in), (out, R)
        for n, arr in zip(names, (a_t, b_t)):
            if not allow_non_finite:
                check_finite(arr, n, str(file))
        covered = np.zeros(b_t.shape, bool)
        dtype = a_t.dtype
        for layer, start, col, width in parts:
            covered[col:col + width, start:start + r] = True
            a = a_t[start:start + r].T  # (in, r)
            b = b_t[col:col + width, start:start + r].T.astype(np.float32) / scale  # (r, out)
            out[layer] = {"A": np.ascontiguousarray(a), "B": b.astype(dtype)}
        if a_t.shape[0] != len(parts) * r or np.any(b_t[~covered] != 0):
            raise ValueError(f"{file}: the adapter of {module!r} is not the block-diagonal rank-{len(parts)}x{r} "
                             "adapter flaxgpt exported (modified since?)")
    return out


def load_peft(path: PathLike, cfg: GPTConfig, *, allow_non_finite: bool = False) -> LoRA:
    """Reads adapters that :func:`save_peft` exported back into a flaxgpt LoRA (the exact rank split).

    Args:
      path: the PEFT adapter folder.
      cfg: the base model's config; the adapters come in its layer layout (``cfg.scan_layers``).
      allow_non_finite: load tensors holding NaN or inf instead of refusing them.

    Returns:
      The adapters (``B`` unscaled again: equal to the exported ones up to one float rounding, exactly when
      alpha / rank is a power of two).

    Raises:
      FileNotFoundError: no such folder or a missing file.
      ValueError: not a LoRA adapter flaxgpt exported, modified tensors, adapters that do not fit ``cfg``.
    """
    folder = Path(path).expanduser()
    config_file, file = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    for f in (config_file, file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {folder} is not a PEFT adapter folder")
    peft_type = read_json(config_file).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{config_file}: peft_type is {peft_type!r}, expected 'LORA'")
    meta = _read_meta(file)
    with SafetensorsReader([file]) as st:
        flat = _split(st, meta, file, allow_non_finite)
    if cfg.scan_layers:
        subs = sorted({k.split("/", 1)[1] for k in flat if k.startswith("trf_blocks_")})
        stacked = {}
        for sub in subs:
            blocks = [flat.pop(f"trf_blocks_{i}/{sub}", None) for i in range(cfg.n_layers)]
            if any(b is None for b in blocks):
                raise ValueError(f"{file}: {sub!r} is adapted in some blocks only; load it with scan_layers=False")
            stacked[f"trf_blocks/{sub}"] = {k: np.stack([b[k] for b in blocks]) for k in "AB"}  # (L, ...)
        flat.update(stacked)
    leaves = {f"{layer}/{k}": jnp.asarray(v) for layer, ab in flat.items() for k, v in ab.items()}
    lora = LoRA(unflatten_dict(leaves), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]))
    try:
        check_lora(param_shapes(cfg), lora)
    except ValueError as e:
        raise ValueError(f"{folder}: the adapters do not fit the config: {e}") from e
    return lora
