"""The Data tab's verbs: counts, exports, "delete my data", and the admin actions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_demo.admin import AdminRefused
from rlhf_demo.hub_sync import push_after_deletion
from rlhf_demo.store import export_preferences, export_unpaired
from rlhf_demo.ui.handlers.base import TabHandlers
from rlhf_demo.ui.handlers.checks import UserError, check_visitor
from rlhf_demo.visitors import Visitor

EXPORT_WRITERS = {"preferences": export_preferences, "unpaired": export_unpaired}


class DataHandlers(TabHandlers):
    """Data: what was collected, in TRL's formats, and each visitor's right to remove theirs."""

    def counts_markdown(self) -> str:
        counts = self.runtime.store.counts()
        per_voter = self.runtime.store.votes_per_visitor()
        top = ", ".join(str(n) for n in per_voter[:10]) or "none yet"
        return (
            f"**Responses** {counts['responses']} · **👍** {counts['thumbs_up']} · **👎** {counts['thumbs_down']} · "
            f"**A/B pairs** {counts['preferences']} · **ties** {counts['ties']} · **both bad** {counts['both_bad']} · "
            f"**voters** {counts['visitors']}  \nVotes per voter (largest first, no identities): {top}"
        )

    def my_votes_markdown(self, visitor: Visitor | str) -> str:
        """How many of this visitor's vote examples the next reward model trains on, and why not all."""
        from rlhf_demo.ui.dashboard import cap_rule, votes_kept

        visitor = check_visitor(visitor)
        kept, every = votes_kept(self.runtime.store, self.runtime.settings)
        mine = sum(row.get("visitor_id") == visitor.id for row in every)
        if not mine:
            return "**Your votes:** none yet. 👍/👎 in Chat and A/B votes in Compare all teach the model."
        counted = sum(row.get("visitor_id") == visitor.id for row in kept)
        why = "" if counted == mine else f" The newest count: {cap_rule(self.runtime.settings)}."
        return f"**Your votes:** {counted} of your {mine} vote examples count toward the next reward model.{why}"

    def model_markdown(self) -> str:
        """One line for visitors: which model and adapter answer (no server paths or libraries)."""
        source = self.runtime.loaded.source
        name = source.name if source.origin in ("hub", "cache") else Path(source.name).name  # a repo id, or a folder's name
        warning = " · ⚠️ **the tiny random test model: its answers are noise**" if source.is_test_model else ""
        return f"**Model:** {name} · **adapter:** {self.runtime.server.active}{warning}"

    def export(self, kind: Any, include_visitor_ids: bool = False, admin_token: Any = "") -> str:
        """Write a TRL-format JSONL into the exports folder and return its path."""
        if include_visitor_ids:
            self.require_admin(admin_token)
        if not isinstance(kind, str) or kind not in EXPORT_WRITERS:
            raise UserError(f"Unknown export {str(kind)[:40]!r}.")
        folder = self.runtime.settings.exports_dir
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "-with-visitor-ids" if include_visitor_ids else ""
        path = folder / f"{kind}{suffix}.jsonl"
        EXPORT_WRITERS[kind](self.runtime.store, path, include_visitor_ids=include_visitor_ids)
        return str(path)

    def require_admin(self, token: Any) -> None:
        try:
            self.admin.check(token)
        except AdminRefused as exc:
            raise UserError(str(exc)) from None

    # ----- admin (each needs the token; the UI renders these only when one is configured) ---
    def rollback(self, version: Any, admin_token: Any) -> str:
        """Pin the served version to any published one (the server picks it up on its next poll)."""
        self.require_admin(admin_token)
        if not isinstance(version, str) or not version:
            raise UserError("Choose a version.")
        self.runtime.store.set_active_version(version)
        served = self.runtime.sync_registry()
        return f"Now serving {served}."

    def reset_to_base(self, admin_token: Any) -> str:
        """Serve the base model without any adapter; the versions stay for a later rollback."""
        self.require_admin(admin_token)
        active = self.runtime.store.active_version()
        if active is not None:
            self.runtime.store.set_version_status(active, "retired")
        return f"Now serving {self.runtime.sync_registry()}."

    def train_now(self, admin_token: Any) -> str:
        from rlhf_demo.worker.status import request_training

        self.require_admin(admin_token)
        request_training(self.runtime.settings.worker_dir)
        return "Training requested: the worker starts a cycle on its next poll."

    def delete_my_data(self, visitor: Visitor | str) -> str:
        """Forget everything this visitor sent, and rewrite every export that held it.

        Exports this app knows how to write are regenerated from what remains; any other
        file in the exports folder cannot be checked, so it is removed."""
        visitor = check_visitor(visitor)
        counts = self.runtime.store.delete_visitor_data(visitor.id)
        regenerated, removed = self.refresh_exports()
        parts = ", ".join(f"{v} {k}" for k, v in counts.items())
        return f"Deleted: {parts}. Exports rewritten: {regenerated}, removed: {removed}. {push_after_deletion()}".strip()

    def refresh_exports(self) -> tuple[int, int]:
        folder = self.runtime.settings.exports_dir
        if not folder.is_dir():
            return 0, 0
        regenerated = removed = 0
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            kind, _, suffix = path.name.removesuffix(".jsonl").partition("-")
            if path.suffix == ".jsonl" and kind in EXPORT_WRITERS and suffix in ("", "with-visitor-ids"):
                EXPORT_WRITERS[kind](self.runtime.store, path, include_visitor_ids=bool(suffix))
                regenerated += 1
            else:
                path.unlink()
                removed += 1
        return regenerated, removed
