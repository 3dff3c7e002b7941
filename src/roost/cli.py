"""The ``roost`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from roost import __version__, logs
from roost.cluster.errors import ClusterError
from roost.config import HELP, Config, ConfigError, load_config
from roost.control import cli as control_cli
from roost.listener_exposure import exposure_warning
from roost.server import Server
from roost.store import definitions_cli, fsio
from roost.store.datadir import DataDirInUse, DataDirUnsafe
from roost.store.definitions import DefinitionsError
from roost.store.encryption import EncryptionError, generate_key_file
from roost.store.message_store import StoreError
from roost.tls import TLSError

log = logging.getLogger("roost")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roost", description="roost: an AMQP 0-9-1 message broker in Python"
    )
    parser.add_argument("--version", action="version", version=f"roost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the broker",
        description=(
            "Run the broker. Every option can also be set in the TOML file given "
            "with --config (same names, with dashes or underscores) or in a "
            "ROOST_<NAME> environment variable (e.g. ROOST_PORT=5673); the command "
            "line wins over the environment, which wins over the file."
        ),
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(Config(), f.name)
        text = f"{HELP[f.name]} (default: {default!r}; env ROOST_{f.name.upper()})"
        if f.type == "bool":
            serve.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            serve.add_argument(
                flag,
                dest=f.name,
                type=int if f.type == "int" else str,
                default=None,
                metavar=f.name.upper(),
                help=text,
            )
    definitions_cli.add_parser(sub)
    control_cli.add_parser(sub)
    keygen = sub.add_parser(
        "keygen",
        help="create an encryption key file for encryption at rest",
        description=(
            "Write 32 random bytes, base64-encoded, to FILE (created with mode 0600; "
            "an existing file is never overwritten), for `roost serve "
            "--encryption-key-file FILE`."
        ),
    )
    keygen.add_argument("file", metavar="FILE", help="key file to create")
    return parser


def _keygen(path: str) -> int:
    try:
        kid = generate_key_file(Path(path))
    except EncryptionError as exc:
        print(f"roost: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a new encryption key to {path} (key id {kid.hex()}); keep a copy safe:")
    print("without it, messages stored under it cannot be read")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "definitions":
        return definitions_cli.run(args)
    if args.command == "ctl":
        return control_cli.run(args)
    if args.command == "keygen":
        return _keygen(args.file)
    if args.command != "serve":
        parser.print_help()
        return 2
    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"roost: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    if config.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:
        return 0


def _warn_about_exposure(config: Config, server: Server) -> None:
    broker = server.broker
    warning = exposure_warning(config, list(broker.users.users), broker.loopback_users)
    if warning is not None:
        print(f"roost: warning: {warning}", file=sys.stderr, flush=True)


async def _serve(config: Config) -> int:
    data_dir = config.resolved_data_dir()
    try:
        fsio.makedirs(data_dir)
    except OSError as exc:
        print(f"roost: cannot create data directory {data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"roost {__version__}: data directory {data_dir}", flush=True)
    # A broker holds hundreds of thousands of long-lived, acyclic objects
    # (queued messages); with CPython's default thresholds the cyclic GC
    # walks them over and over and costs a quarter of publish throughput.
    # Collect the young generation far less often, and freeze what start-up
    # (recovery) created.
    gc.set_threshold(100_000, 50, 1000)
    server = Server(config)
    try:
        await server.start()
    except (
        DataDirInUse,
        DataDirUnsafe,
        DefinitionsError,
        TLSError,
        EncryptionError,
        StoreError,
        ClusterError,
    ) as exc:
        print(f"roost: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or f"{config.host}:{config.port}"
        verb = "cannot use" if exc.filename else "cannot listen on"
        print(f"roost: {verb} {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    _warn_about_exposure(config, server)
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Announced only once SIGTERM is handled: whoever waits for this line
    # (a supervisor, RoostProcess) may stop the broker right away.
    # One line, so that whoever parses it learns both ports at once.
    tls = f" and amqps://{config.host}:{server.tls_port}" if server.tls_port else ""
    http = (
        f" and {server.http_scheme}://{config.http_host or config.host}:{server.http_port}"
        if server.http_port
        else ""
    )
    print(
        f"roost {__version__}: listening on amqp://{config.host}:{server.port}{tls}{http}",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await server.stop()
    return 0
