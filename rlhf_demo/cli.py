"""Command-line entry points; each one only parses flags and calls the module that owns the work."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from rlhf_demo.config import COMPUTE_DTYPES, ENGINES, QUANTIZATIONS, SettingError, Settings, load_settings, resolve_device

log = logging.getLogger("rlhf_demo")


def _default(field: str) -> str:
    """The built-in default of a setting and the variable that overrides it, for ``--help``."""
    return f"default: {getattr(Settings(), field)}; env RLHF_DEMO_{field.upper()}"


def _data_option() -> argparse.ArgumentParser:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", type=Path, help=f"where the DB, adapters and exports live ({_default('data_dir')})")
    return data


def _model_options() -> argparse.ArgumentParser:
    """What loads and runs the model: only commands that do (serve, worker, train-once) take these."""
    model = argparse.ArgumentParser(add_help=False, parents=[_data_option()])
    model.add_argument("--model", help=f"hub id, local folder, or 'tiny' ({_default('model')})")
    model.add_argument(
        "--quantization", choices=QUANTIZATIONS, help=f"precision of the base weights ({_default('quantization')})"
    )
    model.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        help=f"compute precision; auto: bfloat16 on CUDA or with bf16 weights, else float32 ({_default('compute_dtype')})",
    )
    model.add_argument("--device", help=f"auto | cpu | cuda | cuda:N ({_default('device')})")
    return model


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", help=f"address to listen on; 0.0.0.0 for every interface ({_default('host')}, or GRADIO_SERVER_NAME)"
    )
    parser.add_argument("--port", type=int, help=f"TCP port ({_default('port')}, or GRADIO_SERVER_PORT / PORT)")
    parser.add_argument("--no-worker", action="store_true", help="do not start the training worker (default: start it)")
    parser.add_argument("--engine", choices=ENGINES, help=f"who generates: this process, or a vLLM server ({_default('engine')})")
    parser.add_argument("--engine-url", help=f"the vLLM server's URL, e.g. http://127.0.0.1:8123 ({_default('engine_url')})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf_demo", description="A live RLHF chat that learns from votes.")
    sub = parser.add_subparsers(dest="command", required=True)
    model, data = _model_options(), _data_option()

    def command(name: str, parents: list[argparse.ArgumentParser], summary: str, details: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=parents, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {details}")

    _add_serve_arguments(
        command(
            "serve",
            [model],
            "run the web app",
            "Chat, votes and the dashboard on one port; the training worker runs beside it unless --no-worker.",
        )
    )
    command(
        "worker",
        [model],
        "run the training worker against a data directory",
        "Retrains the reward model and runs PPO whenever enough new votes arrived; publishes versions the gate accepts.",
    )
    command(
        "train-once",
        [model],
        "run one training cycle now (if there are votes) and exit",
        "The worker's cycle, once: reward model, PPO, gate, publish.",
    )
    export = command(
        "export",
        [data],
        "write TRL-format JSONL exports",
        "Reads the data directory's votes; writes one JSONL file in the format TRL's trainers load.",
    )
    export.add_argument(
        "--kind",
        choices=("preferences", "unpaired"),
        default="preferences",
        help="preferences: prompt/chosen/rejected; unpaired: prompt/completion/label (default: preferences)",
    )
    export.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    push = command(
        "push",
        [data],
        "upload a published adapter version to a Hub model repo (token: HF_TOKEN)",
        "The adapter's config and card name the base model by its Hub id.",
    )
    push.add_argument("--model", help=f"Hub id of the base model the adapter was trained on ({_default('model')})")
    push.add_argument("--version", required=True, help="the version to upload, e.g. v3 (active or retired)")
    push.add_argument("--base-model", help="hub id of the base, when --model is a local folder (default: --model)")
    push_data = command(
        "push-data",
        [data],
        "upload the feedback as a Hub dataset repo (token: HF_TOKEN)",
        "Both TRL exports with a card; no visitor or network identifiers.",
    )
    for each in (push, push_data):
        each.add_argument("--repo", required=True, help="the Hub repo id, owner/name (created if missing)")
        each.add_argument("--private", action="store_true", help="create the repo private (default: public)")
        each.add_argument("--license", default="apache-2.0", help="license id for the card (default: apache-2.0)")
    return parser


def serve_parser(prog: str = "app.py") -> argparse.ArgumentParser:
    """The parser of ``python app.py``: the ``serve`` flags under the script's own name."""
    parser = argparse.ArgumentParser(
        prog=prog, parents=[_model_options()], description="Run the rlhf-demo web app (and its training worker)."
    )
    _add_serve_arguments(parser)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None)
        for key in ("model", "data_dir", "quantization", "compute_dtype", "device", "host", "port", "engine", "engine_url")
    }
    if getattr(args, "no_worker", False):
        overrides["worker"] = False
    return load_settings(**overrides)


def serve(settings: Settings) -> None:
    """Run the app until Ctrl+C or SIGTERM, which may come at any moment, start-up included: the
    Hub sync pushes a last time (bounded), the worker is stopped, and the exit is clean (status 0)."""
    from rlhf_demo.admin import token_problem
    from rlhf_demo.hub_sync import HubSync, HubUnavailable, hub_target, restore_from_hub
    from rlhf_demo.runtime import Runtime, StartupError
    from rlhf_demo.ui.app import build_app, launch_options
    from rlhf_demo.ui.loading import LoadingPage
    from rlhf_demo.worker.supervisor import WorkerSupervisor

    stop_on_sigterm()
    supervisor: WorkerSupervisor | None = None
    runtime: Runtime | None = None
    sync: HubSync | None = None
    demo = None
    try:
        if problem := token_problem(settings.admin_token):
            raise StartupError(f"{problem} (RLHF_DEMO_ADMIN_TOKEN)")
        # A visitor sees "the model is loading" instead of a refused connection meanwhile.
        try:
            page = LoadingPage(settings.host, settings.port, settings.model)
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        with page:
            target = hub_target()
            if target:
                try:
                    restore_from_hub(settings.db_path, *target, data_dir=settings.data_dir)
                except HubUnavailable as exc:
                    log.error("%s; Hub sync is OFF for this run, so that it cannot replace the Hub's copy", exc)
                    target = None
            runtime = Runtime(settings)
        sync = HubSync(settings.data_dir, settings.db_path, *target).start() if target else None
        log.info("model: %s", runtime.loaded.describe())
        log.info("data directory: %s (database %s)", settings.data_dir.resolve(), settings.db_path.resolve())
        runtime.start_polling()
        if settings.worker:
            supervisor = WorkerSupervisor(settings)
            supervisor.start()
        else:
            log.info("training worker disabled (--no-worker); run `python -m rlhf_demo worker` elsewhere to train")
        demo = build_app(runtime, supervisor)
        demo.queue(default_concurrency_limit=settings.limits.max_concurrent_generations)
        demo.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True, **launch_options(runtime))
        while not STOP.wait(0.5):  # serve until a signal; the wait is interruptible
            pass
        raise KeyboardInterrupt("signal")
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:
        log.info("shutting down (%s)", stop or "Ctrl+C")
    finally:
        if demo is not None:
            demo.close()
        if sync is not None:  # after Gradio: no vote is acknowledged after this snapshot
            sync.close()
        if supervisor is not None:
            supervisor.stop()
        if runtime is not None:
            runtime.close()


STOP = threading.Event()  # set by SIGTERM / Ctrl+C; serve() ends once it is set


def stop_on_sigterm() -> None:
    """``docker stop``, Spaces and ``kill`` send SIGTERM: shut down like on Ctrl+C (Gradio closes,
    the ``finally`` stops the worker) instead of dying on the spot and orphaning it.

    The signal also sets :data:`STOP`: an interrupt raised inside Gradio's start-up can be
    swallowed there (seen: SIGTERM right after the worker started left the app serving), and
    ``serve`` waits on the event, not on Gradio."""

    def interrupt(signum: int, frame: object) -> None:
        if STOP.is_set():  # shutting down already: its steps are bounded, let them finish (the last Hub push)
            log.info("already shutting down (signal %s)", signum)
            return
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        STOP.clear()
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)


class CliError(Exception):
    """A command cannot run as asked; the message says what is wrong (exit status 2)."""


def existing_database(settings: Settings) -> Path:
    """The data directory's database, which a read-only command must not create."""
    if not settings.data_dir.is_dir():
        raise CliError(f"data directory {settings.data_dir} does not exist (set --data-dir or RLHF_DEMO_DATA_DIR)")
    if not settings.db_path.is_file():
        raise CliError(f"no feedback database in {settings.data_dir} (expected {settings.db_path}): nothing to export")
    return settings.db_path


def export(settings: Settings, kind: str, out: Path) -> None:
    from rlhf_demo.store import FeedbackStore, export_preferences, export_unpaired

    store = FeedbackStore(existing_database(settings))
    try:
        count = (export_preferences if kind == "preferences" else export_unpaired)(store, out)
    finally:
        store.close()
    print(f"wrote {count} rows to {out}")


def push(settings: Settings, args: argparse.Namespace) -> None:
    """``push`` / ``push-data``: refuse early (token, version) before opening any connection."""
    from rlhf_demo.hub_push import HubError, hub_token, push_adapter, push_dataset
    from rlhf_demo.store import FeedbackStore

    try:
        token = hub_token()
        store = FeedbackStore(existing_database(settings))
        try:
            if args.command == "push":
                url = push_adapter(
                    store, settings.model, args.version, args.repo, token, args.private, args.base_model, args.license
                )
            else:
                url = push_dataset(store, args.repo, token, args.private, args.license)
        finally:
            store.close()
    except HubError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - no network, DNS, offline mode, HTTP errors: one line, not a traceback
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CliError(
            f"could not push to {args.repo} ({type(exc).__name__}: {reason}); check the network, HF_ENDPOINT / HF_HUB_OFFLINE and the token"
        ) from None
    print(f"pushed to {args.repo}: {url}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (SettingError, CliError) as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")


def serve_main(argv: list[str] | None = None, prog: str = "app.py") -> None:
    """``python app.py [flags]``: the ``serve`` command under the script's own name."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = serve_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.command = "serve"
    try:
        run(args)
    except (SettingError, CliError) as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def run(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    if args.command in ("serve", "worker", "train-once"):
        resolve_device(settings.device)  # an unusable device fails here, in one line, not mid-load
    if args.command == "serve":
        serve(settings)
    elif args.command == "worker":
        from rlhf_demo.worker.loop import main as worker_main

        worker_main(settings)
    elif args.command == "train-once":
        from rlhf_demo.worker.loop import Worker

        worker = Worker(settings)
        worker.repair()
        print(worker.run_once(manual=True) or "nothing to train on yet")
    elif args.command == "export":
        export(settings, args.kind, args.out)
    elif args.command in ("push", "push-data"):
        push(settings, args)
