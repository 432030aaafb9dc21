"""The Blocks wiring without a browser: what "Use via API" lists."""

from __future__ import annotations

from rlhf_demo.ui.app import build_app

PUBLIC = {
    "/chat",
    "/rate",
    "/compare",
    "/continue_both",
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


def test_rater_guidelines_come_from_the_env_else_the_data_dir_file_else_the_default(runtime):
    """Shown on the Chat and Compare tabs; the Space owner sets the text."""
    import dataclasses

    from rlhf_demo.config import load_settings
    from rlhf_demo.ui.guidelines import DEFAULT_GUIDELINES, GUIDELINES_FILE

    def shown_texts() -> list[str]:
        """The Markdown inside each guidelines accordion, in page order."""
        config = build_app(runtime).config
        by_id = {c["id"]: c for c in config["components"]}
        children = {node["id"]: node.get("children", []) for node in _walk(config["layout"])}
        accordions = [i for i, c in by_id.items() if str(c.get("props", {}).get("elem_id", "")).endswith("-guidelines")]
        return [by_id[child["id"]]["props"]["value"].strip() for i in accordions for child in children[i]]  # Gradio trims it

    assert shown_texts() == [DEFAULT_GUIDELINES.strip()] * 2
    runtime.settings.data_dir.mkdir(parents=True, exist_ok=True)
    (runtime.settings.data_dir / GUIDELINES_FILE).write_text("From the file.", encoding="utf-8")
    assert shown_texts() == ["From the file."] * 2
    env = {"RLHF_DEMO_UI__GUIDELINES": "Reward **brevity**."}
    from_env = load_settings(env=env, model=str(runtime.settings.model), data_dir=runtime.settings.data_dir, quantization="fp32")
    runtime.settings = dataclasses.replace(runtime.settings, ui=from_env.ui)
    assert shown_texts() == ["Reward **brevity**."] * 2


def _walk(node: dict) -> list[dict]:
    return [node, *(n for child in node.get("children", []) for n in _walk(child))]


def test_compare_has_its_own_settings_and_enter_generates(runtime):
    demo = build_app(runtime)
    compares = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_compare"]
    chats = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_chat"]
    chat_inputs = {id(c) for f in chats for c in f.inputs}
    assert len(compares) == 2, "the Generate button and Enter in the prompt"
    for f in compares:
        assert not chat_inputs & {id(c) for c in f.inputs}, "Compare reads the Chat tab's settings"


def test_admin_pins_nothing_until_a_version_is_chosen(runtime):
    import dataclasses

    import gradio as gr

    runtime.settings = dataclasses.replace(runtime.settings, admin_token="secret")
    demo = build_app(runtime)
    (dropdown,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Version"]
    assert dropdown.value in (None, "")
