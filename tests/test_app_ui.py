"""The Blocks wiring without a browser: what "Use via API" lists."""

from __future__ import annotations

from rlhf_demo.ui.app import build_app

PUBLIC = {
    "/chat",
    "/rate",
    "/compare",
    "/vote_A",
    "/vote_B",
    "/vote_tie",
    "/vote_both_bad",
    "/export_preferences",
    "/export_unpaired",
    "/delete_my_data",
}


def test_use_via_api_lists_only_the_public_endpoints(runtime):
    demo = build_app(runtime)
    listed = set(demo.get_api_info()["named_endpoints"])
    assert listed == PUBLIC, f"internal endpoints listed: {sorted(listed - PUBLIC)}; missing: {sorted(PUBLIC - listed)}"
    assert demo.get_api_info()["unnamed_endpoints"] == {}


def test_admin_endpoints_are_not_listed_either(runtime):
    import dataclasses

    runtime.settings = dataclasses.replace(runtime.settings, admin_token="secret")
    demo = build_app(runtime)
    assert "Admin token" in str(demo.config)
    assert set(demo.get_api_info()["named_endpoints"]) == PUBLIC
