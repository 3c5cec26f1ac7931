"""GPT-2 weights by name from the Hugging Face hub (``huggingface_hub``'s cache), and the file names of a
Hugging Face model folder."""

from __future__ import annotations

import os
from pathlib import Path

from flaxgpt.files import read_json

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "INDEX_FILE",
    "HUB_MODELS",
    "hub_repo",
    "download",
    "weight_map",
    "local_or_download",
]

PathLike = str | os.PathLike[str]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor name -> file map

HUB_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 355M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}


def hub_repo(name: str) -> str | None:
    """The hub repository of a GPT-2 model name ("gpt2" -> "openai-community/gpt2"), or None."""
    key = str(name).strip()
    if key.lower() in HUB_MODELS:
        return HUB_MODELS[key.lower()]
    return key if key in HUB_MODELS.values() else None


def download(name: str, revision: str | None = None) -> Path:
    """Fetches a GPT-2 model's ``config.json`` and safetensors weights into the ``huggingface_hub`` cache.

    Files already cached are not fetched again; with ``HF_HUB_OFFLINE=1`` only the cache is used.

    Args:
      name: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or an "openai-community/..." id.
      revision: a branch, tag or commit (default: "main").

    Returns:
      The cached snapshot folder holding the files.

    Raises:
      ImportError: ``huggingface_hub`` is not installed.
      FileNotFoundError: the files could neither be fetched nor found in the cache.
    """
    repo = hub_repo(name)
    if repo is None:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(HUB_MODELS)}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise ImportError(
            f'downloading {name!r} needs huggingface_hub: pip install "flaxgpt[hub]" (or pass a local '
            "directory with config.json and model.safetensors)"
        ) from e

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo, filename, revision=revision))

    try:
        config = fetch(CONFIG_FILE)
        try:
            fetch(WEIGHTS_FILE)
        except EntryNotFoundError as missing:
            try:
                index = fetch(INDEX_FILE)
            except EntryNotFoundError:
                raise missing from None
            for shard in sorted(set(weight_map(index).values())):
                fetch(shard)
    except OSError as e:  # HTTP errors, no connection, offline mode without the file in the cache
        raise FileNotFoundError(
            f"could not get {repo} from the Hugging Face hub or its cache: {str(e).rstrip('.')}. Check "
            "the network (or HF_HUB_OFFLINE), or pass a local directory with config.json and "
            "model.safetensors"
        ) from e
    return config.parent


def weight_map(index: Path) -> dict[str, str]:
    """Reads and checks a sharded checkpoint's ``model.safetensors.index.json``.

    Args:
      index: the index file.

    Returns:
      Tensor name -> shard file name (a bare ``.safetensors`` name in the index's folder).

    Raises:
      ValueError: no ``weight_map``, or one that names something other than a ``.safetensors`` file.
    """
    obj = read_json(index)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map")
    for name, file_name in weight_map.items():
        if (
            not isinstance(file_name, str)
            or Path(file_name).name != file_name
            or not file_name.endswith(".safetensors")
        ):
            raise ValueError(f"{index} maps {name!r} to {file_name!r}, expected a .safetensors file name")
    return weight_map


def local_or_download(name_or_path: PathLike) -> Path:
    """A local file or folder as it is, or a GPT-2 model name fetched through :func:`download`.

    Args:
      name_or_path: a path, or a name :func:`hub_repo` knows.

    Returns:
      The local path.

    Raises:
      FileNotFoundError: neither an existing path nor a known model name.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if hub_repo(str(name_or_path)) is not None:
        return download(str(name_or_path))
    raise FileNotFoundError(
        f"{name_or_path} is neither a file or directory nor a model name ({', '.join(sorted(HUB_MODELS))})"
    )
