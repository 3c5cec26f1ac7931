"""flaxgpt.io.safetensors_io: the streaming writer against safetensors' own, the lazy reader, refusals."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxgpt.io.safetensors_io import OutTensor, SafetensorsReader, check_finite, write_safetensors


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),  # odd byte count: offsets stay exact
        "scalar": np.asarray(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }


def _out(tensors: dict[str, np.ndarray]) -> list[OutTensor]:
    return [OutTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]


def test_streaming_writer_matches_the_reference_writer(tmp_path):
    tensors = _tensors()
    ours = write_safetensors(tmp_path / "ours.safetensors", _out(tensors), {"format": "pt"})
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    got, ref = load_file(str(ours)), load_file(str(tmp_path / "ref.safetensors"))
    assert got.keys() == ref.keys() == tensors.keys()
    for k in tensors:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        np.testing.assert_array_equal(got[k], ref[k])
    data = ours.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0  # the header is padded so that the data starts 8-byte aligned
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert len(data) == 8 + n + sum(v.nbytes for v in tensors.values())


def test_bfloat16_round_trip(tmp_path):
    x = (jnp.arange(12, dtype=jnp.float32) / 7).astype(jnp.bfloat16).reshape(3, 4)
    arr = np.asarray(x)
    path = write_safetensors(tmp_path / "bf.safetensors", [OutTensor("x", arr.shape, arr.dtype, lambda: arr)])
    with SafetensorsReader([path]) as st:
        assert st.dtypes["x"] == "BF16" and st.shapes["x"] == (3, 4)
        np.testing.assert_array_equal(np.asarray(st["x"], np.float32), np.asarray(x, np.float32))


def test_writer_refuses_mismatches_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    lying = OutTensor("a", (2,), np.dtype(np.float32), lambda: np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"tensor 'a' is float32\(3,\), declared float32\(2,\)"):
        write_safetensors(path, [lying])
    ints = OutTensor("i", (2,), np.dtype(np.int32), lambda: np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="tensor 'i' has dtype int32"):
        write_safetensors(path, [ints])
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_reader_is_lazy_and_checks_the_index(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    save_file({"y": np.zeros(3, np.float32)}, str(tmp_path / "s2.safetensors"))
    files = [tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"]
    with SafetensorsReader(files, {"x": "s1.safetensors", "y": "s2.safetensors"}) as st:
        assert sorted(st) == ["x", "y"] and len(st) == 2 and st.shapes == {"x": (2,), "y": (3,)}
        np.testing.assert_array_equal(st["y"], np.zeros(3))
    with pytest.raises(ValueError, match=r"the index maps tensor 'y' to s1.safetensors, which does not hold it"):
        with SafetensorsReader(files, {"y": "s1.safetensors"}):
            pass
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match="tensor 'x' is in both"):
        with SafetensorsReader([files[0], tmp_path / "dup.safetensors"]):
            pass


def test_pickles_are_refused_and_broken_files_named(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04whatever")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is a PyTorch pickle file.*save_pretrained"):
        with SafetensorsReader([tmp_path / "pytorch_model.bin"]):
            pass
    with pytest.raises(FileNotFoundError, match="no such safetensors file"):
        with SafetensorsReader([tmp_path / "absent.safetensors"]):
            pass
    good = write_safetensors(tmp_path / "g.safetensors", _out(_tensors()))
    data = good.read_bytes()
    for name, blob in [("truncated", data[:-5]), ("tiny", b"\x01\x02"), ("header", data[:8] + b"[" + data[9:])]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=rf"{name}.safetensors is not a readable safetensors file"):
            with SafetensorsReader([path]):
                pass


def test_check_finite_counts_and_names():
    check_finite(np.ones(3, np.float32), "w", "f")
    check_finite(np.asarray([1, 2], np.int64), "ids", "f")  # integers cannot be NaN
    with pytest.raises(ValueError, match=r"^f: tensor 'w' holds 2 non-finite values \(NaN or inf\) of 4"):
        check_finite(np.asarray([1, np.nan, np.inf, 0], np.float32), "w", "f")
    with pytest.raises(ValueError, match="holds 1 non-finite value "):
        check_finite(np.asarray([np.nan], jnp.bfloat16), "b", "f")
