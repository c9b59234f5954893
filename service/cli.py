"""The ``mend`` console script: serve, train, eval, bench, prepare-model.

``mend serve`` has one flag per setting (``--max-batch-size`` for ``MEND_MAX_BATCH_SIZE`` ...); a flag
overrides the environment. ``train`` and ``eval`` take their flags from editor_core.train /
editor_core.evaluate, imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import socket
import sys
import typing

from service.settings import Settings

log = logging.getLogger("mend")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_LAZY = {"train": "editor_core.train", "eval": "editor_core.evaluate", "calibrate": "editor_core.calibrate",
         "export": "service.export", "stats": "editor_core.stats", "check-gpu": "service.check_gpu",
         "blend": "editor_core.blend"}
_LAZY_HELP = {
    "train": "meta-train a MEND editor",
    "eval": "evaluate editors",
    "calibrate": "choose a trained editor's edit step size on its validation split",
    "stats": "key statistics (E[k k^T]) for rome, memit and alphaedit",
    "export": "write the model at a journal version as a Hugging Face directory or a PEFT LoRA adapter",
    "check-gpu": "measure and assert the CUDA path (edits, rollback, replay, latency, memory; --dry on CPU)",
    "blend": "interpolate a trained editor's nets with the nets it started from (WiSE-FT)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_dict(annotation) -> bool:
    return typing.get_origin(annotation) is dict


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; help shows the env variable and the default."""
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, dict) else default
        parser.add_argument(
            _flag(name), dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
            help=f"{info.description or ''} [env MEND_{name.upper()}; default: {shown}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings overridden by the flags that were given."""
    overrides = {}
    for name, info in Settings.model_fields.items():
        if hasattr(args, name):
            value = getattr(args, name)
            overrides[name] = json.loads(value) if _is_dict(info.annotation) and isinstance(value, str) else value
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP service under uvicorn until SIGINT/SIGTERM.

    Returns 1 (after a clean shutdown) when the service cannot serve: the port is taken, startup
    failed, or the embedded redis-server died. A process that stays up but is never ready would wait
    for a human; one that exits non-zero is restarted by docker (``restart: unless-stopped``),
    systemd (``Restart=on-failure``) or Kubernetes, and the restart recovers from the journal.
    """
    import uvicorn

    from service.logs import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.auth_enabled and settings.host not in LOOPBACK:
        log.warning("no API keys configured: binding 127.0.0.1 instead of %s (set MEND_API_KEYS to "
                    "serve other hosts)", settings.host)
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    try:  # bind first: a port in use fails here, before redis or the model are started for nothing
        sock = _listen_socket(settings.host, settings.port)
    except OSError as err:
        log.error("mend serve cannot listen on %s:%d: %s; exiting with status 1", settings.host, settings.port, err)
        return 1
    from service.main import create_app  # torch and transformers: seconds, so after the port check

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=30))
    failures: list[str] = []

    def on_failure(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True  # uvicorn checks it every tick, then runs the lifespan shutdown

    app.state.runtime.on_failure = on_failure
    log.info("mend serve listening on http://%s:%d", settings.host, sock.getsockname()[1])
    try:
        server.run(sockets=[sock])
    except SystemExit as exit_:  # uvicorn exits 3 when the lifespan startup itself fails
        failures.append(f"uvicorn exited with {exit_.code}")
    finally:
        sock.close()
    if failures:
        log.error("mend serve cannot serve: %s; exiting with status 1 so that a supervisor restarts it",
                  failures[0])
        return 1
    return 0


def _listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, made as uvicorn makes its own (SO_REUSEADDR)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def prepare_model(args: argparse.Namespace) -> int:
    """Load the model once so its safetensors cache exists (fast later starts)."""
    import torch

    from editor_core.models import load
    from service.logs import configure_logging

    configure_logging("INFO", "text")
    loaded = load(args.model, device="cpu", dtype=getattr(torch, args.dtype), cache_dir=args.model_cache)
    n = sum(p.numel() for p in loaded.model.parameters())
    log.info("model %s ready from %s (%.1fM parameters)", args.model, loaded.source, n / 1e6)
    return 0


def _bench_module():
    """bench.runner, importable from the repository checkout (bench/ is not an installed package)."""
    try:
        return importlib.import_module("bench.runner")
    except ImportError:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("bench.runner")


def bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (bench/) and write the markdown report."""
    return _bench_module().run(args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; train/eval flags are loaded only when ``command`` is one of them."""
    parser = argparse.ArgumentParser(prog="mend", description="MEND model editing as a service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP service", description="Run the HTTP service. Every "
                       "flag is also an environment variable MEND_<NAME>.")
    add_settings_arguments(p)
    p.set_defaults(func=serve)

    for name, module in _LAZY.items():
        p = sub.add_parser(name, help=f"{_LAZY_HELP[name]} ({module})")
        if command == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)

    p = sub.add_parser("bench", help="benchmarks: edit/query/journal/replay/rollback/training/memory figures "
                       "written to docs/BENCHMARKS.md")
    if command == "bench":
        _bench_module().add_arguments(p)
    p.set_defaults(func=bench)

    p = sub.add_parser("prepare-model", help="load the model once to fill its safetensors cache")
    p.add_argument("--model", default=Settings.model_fields["model"].default)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model-cache", default=None)
    p.set_defaults(func=prepare_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mend`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
