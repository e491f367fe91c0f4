"""Toolkit traces of a remote model (`load_model(hub_id, remote=True)`), shipped to NDIF by nnsight.

nnsight sends the source of the traced block plus the values it references, never the model: the block here
therefore references only nnsight envoys, tensors and the toolkit's Edit objects (the toolkit's code travels by
value, so the service needs nothing of it installed), and saves exactly what the local path returns. Failures on
the way (no key, no network, a refused or failed job) become RemoteUnavailableError saying what to do.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import nnsight
import torch

import toolkit
from toolkit.errors import RemoteUnavailableError, ToolkitError
from toolkit.sites import Site
from toolkit.tracing.capture import envoy

if TYPE_CHECKING:
    from toolkit.models import Model

Step = tuple[Any, str, Sequence[Any] | None]
"""(envoy, 'input' or 'output', the edits to apply there, or None to save the activation)."""

__all__ = ["remote_errors", "remote_forward", "remote_generate", "steps_for"]


def steps_for(model: Model, plan: Sequence[tuple[Site, str, Sequence[Any] | None]]) -> list[Step]:
    """The envoys of (site, kind, edits) in execution order, as the traced block reads them."""
    return [(envoy(model, s), s.io, es if kind == "edit" else None) for s, kind, es in plan]


@contextlib.contextmanager
def remote_errors(model: Model) -> Iterator[None]:
    """Run a remote trace, turning transport and service failures into RemoteUnavailableError."""
    import cloudpickle  # nnsight's serializer

    from toolkit.remote import STATUS_PAGE, check_remote_ready

    check_remote_ready(model.remote or True, probe=False)
    # edits run on the service without the toolkit installed; only while this request is serialized
    by_value = toolkit.__name__ not in cloudpickle.list_registry_pickle_by_value()
    if by_value:
        cloudpickle.register_pickle_by_value(toolkit)
    try:
        yield
    except ToolkitError:
        raise
    except _transport_errors() as e:
        raise RemoteUnavailableError(
            f"the remote trace of {model.name!r} on NDIF ({model.remote}) failed: {type(e).__name__}: {e}. Check the "
            f"network and NDIF_API_KEY, and that the service hosts this model now ({STATUS_PAGE})") from e
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(toolkit)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What nnsight's remote path raises when the service or the way to it fails (its RemoteError, sockets, HTTP)."""
    from nnsight.intervention.backends.remote import RemoteError

    found: list[type[BaseException]] = [RemoteError, OSError]  # OSError: refused, unreachable, DNS, timeouts
    for module, name in (("httpx", "HTTPError"), ("websocket", "WebSocketException"),
                         ("huggingface_hub.errors", "HfHubHTTPError")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def remote_forward(model: Model, batch: dict[str, torch.Tensor], steps: list[Step], bos_mask: torch.Tensor,
                   logits: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One remote forward: apply the edits and save the activations of `steps`; (saved activations, logits)."""
    nn, out = model.nn, None
    with remote_errors(model), torch.no_grad():
        with nn.trace(dict(batch), remote=model.remote) as tracer:
            acts = []
            for env, io, edits in steps:
                act = env.input if io == "input" else env.output
                if edits is None:
                    acts.append(act)
                    continue
                for e in edits:
                    act = e.apply(act, prompt_pass=True, bos_mask=bos_mask)
                if io == "input":
                    env.input = act
                else:
                    env.output = act
            acts = nnsight.save(acts)
            if logits:
                out = nn.output.logits.save()
            else:
                tracer.stop()
    return list(acts), out


def remote_generate(model: Model, batch: dict[str, torch.Tensor], steps: list[Step], bos_mask: torch.Tensor,
                    kwargs: dict[str, Any]) -> torch.Tensor:
    """Remote generation with the edits of `steps` at every step; the token ids (prompt + new)."""
    nn = model.nn
    with remote_errors(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")  # tracer.all() ends with generation
        with nn.generate(remote=model.remote, **kwargs) as tracer:
            with tracer.invoke(dict(batch)):
                if steps:
                    for step in tracer.all():
                        for env, io, edits in steps:
                            act = env.input if io == "input" else env.output
                            for e in edits:
                                act = e.apply(act, prompt_pass=(step == 0), bos_mask=bos_mask)
                            if io == "input":
                                env.input = act
                            else:
                                env.output = act
            with tracer.invoke():
                out = tracer.result.save()
    return out
