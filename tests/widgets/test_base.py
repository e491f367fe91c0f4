from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from ipywidgets.widgets.widget import _remove_buffers

from toolkit.errors import NonFiniteError
from widgets import FeatureExplorer, ModelDiffExplorer, PayloadError, SteeringPanel
from widgets._base import check_latent, esm, finite_array, pack

WIDGETS = Path(__file__).parents[2] / "widgets"


def test_pack_turns_arrays_into_buffers():
    content, bufs = pack({"a": np.arange(4, dtype=np.float64), "b": [np.array([1, 2]), 3.5, "x", None, True]})
    assert content == {"a": {"$buf": 0, "dtype": "f4"}, "b": [{"$buf": 1, "dtype": "i4"}, 3.5, "x", None, True]}
    assert np.frombuffer(bufs[0], np.float32).tolist() == [0, 1, 2, 3]
    assert np.frombuffer(bufs[1], np.int32).tolist() == [1, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), np.array([1.0, np.nan])])
def test_pack_rejects_non_finite(bad):
    with pytest.raises(NonFiniteError, match="finite|NaN"):
        pack({"x": bad})


def test_pack_rejects_oversized_and_unknown():
    with pytest.raises(PayloadError, match="over the widget's cap"):
        pack({"x": np.zeros(1000, np.float32)}, cap=1000)
    with pytest.raises(PayloadError, match="cannot send a set"):
        pack({"x": {1, 2}})


def test_finite_array_errors_name_the_problem():
    with pytest.raises(NonFiniteError, match=r"density has 2 NaN/inf values \(first at index 1\)"):
        finite_array([0.1, np.nan, np.inf], "density")
    with pytest.raises(PayloadError, match="has 2 values but there are 3 latents"):
        finite_array([1, 2], "max_act", n=3)
    with pytest.raises(PayloadError, match="must be 1-D"):
        finite_array(np.zeros((2, 2)), "x")
    with pytest.raises(PayloadError, match="must hold numbers"):
        finite_array(["a"], "x")
    with pytest.raises(NonFiniteError, match="overflows float32"):
        finite_array([1e300], "x")


def test_check_latent():
    assert check_latent(np.int64(3), 5) == 3
    for bad in (-1, 5, 2.0, True, "1"):
        with pytest.raises(IndexError, match=r"integer in 0\.\.4"):
            check_latent(bad, 5)


def test_front_end_files_are_offline_small_and_themed():
    for name in ("feature_explorer", "model_diff", "steering_panel"):
        code = esm(name)
        assert "export default" in code
        assert not re.search(r"""(import|from)\s*\(?\s*["']https?:""", code), name
        assert "fetch(" not in code and "XMLHttpRequest" not in code
        assert len(code.encode()) < 60_000, f"{name} ESM is {len(code)} bytes"
    for css in WIDGETS.glob("*.css"):
        text = css.read_text()
        # every colour goes through a variable: either JupyterLab's --jp-* or our --tk-* (set from --jp-*)
        for decl in re.findall(r"(?:color|background|fill|stroke|border[\w-]*)\s*:\s*([^;]+);", text):
            if "#" in decl or "rgb" in decl:
                assert "var(--" in decl, f"{css.name}: colour without a theme variable: {decl}"


def _buffers(widget) -> tuple[dict, list, list]:
    state, paths, bufs = _remove_buffers(widget.get_state())
    json.dumps(state)  # the JSON part must serialize as is
    return state, paths, bufs


def test_arrays_travel_as_buffers_in_every_widget():
    from tests.widgets.backends import STEER_ITEMS, DiffTableLike, FeatureBackend, fake_generate

    store = FeatureBackend(1000)
    fx = FeatureExplorer.from_store(store)
    state, paths, bufs = _buffers(fx)
    assert sorted(p[0] for p in paths) == ["density", "max_act"]
    assert sum(len(b) for b in bufs) == 2 * 4 * 1000
    rest = {k: v for k, v in state.items() if k not in ("_esm", "_css")}
    assert len(json.dumps(rest)) < 20_000  # labels + small traits; numbers are not in the JSON part
    dx = ModelDiffExplorer.from_table(DiffTableLike(1000))
    _, paths, _ = _buffers(dx)
    assert sorted(p[0] for p in paths) == ["artifact", "freq", "kind", "norm_diff", "nu_error", "nu_recon", "valid"]
    sp = SteeringPanel(STEER_ITEMS, fake_generate)
    state, paths, _ = _buffers(sp)
    assert paths == [] and state["items"][0]["name"] == "123"


def test_state_size_cap():
    d = np.full(200_000, 0.1, np.float32)
    with pytest.raises(PayloadError, match=r"FeatureExplorer state is 1\.5 MiB, over the widget's cap of 1\.0 MiB"):
        FeatureExplorer(d, d, lambda i: {}, max_bytes=2**20)
    FeatureExplorer(d, d, lambda i: {}, max_bytes=2 * 2**20)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        FeatureExplorer(d, d, lambda i: {}, max_bytes=0)


def test_unknown_request_is_answered_with_an_error(sent):
    from tests.widgets.conftest import page

    fx = FeatureExplorer(np.full(3, 0.1), np.ones(3), lambda i: {})
    page(fx, {"type": "nonsense", "id": 7})
    assert sent[-1][0] == {"type": "error", "id": 7, "request": "nonsense", "message": "unknown request 'nonsense'"}
