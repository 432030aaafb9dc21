"""The whole loop as a user sees it: ``python app.py`` + a real browser rating answers.

Starts the real entry point (``python app.py``: UI, registry polling, supervised training
worker) on 127.0.0.1, then drives Debian's chromium through Playwright like a person would:
ask a prompt on the Chat tab, read the answer, press 👍 or 👎 (a simulated rater decides:
above or below the running median of its scores), ``--votes`` times. Then it waits for the
worker's cycles (the worker trains every 10 new votes) until one publishes or ``--cycles``
have finished, prints each outcome (published, or rejected with the gate's reason), and,
when a version was published, asks again until an answer is tagged with it:
the proof that the chat serves the new adapter without a restart.

    python bench/live_loop.py --votes 30 --data-dir /tmp/live            # SmolLM2 (offline GGUF)
    python bench/live_loop.py --model tiny --votes 12 --data-dir /tmp/lt

Screenshots and the app's log go under ``<data-dir>/live-loop/``; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_browser import CHROMIUM, CHROMIUM_ARGS, Tab, send_chat  # noqa: E402

from bench.app_process import start_app, wait_for_http  # noqa: E402
from bench.learning_votes import load_prompts  # noqa: E402
from bench.raters import load_rater  # noqa: E402
from rlhf_demo.config import load_settings  # noqa: E402
from rlhf_demo.store import SERVABLE_STATUSES, FeedbackStore  # noqa: E402
from rlhf_demo.store.validate import utc_now  # noqa: E402
from rlhf_demo.ui.app import free_port  # noqa: E402
from rlhf_demo.ui.handlers.chat import read_version_tag  # noqa: E402

DONE = re.compile(r"written by adapter \S+")  # under every finished answer


def last_answer(log: Any) -> tuple[str, str, int]:
    """The last bot message's text, the version tag under it and how many samples it was
    picked from (1: a plain sample)."""
    text = log.get_by_test_id("bot").last.inner_text().strip()
    answer, version, picked_from = read_version_tag(text)
    return answer.strip(), version or "?", picked_from


def clear_chat(page: Any) -> None:
    """Press the Chat tab's Clear button and wait until the conversation is empty."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Clear", exact=True).click()  # the Chatbot's own (the one Clear)
    expect(page.get_by_role("log", name="chatbot conversation").get_by_test_id("bot")).to_have_count(0)


def finished_runs(store: FeedbackStore) -> list[dict[str, Any]]:
    return [r for r in reversed(store.list_runs()) if r["status"] != "running"]


def first_change_s(report: dict[str, Any]) -> float | None:
    """Seconds from the vote that started the worker's first cycle to the first publish: the
    wait a visitor sees between voting and a changed model."""
    published = [r["finished_at"] for r in report["runs"] if r["status"] == "succeeded" and r["finished_at"]]
    if "trigger_vote_at" not in report or not published:
        return None
    seconds = datetime.fromisoformat(min(published)) - datetime.fromisoformat(report["trigger_vote_at"])
    return round(seconds.total_seconds(), 1)


def first_pick_s(report: dict[str, Any]) -> float | None:
    """Seconds from that same vote to the first chat answer the votes' reward model picked
    (best-of-n, "picked from n" under it): the first change a visitor sees, before any new
    adapter. Reported beside :func:`first_change_s`, never in its place."""
    if "trigger_vote_at" not in report:
        return None
    start = datetime.fromisoformat(report["trigger_vote_at"])
    picked = [datetime.fromisoformat(v["answered_at"]) for v in report["votes"] if v.get("picked_from", 1) > 1]
    later = [t for t in picked if t >= start]
    return round((min(later) - start).total_seconds(), 1) if later else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    trigger = load_settings().training.every_votes  # the vote after which the worker's first cycle starts

    out = args.data_dir / "live-loop"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = start_app(args.data_dir, port, (out / "app.log").open("w"), *(["--model", args.model] if args.model else []))
    rater = load_rater(args.rater)
    prompts = load_prompts()  # the benchmark's prompts, without its comment lines
    report: dict[str, Any] = {"votes": [], "runs": [], "trigger_vote": trigger}
    started = time.monotonic()
    try:
        wait_for_http(url, app, args.start_timeout)
        report["startup_s"] = round(time.monotonic() - started, 1)
        store = FeedbackStore(args.data_dir / "feedback.db")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            tab = Tab(browser)
            page = tab.page
            page.set_default_timeout(args.answer_timeout * 1000)
            expect.set_options(timeout=args.answer_timeout * 1000)
            page.goto(url)
            scores: list[float] = []
            for i in range(args.votes):
                prompt = prompts[i % len(prompts)]
                asked = time.monotonic()
                log = send_chat(page, prompt, done=DONE)
                answered_at = utc_now()
                answer, version, picked_from = last_answer(log)
                score = rater(prompt, answer)
                scores.append(score)
                liked = score >= statistics.median(scores)
                log.get_by_role("button", name="Like" if liked else "Dislike", exact=True).last.click()
                page.get_by_text("👍 recorded." if liked else "👎 recorded.").last.wait_for()
                if i + 1 == report["trigger_vote"]:
                    report["trigger_vote_at"] = utc_now()
                report["votes"].append(
                    {
                        "prompt": prompt,
                        "version": version,
                        "picked_from": picked_from,
                        "answered_at": answered_at,
                        "words": len(answer.split()),
                        "liked": liked,
                        "answer_s": round(time.monotonic() - asked, 1),
                    }
                )
                print(
                    f"vote {i + 1}/{args.votes}: {'👍' if liked else '👎'} {len(answer.split())} words by {version}"
                    f"{f', picked from {picked_from}' if picked_from > 1 else ''}",
                    flush=True,
                )
                clear_chat(page)  # each prompt its own conversation
                if i == 0:
                    page.screenshot(path=str(out / "01-first-vote.png"), full_page=True)
            report["votes_done_s"] = round(time.monotonic() - started, 1)
            deadline = time.monotonic() + args.cycle_timeout
            while time.monotonic() < deadline and app.poll() is None:
                runs = finished_runs(store)
                if len(runs) >= args.cycles or any(r["status"] == "succeeded" for r in runs):
                    break
                time.sleep(5)
            report["runs"] = [
                {
                    "id": r["id"],
                    "status": r["status"],
                    "candidate": r.get("candidate_version"),
                    "error": r.get("error"),
                    "gate": (r.get("summary") or {}).get("gate"),
                    "started_at": r.get("started_at"),
                    "finished_at": r.get("finished_at"),
                }
                for r in finished_runs(store)
            ]
            report["first_change_s"] = first_change_s(report)
            report["first_pick_s"] = first_pick_s(report)
            published = [v["version"] for v in store.list_versions() if v["version"] != "v0" and v["status"] in SERVABLE_STATUSES]
            report["published"] = published
            if published:
                target = store.active_version()
                waited = time.monotonic()
                for attempt in range(args.serve_attempts):
                    log = send_chat(page, prompts[(args.votes + attempt) % len(prompts)], done=DONE)
                    answer, version, _ = last_answer(log)
                    clear_chat(page)
                    if version == target:
                        report["served_new_version"] = {
                            "version": version,
                            "after_s": round(time.monotonic() - waited, 1),
                            "answer": answer,
                        }
                        break
            page.get_by_role("tab", name="Dashboard").click()
            page.get_by_role("button", name="Refresh plots").click()
            time.sleep(3)
            page.screenshot(path=str(out / "02-dashboard.png"), full_page=True)
            report["page_errors"] = tab.page_errors
            report["blocked_requests"] = tab.blocked
            tab.close()
            browser.close()
        report["app_alive"] = app.poll() is None
        report["total_s"] = round(time.monotonic() - started, 1)
    finally:
        app.terminate()
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: the app's default (SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--votes", type=int, default=30)
    parser.add_argument("--rater", default="bench.raters:brevity")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--answer-timeout", type=float, default=300)
    parser.add_argument("--cycles", type=int, default=2, help="wait for up to this many finished cycles (stops at a publish)")
    parser.add_argument("--cycle-timeout", type=float, default=2400)
    parser.add_argument("--serve-attempts", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args)
    liked = sum(v["liked"] for v in report["votes"])
    print(f"\nstart-up {report.get('startup_s')} s; {len(report['votes'])} votes ({liked} 👍) in {report.get('votes_done_s')} s")
    for r in report["runs"]:
        print(f"run {r['id']}: {r['status']} candidate={r['candidate']} gate={json.dumps(r['gate'])} error={r['error']}")
    print(f"published: {report.get('published')}; served: {report.get('served_new_version')}")
    print(
        f"first change (a published version) {report.get('first_change_s')} s after vote {report['trigger_vote']}; "
        f"first answer picked by the votes' reward model {report.get('first_pick_s')} s after it"
    )
    print(
        f"page errors {report.get('page_errors')}; app alive at the end: {report.get('app_alive')}; total {report.get('total_s')} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
