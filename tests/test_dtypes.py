"""flaxgpt.dtypes: the one table of dtype names."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.cli import build_parser
from flaxgpt.dtypes import COMPUTE_DTYPES, SAFETENSORS_CODES, STORED_AS, WEIGHT_DTYPES, dtype_name


@pytest.mark.parametrize(
    "given, name",
    [(None, "float32"), ("bfloat16", "bfloat16"), (jnp.bfloat16, "bfloat16"), (np.float32, "float32"),
     (np.dtype("float32"), "float32")],
)  # fmt: skip
def test_dtype_name_accepts_names_and_dtypes(given, name):
    assert dtype_name(given) == name


@pytest.mark.parametrize("bad", ["float16", "fp32", np.int32, 3])
def test_dtype_name_refuses_others_naming_them(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\)"):
        dtype_name(bad)
    assert dtype_name("float16", allowed=tuple(COMPUTE_DTYPES)) == "float16"


def test_tables_agree():
    assert set(WEIGHT_DTYPES) <= set(COMPUTE_DTYPES) <= set(SAFETENSORS_CODES)
    assert np.dtype(STORED_AS["bfloat16"]).itemsize == jnp.dtype(jnp.bfloat16).itemsize


@pytest.mark.parametrize("command", [["generate", "--pretrained", "x", "--prompt", "p"], ["convert", "a", "b"]])
def test_the_cli_offers_exactly_the_weight_dtypes(command, capsys):
    parser = build_parser()
    for name in WEIGHT_DTYPES:
        assert parser.parse_args([*command, "--dtype", name]).dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--dtype", "float16"])
