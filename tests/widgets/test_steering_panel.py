from __future__ import annotations

import contextlib
import io
import threading
import time

import pytest

from tests.widgets.backends import STEER_ITEMS, fake_generate, fake_sweep, fake_to_code
from tests.widgets.conftest import page
from widgets import PayloadError, SteeringPanel
from widgets.steering_panel import check_item


def panel(**kw):
    return SteeringPanel(STEER_ITEMS, kw.pop("generate", fake_generate), to_code=fake_to_code, sweep=fake_sweep,
                         prompt="Once", **kw)


def test_traits_and_items():
    p = panel()
    assert [i["kind"] for i in p.items] == ["latent", "vector"] and p.has_code and p.has_sweep
    assert repr(p) == "SteeringPanel(2 items: 1 latents, 1 vectors)"
    p.set_strength(0, 30)
    assert p.items[0]["strength"] == 30.0 and p.items[1] == STEER_ITEMS[1]
    p.set_state({"items": [dict(STEER_ITEMS[0], strength=12.5)]})  # what the slider sends
    assert p.items[0]["strength"] == 12.5 and len(p.items) == 1


@pytest.mark.parametrize(("patch", "msg"), [
    ({"kind": "neuron"}, "kind must be 'latent' or 'vector'"),
    ({"strength": float("nan")}, "strength must be a finite number"),
    ({"method": "project_out"}, "method for a latent must be one of"),
    ({"positions": "last"}, "positions must be one of"),
    ({"min": 5.0, "max": 1.0}, r"min \(5.0\) must be below max"),
    ({"site": ""}, "needs a name and a site"),
])
def test_bad_items_rejected(patch, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        check_item({**STEER_ITEMS[0], **patch})
    with pytest.raises((ValueError, TypeError), match=msg):
        SteeringPanel([{**STEER_ITEMS[0], **patch}], fake_generate)


def test_nan_strength_is_a_payload_error():
    with pytest.raises(PayloadError):
        check_item({**STEER_ITEMS[0], "strength": float("inf")})


def test_generate_runs_in_a_thread_and_sets_result(sent):
    p = panel()
    p.set_strength(0, 40)
    page(p, {"type": "generate", "id": 1})
    assert sent[-1][0] == {"type": "generate", "id": 1, "data": {"job": 1}}
    assert p.wait(5)
    assert not p.busy and p.status == "generate done" and p.error == ""
    assert p.result["steered"] != p.result["unsteered"]
    assert "dog40" in p.result["steered"]


def test_cancel_stops_waiting_on_a_slow_callback(sent):
    started, seen_cancel = threading.Event(), threading.Event()

    def slow(items, prompt, cancel):
        started.set()
        cancel.wait(10)
        if cancel.is_set():
            seen_cancel.set()
        return fake_generate(items, prompt)

    p = panel(generate=slow)
    page(p, {"type": "generate", "id": 1})
    assert started.wait(5) and p.busy
    page(p, {"type": "generate", "id": 2})  # a second Generate while busy is refused
    assert sent[-1][0]["type"] == "error" and "still running" in sent[-1][0]["message"]
    t0 = time.monotonic()
    page(p, {"type": "cancel", "id": 3})
    assert sent[-1][0]["data"] == {"cancelled": True}
    assert not p.busy and p.status == "cancelled"
    assert seen_cancel.wait(5) and time.monotonic() - t0 < 5
    assert p.wait(5) and p.result == {}  # the late answer is dropped


def test_callback_error_is_shown(sent):
    def broken(items, prompt):
        raise RuntimeError("model exploded")

    p = panel(generate=broken)
    page(p, {"type": "generate", "id": 1})
    assert p.wait(5)
    assert p.error == "RuntimeError: model exploded" and not p.busy


def test_sweep_and_copy_as_code_round_trip(sent):
    p = panel()
    p.set_strength(0, 25)
    p.sweep_strengths = [0.0, 50.0]
    page(p, {"type": "sweep", "id": 1})
    assert p.wait(5)
    assert [r["strength"] for r in p.sweep_rows] == [0.0, 50.0] and p.sweep_rows[0]["same"] is True
    result = p.run()
    page(p, {"type": "code", "id": 2})
    code = sent[-1][0]["data"]["code"]
    assert code == p.code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<copied>", "exec"), {})
    assert out.getvalue().strip() == result["steered"]


def test_extra_item_keys_are_kept_and_checked():
    item = {**STEER_ITEMS[0], "latent": 123, "sae": "sae6", "unit": 2.5}
    assert check_item(item) == item
    with pytest.raises(PayloadError, match="unit must be a finite number"):
        check_item({**item, "unit": float("nan")})
    with pytest.raises(TypeError, match="must be a plain value"):
        check_item({**item, "vector": [1.0, 2.0]})


class FakeSpec:
    """The duck type from_spec relies on (toolkit.analysis.steering.SteeringSpec has the same methods)."""

    def __init__(self, items):
        self.items = items

    def to_items(self):
        return self.items

    @classmethod
    def from_items(cls, items, vectors=None, saes=None):
        assert vectors == {"v": 1} and saes is None
        return cls(items)

    def generate(self, model, prompts, max_new_tokens=20):
        return [fake_generate(self.items, prompts[0])["steered"]]

    def to_code(self, prompt=None, max_new_tokens=20):
        return f"# {len(self.items)} items, {prompt!r}, {max_new_tokens}"


def test_from_spec_runs_the_spec_rebuilt_from_the_items():
    p = SteeringPanel.from_spec(FakeSpec(STEER_ITEMS), model=None, vectors={"v": 1}, max_new_tokens=7, prompt="Hi")
    assert p.items == STEER_ITEMS and p.has_code and p.has_sweep
    p.set_strength(0, 10)
    r = p.run()
    assert r["unsteered"] == fake_generate([], "Hi")["steered"] and "dog10" in r["steered"]
    assert p._to_code(p.items, "Hi") == "# 2 items, 'Hi', 7"
    rows = p._sweep(p.items, "Hi", [0.0, 5.0])
    assert [list(r) for r in rows] == [["strength", "123"]] * 2 and "dog5" in rows[1]["123"]
    with pytest.raises(TypeError, match="from_spec needs a steering spec with to_items"):
        SteeringPanel.from_spec(object(), None)
