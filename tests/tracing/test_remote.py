"""Remote tracing (NDIF) tested at the network boundary only: nnsight's websocket and HTTP calls are intercepted
where they would leave the machine; a stand-in service deserializes the request exactly as NDIF does, runs it
on the tiny Gemma-2 and answers with nnsight's own COMPLETED message. Without a key or a network the errors say
what to do, before anything is sent."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import weakref
from types import SimpleNamespace

import httpx
import pytest
import torch
import websocket
from cloudpickle import cloudpickle as cloudpickle_impl
from huggingface_hub import HfApi
from nnsight import CONFIG
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.tracer import _saves

from toolkit.errors import ArgumentError, RemoteUnavailableError
from toolkit.models import load_model, tiny_gemma2
from toolkit.remote import remote_view
from toolkit.tracing import Add, capture, generate, run_with_edits

pytestmark = pytest.mark.usefixtures("one_thread")

HOST, KEY, HUB_ID = "https://ndif.test", "key-123", "google/gemma-2-2b"
PROMPT = ["The cat sat on the mat"]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    monkeypatch.setattr(CONFIG.API, "APIKEY", KEY)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket this test opens is an error: nothing may leave the machine."""

    def refuse(*a, **kw):
        raise AssertionError(f"a connection left the machine: {a}")

    monkeypatch.setattr(socket, "create_connection", refuse)


class FakeNDIF:
    """Stands where nnsight's requests leave the machine (websocket.create_connection, httpx.Client.post, the
    hub's model_info): records them and answers as the service does, running the request on `server`."""

    def __init__(self, server, *, fail: str | None = None) -> None:
        self.server, self.fail = server, fail
        self.posts: list[dict] = []
        self.sockets: list[str] = []
        self.answer: bytes | None = None

    def install(self, monkeypatch) -> FakeNDIF:
        monkeypatch.setattr(websocket, "create_connection", self.connect)
        monkeypatch.setattr(httpx.Client, "post", self.post)
        monkeypatch.setattr(HfApi, "model_info", lambda _self, repo_id, **kw: SimpleNamespace(id=repo_id))
        return self

    def connect(self, url, header=None):
        self.sockets.append(url)
        fake = self
        messages = [json.dumps({"session_id": "session-1"})]

        class Socket:
            def recv(self):
                return messages.pop(0) if messages else fake.answer

            def settimeout(self, _t):
                pass

            def close(self):
                pass

        return Socket()

    def post(self, url, data=None, files=None, headers=None):
        blob = files["blob"][1]
        meta = json.loads(data["data"])
        self.posts.append({"url": url, "meta": meta, "headers": headers, "blob": blob})
        self.answer = self.run(blob, meta["compress"])
        received = ResponseModel(id="job-1", status=Status.RECEIVED)
        return httpx.Response(200, text=received.model_dump_json(), request=httpx.Request("POST", url))

    def run(self, blob: bytes, compress: bool) -> bytes:
        """What NDIF does: rebuild the tracer against its own copy of the model, run it, return the saves."""
        if self.fail:
            return ResponseModel(id="job-1", status=Status.ERROR, description=self.fail).pickle()
        with _like_another_process():
            tracer = RequestModel.deserialize(blob, self.server.nn._remoteable_persistent_objects(), compress)
            self.request = tracer.info.frame.f_locals  # what the client shipped, as the service sees it
            tracer.execute(tracer.info.code)
        saves = _saves()
        result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
        return ResponseModel(id="job-1", status=Status.COMPLETED, data=_torch_bytes(result, compress)).pickle()


@contextlib.contextmanager
def _like_another_process():
    """Deserialize and run as the service would: the toolkit cannot be imported (what the request uses of it must
    have travelled by value), and cloudpickle cannot map the shipped classes back onto this process's ones."""
    hidden = {k: sys.modules[k] for k in list(sys.modules) if k == "toolkit" or k.startswith("toolkit.")}
    trackers = (cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS, cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID)
    sys.modules.update(dict.fromkeys(hidden))  # None: `import toolkit...` raises ImportError
    cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS = weakref.WeakKeyDictionary()
    cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID = weakref.WeakValueDictionary()
    try:
        yield
    finally:
        sys.modules.update(hidden)
        cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS, cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID = trackers


def _torch_bytes(obj, compress: bool) -> bytes:
    import io

    import zstandard

    buf = io.BytesIO()
    torch.save(obj, buf)
    return zstandard.ZstdCompressor().compress(buf.getvalue()) if compress else buf.getvalue()


def test_request_at_the_network_boundary(monkeypatch, key, no_network):
    local = tiny_gemma2()
    remote = remote_view(tiny_gemma2(), HUB_ID, HOST)
    ndif = FakeNDIF(server=tiny_gemma2()).install(monkeypatch)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    edits = [Add("blocks.0.resid_post", v, scale=2.0, positions=[1, 2])]
    logits, acts = run_with_edits(remote, PROMPT, edits, capture=["blocks.1.resid_post"])
    # what the toolkit asked for: the model, the key, one request, the edit with its vector, the saved site
    assert ndif.sockets == ["wss://ndif.test/subscribe"]
    (post,) = ndif.posts
    assert post["url"] == f"{HOST}/request" and post["headers"]["ndif-api-key"] == KEY
    assert post["meta"]["session_id"] == "session-1"
    kind, model_key = post["meta"]["model_key"].split(":", 1)
    assert kind.endswith("TransformersModel") and json.loads(model_key)["repo_id"] == HUB_ID
    steps = ndif.request["steps"]
    assert [(env.path, io, None if es is None else len(es)) for env, io, es in steps] == [
        ("model.model.layers.0", "output", 1), ("model.model.layers.1", "output", None)]
    sent = steps[0][2][0]
    assert type(sent).__name__ == "Add" and sent.scale == 2.0 and sent.positions == [1, 2]
    assert torch.equal(sent.vector, v)
    # the answer lands where the local path puts it, with the same values; generation goes the same way
    assert generate(remote, PROMPT, edits, max_new_tokens=3) == generate(local, PROMPT, edits, max_new_tokens=3)
    assert len(ndif.posts) == 2 and ndif.request["steps"][0][2][0].positions == [1, 2]
    import cloudpickle

    assert "toolkit" not in cloudpickle.list_registry_pickle_by_value()  # by value only while a request is made
    want_logits, want_acts = run_with_edits(local, PROMPT, edits, capture=["blocks.1.resid_post"])
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(acts["blocks.1.resid_post"], want_acts["blocks.1.resid_post"])


def test_service_errors_say_what_failed(monkeypatch, key, no_network):
    remote = remote_view(tiny_gemma2(), HUB_ID, HOST)
    FakeNDIF(server=None, fail="model google/gemma-2-2b is not deployed").install(monkeypatch)
    with pytest.raises(RemoteUnavailableError, match="not deployed.*NDIF_API_KEY"):
        capture(remote, PROMPT, ["blocks.0.resid_post"])

    def unreachable(url, header=None):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(websocket, "create_connection", unreachable)
    with pytest.raises(RemoteUnavailableError, match="ConnectionRefusedError.*Check the network"):
        capture(remote, PROMPT, ["blocks.0.resid_post"])
    with pytest.raises(ArgumentError, match="grad=True needs .* here"):
        run_with_edits(remote, PROMPT, grad=True)


def test_no_key_or_no_network_is_refused_before_sending(monkeypatch, no_network):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteUnavailableError, match="needs an API key.*NDIF_API_KEY"):
        load_model(HUB_ID, remote=True)
    remote = remote_view(tiny_gemma2(), HUB_ID, HOST)
    with pytest.raises(RemoteUnavailableError, match="needs an API key"):
        generate(remote, PROMPT, max_new_tokens=2)
    monkeypatch.setenv("NDIF_API_KEY", KEY)

    def offline(address, timeout=None):
        assert address == ("api.ndif.us", 443)  # the probe, and only the probe
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(RemoteUnavailableError, match="cannot be reached from this machine"):
        load_model(HUB_ID, remote=True)
    with pytest.raises(RemoteUnavailableError, match="must be an http"):
        load_model(HUB_ID, remote="ndif.test")
