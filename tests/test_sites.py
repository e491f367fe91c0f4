import pytest

from toolkit.errors import HookNotFoundError
from toolkit.sites import SITE_KINDS, Site, module_path, validate_site


@pytest.mark.parametrize("name", ["blocks.3.resid_post", "blocks.3.hook_resid_post", "resid_post.3", "layer_3/res"])
def test_parse_forms(name):
    assert Site.parse(name) == Site("resid_post", 3)


def test_order_follows_execution():
    sites = [Site(k, 1) for k in reversed(SITE_KINDS)] + [Site("resid_post", 0)]
    ordered = sorted(sites, key=lambda s: s.order)
    assert ordered[0] == Site("resid_post", 0)
    assert [s.kind for s in ordered[1:]] == list(SITE_KINDS)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(HookNotFoundError, match="valid kinds: resid_pre, attn_z"):
        Site("resid_middle", 0)


def test_unparseable_name():
    with pytest.raises(HookNotFoundError, match="blocks.<layer>.<kind>"):
        Site.parse("the residual stream")


def test_layer_range_lists_valid_layers():
    with pytest.raises(HookNotFoundError, match=r"layers 0\.\.17"):
        validate_site("blocks.18.resid_post", 18)
    with pytest.raises(HookNotFoundError, match="must be an integer"):
        Site("resid_post", 1.5)


def test_module_paths():
    assert module_path(Site("resid_post", 2)) == "model.layers.2"
    assert module_path(Site("attn_z", 2)) == "model.layers.2.self_attn.o_proj"
    assert module_path(Site("mlp_out", 0)) == "model.layers.0.post_feedforward_layernorm"
