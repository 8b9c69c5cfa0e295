"""Model files: round trip, and every kind of bad file gives the one clear ValueError."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.mlp import MLP
from pipeline.tracking.model_files import FORMAT_NAME, FORMAT_VERSION, load_model, save_model

BAD = "is not a valid backprop-pipeline model"


def _model(**kw) -> MLP:
    cfg = {"sizes": [2, 5, 3], "activation": "tanh", "output": "softmax", "seed": 3}
    cfg.update(kw)
    return MLP(**cfg)


def _members(model: MLP) -> dict[str, np.ndarray]:
    config = json.dumps(model.get_config()).encode()
    return {
        "format": np.frombuffer(FORMAT_NAME, dtype=np.uint8),
        "version": np.array(FORMAT_VERSION),
        "config": np.frombuffer(config, dtype=np.uint8),
        "params": model.params,
    }


def _write(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"sizes": [2, 1], "activation": [], "output": "sigmoid", "dtype": "float32"},
        {"sizes": [3, 4, 4, 1], "activation": ["relu", "leaky_relu"], "output": "sigmoid",
         "activation_params": {"slope": 0.2}, "bias": False},
    ],
)
def test_round_trip_gives_identical_predictions(tmp_path, kw):
    model = _model(**kw)
    rng = np.random.default_rng(0)
    model.set_params(rng.normal(size=model.params.shape))
    path = save_model(model, tmp_path / "m.weights")  # exact name kept, no .npz appended
    assert path == tmp_path / "m.weights" and path.exists()
    loaded = load_model(path)
    X = rng.normal(size=(50, model.sizes[0]))
    assert loaded.get_config() == model.get_config()
    assert loaded.params.dtype == model.params.dtype
    np.testing.assert_array_equal(loaded.params, model.params)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_file_needs_no_pickle(tmp_path):
    path = save_model(_model(), tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as npz:  # plain numpy can read every member
        assert sorted(npz.files) == ["config", "format", "params", "version"]
        assert json.loads(npz["config"].tobytes())["sizes"] == [2, 5, 3]


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.npz")


def _truncated(tmp_path: Path) -> Path:
    data = save_model(_model(), tmp_path / "full.npz").read_bytes()
    return _bytes(tmp_path, data[: len(data) // 2])


def _bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.npz"
    path.write_bytes(data)
    return path


def _flipped(tmp_path: Path) -> Path:
    """One byte of the parameters changed in place (CRC no longer matches)."""
    data = bytearray(save_model(_model(), tmp_path / "full.npz").read_bytes())
    i = data.rfind(b"params.npy")  # central directory; the data sits before it
    data[i // 2] ^= 0xFF
    return _bytes(tmp_path, bytes(data))


def _pickle_npz(tmp_path: Path) -> Path:
    m = _members(_model())
    m["params"] = np.array([{"x": 1}, "evil"], dtype=object)
    return _write(tmp_path / "bad.npz", **m)


def _raw_pickle(tmp_path: Path) -> Path:
    return _bytes(tmp_path, pickle.dumps({"weights": [1, 2, 3]}))


def _wrong_count(tmp_path: Path) -> Path:
    m = _members(_model())
    m["params"] = m["params"][:-1]
    return _write(tmp_path / "bad.npz", **m)


def _edited_json(tmp_path: Path, edit) -> Path:
    m = _members(_model())
    m["config"] = np.frombuffer(edit(m["config"].tobytes()), dtype=np.uint8)
    return _write(tmp_path / "bad.npz", **m)


def _huge_header(tmp_path: Path) -> Path:
    """A params member whose header claims 10**12 float64 values: must not allocate them."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    path = _write(tmp_path / "bad.npz", **{k: v for k, v in _members(_model()).items()
                                            if k != "params"})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("params.npy", buf.getvalue() + b"\0" * 64)
    return path


def _member_change(key, value):
    def make(tmp_path: Path) -> Path:
        m = _members(_model())
        if value is None:
            del m[key]
        else:
            m[key] = value
        return _write(tmp_path / "bad.npz", **m)

    return make


CASES = {
    "truncated": (_truncated, r"not an \.npz|cannot be read"),
    "random bytes": (lambda p: _bytes(p, np.random.default_rng(1).bytes(4096)), "not an .npz"),
    "empty": (lambda p: _bytes(p, b""), "not an .npz"),
    "flipped byte": (_flipped, "CRC|cannot be read"),
    "raw pickle": (_raw_pickle, "not an .npz"),
    "object array (pickle) in npz": (_pickle_npz, "object array"),
    "wrong param count": (_wrong_count, "parameters stored but sizes"),
    "json syntax broken": (
        lambda p: _edited_json(p, lambda b: b.replace(b"}", b"", 1)), "not valid UTF-8 JSON"
    ),
    "json unknown key": (
        lambda p: _edited_json(p, lambda b: b.replace(b'"sizes"', b'"__class__": 1, "sizes"')),
        "unknown keys",
    ),
    "json sizes edited": (
        lambda p: _edited_json(p, lambda b: b.replace(b"[2, 5, 3]", b"[2, 6, 3]")),
        "parameters stored but sizes",
    ),
    "json unknown activation": (
        lambda p: _edited_json(p, lambda b: b.replace(b'"tanh"', b'"os.system"')),
        "config rejected by MLP",
    ),
    "json dtype edited": (
        lambda p: _edited_json(p, lambda b: b.replace(b'"float64"', b'"float32"')),
        "dtype float64 but config says float32",
    ),
    "json not an object": (lambda p: _edited_json(p, lambda b: b"[1, 2]"), "JSON object"),
    "nan parameter": (
        _member_change("params", np.full(_model().n_params, np.nan)), "NaN or infinite"
    ),
    "int parameters": (
        _member_change("params", np.zeros(_model().n_params, dtype=np.int64)), "float vector"
    ),
    "missing member": (_member_change("version", None), "expected exactly"),
    "future version": (_member_change("version", np.array(99)), "version"),
    "foreign format": (
        _member_change("format", np.frombuffer(b"something-else", dtype=np.uint8)),
        "format marker",
    ),
    "huge header": (_huge_header, "claims|header says"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_raise_one_clear_error(tmp_path, case):
    make, why = CASES[case]
    path = make(tmp_path)
    with pytest.raises(ValueError, match=why) as info:
        load_model(path)
    assert str(info.value).startswith(f"model file {path} {BAD}: ")
