"""OpenAI's GPT-2 weights in and out, without TensorFlow and without pickle.

- :func:`load_pretrained`: a Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``, or
  sharded with ``model.safetensors.index.json``), a bare ``.safetensors`` file with its ``config.json``
  beside it, or a model name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", or the
  "openai-community/..." ids) fetched once into the ``huggingface_hub`` cache.
- :func:`save_pretrained`: ``model.safetensors`` + ``config.json`` that
  ``transformers.GPT2LMHeadModel.from_pretrained`` loads.
- :func:`load_book` / :func:`save_book`: the book's PyTorch ``GPTModel`` state dict stored as safetensors.
- :func:`load_any` / :func:`describe`: any of the above or a flaxgpt training checkpoint, as the CLI uses.

Tensors are read one at a time from the memory-mapped files; only safetensors and JSON are ever read.
Tensors holding NaN or inf are refused (naming the tensor) unless ``allow_non_finite=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from flaxgpt.config import GPTConfig
from flaxgpt.dtypes import COMPUTE_DTYPES, dtype_name, name_of_code
from flaxgpt.files import read_json, write_json
from flaxgpt.io import hub
from flaxgpt.io.book import book_config, book_tensors, params_from_book
from flaxgpt.io.checkpoint import CHECKPOINTS, META_FILE, load_model_from_checkpoint, resolve_checkpoint
from flaxgpt.io.hf import config_from_hf, config_to_hf, hf_tensors, params_from_hf
from flaxgpt.io.hub import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, local_or_download
from flaxgpt.io.mapping import Params
from flaxgpt.io.orbax_dir import is_orbax_run
from flaxgpt.io.safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, pickle_error, write_safetensors

__all__ = [
    "load_pretrained",
    "save_pretrained",
    "load_book",
    "save_book",
    "load_any",
    "detect_format",
    "describe",
]


PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- finding the files


def _hf_files(path: Path) -> tuple[Path, list[Path], dict[str, str] | None]:
    """(config.json, weight files, index weight map or None) of a local HF checkpoint (folder or file)."""
    if path.is_dir():
        folder = path
        if (folder / WEIGHTS_FILE).is_file():
            files, weight_map = [folder / WEIGHTS_FILE], None
        elif (folder / INDEX_FILE).is_file():
            weight_map = hub.weight_map(folder / INDEX_FILE)
            files = [folder / f for f in sorted(set(weight_map.values()))]
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise pickle_error(folder / pickles[0])
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
    elif path.is_file():
        folder = path.parent
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise pickle_error(path)
        if path.name == INDEX_FILE:
            weight_map = hub.weight_map(path)
            files = [folder / f for f in sorted(set(weight_map.values()))]
        elif path.suffix == ".safetensors":
            files, weight_map = [path], None
        else:
            raise ValueError(f"{path}: flaxgpt reads weights only from .safetensors files (and JSON configs)")
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} is missing: Hugging Face weights need their config.json (a book-style file needs "
            "load_book / `flaxgpt convert --n-heads`)"
        )
    return config, files, weight_map


def _to_jax(tree: dict[str, Any]) -> dict[str, Any]:
    """Moves a numpy params tree to JAX arrays leaf by leaf, dropping each numpy array as it goes."""
    for key in list(tree):
        if isinstance(tree[key], dict):
            _to_jax(tree[key])
        else:
            tree[key] = jnp.asarray(tree[key])
    return tree


def _is_book(names: Any) -> bool:
    return "tok_emb.weight" in names


# --------------------------------------------------------------------------- Hugging Face format


def load_pretrained(
    name_or_path: PathLike, dtype: Any = None, *, allow_non_finite: bool = False, **overrides: Any
) -> tuple[GPTConfig, Params]:
    """Loads GPT-2 weights from a Hugging Face checkpoint, local or from the hub.

    Args:
      name_or_path: a folder with ``config.json`` and ``model.safetensors`` (or a sharded checkpoint with
        its index), a ``.safetensors`` file with ``config.json`` beside it, or a model name ("gpt2",
        "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", ...) downloaded once through
        ``huggingface_hub``. Keys with or without the ``transformer.`` prefix load.
      dtype: "float32" (default) or "bfloat16": the parameters' storage and compute dtype.
      allow_non_finite: load tensors holding NaN or inf instead of refusing them.
      **overrides: other GPTConfig fields that do not change shapes (``scan_layers``, ``drop_rate``, ...).

    Returns:
      (cfg, params): a GPT-2 config (``qkv_bias=True``, ``tie_embeddings=True``, the checkpoint's
      ``n_positions``) and its params as JAX arrays.

    Raises:
      ValueError: pickle-only checkpoints, corrupt files, tensors that disagree with the config
        (named, with expected and found shapes), or tensors holding NaN or inf (named, with the count).
      FileNotFoundError: no such path/model, or missing files.
    """
    path = local_or_download(name_or_path)
    config, files, weight_map = _hf_files(path)
    dt = dtype_name(dtype)
    cfg = config_from_hf(read_json(config), **{**overrides, "param_dtype": dt, "dtype": dt})
    with SafetensorsReader(files, weight_map) as st:
        if _is_book(st.shapes):
            raise ValueError(f"{files[0]} uses the book's GPTModel names; load it with load_book")
        source = str(files[0] if len(files) == 1 else path)
        params = params_from_hf(st, cfg, shapes=st.shapes, source=source, allow_non_finite=allow_non_finite)
    return cfg, _to_jax(params)


def save_pretrained(cfg: GPTConfig, params: Params, path: PathLike) -> Path:
    """Writes ``model.safetensors`` and ``config.json`` that ``transformers`` loads as ``GPT2LMHeadModel``.

    Args:
      cfg: the model config.
      params: its params (either layout; float32 or bfloat16, kept as they are).
      path: the output folder (created if needed; the two files in it are replaced atomically).

    Returns:
      The folder.
    """
    folder = Path(path).expanduser()
    if (folder / INDEX_FILE).exists():
        raise ValueError(f"{folder} holds a sharded checkpoint ({INDEX_FILE}); save into another folder")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained writes a folder")
    tensors = hf_tensors(params, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json(folder / CONFIG_FILE, {**config_to_hf(cfg), "dtype": tensors[0].dtype.name})
    return folder


# --------------------------------------------------------------------------- the book's format


def load_book(
    path: PathLike,
    cfg: GPTConfig | None = None,
    *,
    n_heads: int | None = None,
    dtype: Any = None,
    allow_non_finite: bool = False,
    **overrides: Any,
) -> tuple[GPTConfig, Params]:
    """Loads the book's PyTorch ``GPTModel`` state dict saved as safetensors
    (``safetensors.torch.save_file(model.state_dict(), path)``).

    Args:
      path: the ``.safetensors`` file.
      cfg: the model config; by default inferred from the shapes
        (see :func:`flaxgpt.io.book.book_config`).
      n_heads: attention heads, for an inferred config whose width is not a GPT-2 preset's.
      dtype: "float32" (default) or "bfloat16".
      allow_non_finite: load tensors holding NaN or inf instead of refusing them.
      **overrides: other GPTConfig fields for an inferred config.

    Returns:
      (cfg, params) with JAX arrays.

    Raises:
      ValueError: as :func:`load_pretrained`.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; the book's weights are one .safetensors file")
    with SafetensorsReader([path]) as st:
        if cfg is None:
            dt = dtype_name(dtype)
            cfg = book_config(st.shapes, n_heads, **{**overrides, "param_dtype": dt, "dtype": dt})
        elif dtype is not None:
            dt = dtype_name(dtype)
            cfg = cfg.replace(param_dtype=dt, dtype=dt)
        params = params_from_book(st, cfg, shapes=st.shapes, source=str(path), allow_non_finite=allow_non_finite)
    return cfg, _to_jax(params)


def save_book(cfg: GPTConfig, params: Params, path: PathLike, masks: bool = True) -> Path:
    """Writes params with the book's ``GPTModel`` names to a ``.safetensors`` file, which the book's
    PyTorch model loads with ``model.load_state_dict(safetensors.torch.load_file(path))``.

    Args:
      cfg: the model config.
      params: its params (either layout).
      path: the file to write.
      masks: include the ``att.mask`` buffers (the book's model has them in its state dict).

    Returns:
      The path.
    """
    return write_safetensors(Path(path).expanduser(), book_tensors(params, cfg, masks), {"format": "pt"})


# --------------------------------------------------------------------------- any format


def detect_format(source: PathLike) -> str:
    """What ``source`` is, from its layout and headers (no tensor is read).

    Args:
      source: a path or a GPT-2 model name.

    Returns:
      "hf" (a Hugging Face folder or file, or a hub model name), "book" (a safetensors file with the
      book's names) or "checkpoint" (a flaxgpt run or checkpoint folder).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / META_FILE).is_file() or (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
            return "checkpoint"
        if is_orbax_run(path):  # a sharded run (several processes): flaxgpt.io.orbax_checkpoint
            return "checkpoint"
        return "hf"
    if path.is_file() and path.suffix == ".safetensors":
        with SafetensorsReader([path]) as st:
            return "book" if _is_book(st.shapes) else "hf"
    return "hf"  # an index file, a pickle (refused with its message) or a model name


def load_any(
    source: PathLike, *, n_heads: int | None = None, dtype: Any = None, allow_non_finite: bool = False
) -> tuple[GPTConfig, Params, str]:
    """Loads weights in any supported format (see :func:`detect_format`).

    Args:
      source: a path or a GPT-2 model name.
      n_heads: attention heads for a book file whose width is not a GPT-2 preset's.
      dtype: cast the parameters (and compute) to "float32" or "bfloat16"; None keeps a checkpoint's
        config and loads the other formats as float32.
      allow_non_finite: load tensors holding NaN or inf instead of refusing them.

    Returns:
      (cfg, params, format).

    Raises:
      ValueError: as :func:`load_pretrained`; a checkpoint none of whose folders verifies.
    """
    fmt = detect_format(source)
    if fmt == "checkpoint":
        cfg, params, _ = load_model_from_checkpoint(source, dtype=dtype, allow_non_finite=allow_non_finite)
        return cfg, params, fmt
    if fmt == "book":
        return (*load_book(source, n_heads=n_heads, dtype=dtype, allow_non_finite=allow_non_finite), fmt)
    return (*load_pretrained(source, dtype=dtype, allow_non_finite=allow_non_finite), fmt)


def describe(source: PathLike, *, n_heads: int | None = None) -> tuple[GPTConfig, str, str]:
    """Reads the config of weights in any format from their headers and metadata only (no tensors).

    Args:
      source: a path or a GPT-2 model name (a name not yet cached is downloaded).
      n_heads: as for :func:`load_any`.

    Returns:
      (cfg, format, location): ``cfg.param_dtype`` is the stored dtype of the token embedding.
    """
    fmt = detect_format(source)
    if fmt == "checkpoint":
        ckpt, meta = resolve_checkpoint(source, verify=False)  # meta.json and its config are checked
        return GPTConfig.from_dict(meta["config"]), fmt, str(ckpt)
    if fmt == "book":
        path = Path(source).expanduser()
        with SafetensorsReader([path]) as st:
            dt = st.dtypes["tok_emb.weight"]
            cfg = book_config(st.shapes, n_heads)
        return cfg.replace(param_dtype=_config_dtype(dt)), fmt, str(path)
    path = local_or_download(source)
    config, files, weight_map = _hf_files(path)
    cfg = config_from_hf(read_json(config))
    with SafetensorsReader(files, weight_map) as st:
        names = [n for n in ("transformer.wte.weight", "wte.weight") if n in st.dtypes]
        dt = st.dtypes[names[0]] if names else "F32"
    return cfg.replace(param_dtype=_config_dtype(dt)), fmt, str(path)


def _config_dtype(code: str) -> str:
    """The config dtype describing stored tensors: their own when a config can hold it, else float32 (what
    the loaders give for float64 files)."""
    name = name_of_code(code)
    return name if name in COMPUTE_DTYPES else "float32"
