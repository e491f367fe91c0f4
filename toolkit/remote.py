"""Models that live on NDIF (the National Deep Inference Fabric): `load_model(hub_id, remote=True)`.

Only the config and tokenizer come to this machine; the weights stay on meta (no memory). Every toolkit trace of
such a model (capture, edits, generation: toolkit.tracing.remote) is shipped by nnsight's remote backend to the
service, which runs it on the hosted copy of `hub_id` and sends back only the saved values. It needs an API key
(NDIF_API_KEY, from https://login.ndif.us) and a network path to the service (NDIF_HOST overrides the address).
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

import torch

from toolkit.errors import ModelUnavailableError, RemoteUnavailableError

DEFAULT_HOST = "https://api.ndif.us"
STATUS_PAGE = "https://nnsight.net/status/"
_PROBE_TIMEOUT_S = 3.0

__all__ = ["DEFAULT_HOST", "api_key", "check_remote_ready", "load_remote", "ndif_host", "remote_view"]


def ndif_host(remote: bool | str = True) -> str:
    """The service address: `remote` when it is a URL, else NDIF_HOST, else the public NDIF API."""
    if isinstance(remote, str):
        return remote
    return os.environ.get("NDIF_HOST") or DEFAULT_HOST


def api_key() -> str | None:
    """The NDIF API key nnsight will send: NDIF_API_KEY, else the one saved in nnsight's config."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    try:
        from nnsight import CONFIG  # noqa: TID251 - reads nnsight's saved key; no tracing here
    except ImportError:
        return None
    return CONFIG.API.APIKEY or None


def check_remote_ready(remote: bool | str = True, *, probe: bool = True) -> str:
    """The host, or RemoteUnavailableError saying what to do: no key, a malformed host, or no network path to it."""
    host = ndif_host(remote)
    url = urlparse(host)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RemoteUnavailableError(f"remote={remote!r}: the NDIF host must be an http(s) URL such as {DEFAULT_HOST}")
    if not api_key():
        raise RemoteUnavailableError(
            "remote tracing runs on NDIF and needs an API key: create one at https://login.ndif.us, then "
            "`export NDIF_API_KEY=...` (or nnsight.CONFIG.set_default_api_key(key)) and load the model again")
    if probe:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise RemoteUnavailableError(
                f"NDIF at {host} cannot be reached from this machine ({e}); remote tracing needs the network "
                f"(check a proxy or firewall, or NDIF_HOST); the service status is at {STATUS_PAGE}") from None
    return host


def remote_view(model: Any, hub_id: str, remote: bool | str = True) -> Any:
    """`model` with its traces routed to NDIF's hosted copy of `hub_id` (the same site names and layer count)."""
    model.nn.repo_id = hub_id  # nnsight names the hosted model by this id in the request
    model.remote = ndif_host(remote)
    return model


def load_remote(hub_id: str, remote: bool | str = True) -> Any:
    """A Model of `hub_id` whose weights stay on NDIF: config and tokenizer from the hub (or its local cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import _wrap

    check_remote_ready(remote)
    try:
        cfg = AutoConfig.from_pretrained(hub_id)
        tok = AutoTokenizer.from_pretrained(hub_id)
    except OSError as e:
        raise ModelUnavailableError(
            f"remote model {hub_id!r}: its config and tokenizer are read from the Hugging Face hub (or its cache) "
            f"and could not be ({type(e).__name__}: {str(e).splitlines()[0][:200]}); accept the model's licence on "
            "the hub and set HF_TOKEN for gated Gemma models") from e
    with torch.device("meta"):  # no weights here: they live on the service
        hf = AutoModelForCausalLM.from_config(cfg)
    return remote_view(_wrap(hf, tok, hub_id), hub_id, remote)
