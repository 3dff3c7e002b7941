"""``roost definitions export|import``: a stopped broker's definitions as
RabbitMQ definitions JSON.

Both commands work on the data directory itself, under its lock, so they
refuse to run while a broker uses it. They read and rewrite only
``definitions.json``; the message log is never opened, because nothing in
it changes: every durable queue keeps its id in the log (the file's
internal ``roost`` section), so its stored messages are recovered at the
next start, and a queue new in an import gets a fresh id that the log has
never used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from roost.broker.broker import Broker
from roost.cli_messages import CommandFailed, say
from roost.config import Config, ConfigError, load_config
from roost.store import definitions, definitions_import, fsio
from roost.store.datadir import MESSAGES_DIR, DataDirInUse, DataDirLock, DataDirUnsafe
from roost.store.definitions_import import SECTIONS, UNSUPPORTED

USAGE = """\
examples:
  roost definitions export --data-dir /var/lib/roost defs.json
  rabbitmqctl export_definitions rabbit.json && roost definitions import rabbit.json
  roost definitions export --data-dir old/ - | roost definitions import --data-dir new/ -

Both commands need the broker using the data directory to be stopped.
"""


def add_parser(sub: Any) -> None:
    """Add ``definitions`` to the ``roost`` command's sub-parsers."""
    parser = sub.add_parser(
        "definitions",
        help="export or import users, vhosts, permissions, exchanges, queues and bindings",
        description=(
            "Export or import definitions (users, vhosts, permissions, exchanges,\n"
            "queues, bindings) in RabbitMQ's definitions JSON format, on the data\n"
            "directory of a stopped broker."
        ),
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="definitions_action", metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the data directory's definitions to FILE",
        description=(
            "Write the data directory's definitions to FILE as RabbitMQ definitions "
            "JSON (the format of 'rabbitmqctl export_definitions')."
        ),
    )
    export.add_argument("file", metavar="FILE", help="output file, or - for standard output")
    imported = actions.add_parser(
        "import",
        help="merge the definitions in FILE into the data directory",
        description=(
            "Merge the definitions in FILE (RabbitMQ definitions JSON, e.g. from "
            "'rabbitmqctl export_definitions' or 'roost definitions export') into the "
            "data directory, creating it if needed. Existing queues keep their stored "
            "messages. Prints a summary and any problems on standard error; exits 1 "
            "if there were problems, 2 if FILE cannot be read or is not definitions."
        ),
    )
    imported.add_argument("file", metavar="FILE", help="input file, or - for standard input")
    for p in (export, imported):
        p.add_argument("--data-dir", metavar="DIR", help="the broker's data directory")
        p.add_argument(
            "--config", metavar="FILE", help="TOML configuration file, as for 'roost serve'"
        )
    parser.set_defaults(definitions_parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.definitions_action is None:
        args.definitions_parser.print_help(sys.stderr)
        return 2
    try:
        config = load_config(args.config, overrides={"data_dir": args.data_dir})
        if args.definitions_action == "export":
            export_definitions(config, args.file)
        else:
            import_definitions(config, args.file)
    except ConfigError as exc:
        say(str(exc))
        return 2
    except CommandFailed as exc:
        say(str(exc))
        return exc.code
    return 0


def export_definitions(config: Config, target: str) -> None:
    data_dir = config.resolved_data_dir()
    if data_dir.is_dir():
        lock = _lock(data_dir)
        try:
            broker = load_broker(config, data_dir)
        finally:
            lock.release()
    else:
        # Nothing stored yet: what the first ``roost serve`` would start with.
        broker = new_broker(config)
    data = definitions.export(broker)
    content = definitions.encode(data)
    if target == "-":
        sys.stdout.write(content.decode("utf-8"))
        sys.stdout.flush()
    else:
        try:
            # Owner-only: the file holds password hashes.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
        except OSError as exc:
            raise CommandFailed(f"cannot write {target}: {exc.strerror}", 1) from exc
    say(f"exported {summary(data)} from {data_dir}")


def import_definitions(config: Config, source: str) -> None:
    data = read_definitions(source)
    import_data(config, data, "standard input" if source == "-" else source)


def import_data(config: Config, data: Any, label: str) -> None:
    """Import definitions already read from ``label`` (``roost ctl import``
    reads them first to try a running broker)."""
    try:
        data = definitions_import.validated(data)
    except definitions_import.ImportRefused as exc:
        raise CommandFailed(f"{label} is {exc}", 2) from exc
    data_dir = config.resolved_data_dir()
    try:
        fsio.makedirs(data_dir)
    except OSError as exc:
        raise CommandFailed(f"cannot create data directory {data_dir}: {exc.strerror}", 1) from exc
    lock = _lock(data_dir)
    try:
        broker = load_broker(config, data_dir, writing=True)
        problems = definitions_import.import_into(broker, data)
        _assign_queue_ids(broker)
        content = definitions.encode(definitions.export(broker, include_internal=True))
        try:
            definitions.write_atomic(data_dir / definitions.FILENAME, content)
        except OSError as exc:
            path = data_dir / definitions.FILENAME
            raise CommandFailed(f"cannot write {path}: {exc}", 1) from exc
    finally:
        lock.release()
    say(f"imported {summary(data)} from {label} into {data_dir}")
    for warning in import_warnings(data):
        say(f"warning: {warning}")
    for problem in problems:
        say(f"problem: {problem}")
    if problems:
        raise CommandFailed(f"{_count(len(problems), 'problems')} in {label}", 1)


# -- helpers ------------------------------------------------------------


def _lock(data_dir: Path) -> DataDirLock:
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        raise CommandFailed(f"{exc}; stop it first", 1) from exc
    except DataDirUnsafe as exc:
        raise CommandFailed(str(exc), 1) from exc
    except OSError as exc:
        raise CommandFailed(f"cannot use data directory {data_dir}: {exc.strerror}", 1) from exc
    return lock


def new_broker(config: Config) -> Broker:
    # No journal: the message log stays closed (see the module docstring).
    return Broker(default_user=config.default_user, default_password=config.default_password)


def load_broker(config: Config, data_dir: Path, writing: bool = False) -> Broker:
    """The data directory's definitions, loaded as ``roost serve`` would
    (``roost ctl`` loads a stopped broker with it too). ``writing``: the
    caller will write them back, which a file without roost's own section
    next to a message log must not be (queue ids handed out now would
    attribute stored messages to whichever queues got them)."""
    broker = new_broker(config)
    path = data_dir / definitions.FILENAME
    try:
        saved = definitions.load(path)
    except definitions.DefinitionsError as exc:
        raise CommandFailed(str(exc), 1) from exc
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}", 1) from exc
    if writing and (saved is None or "roost" not in saved):
        log_files = [p for p in (data_dir / MESSAGES_DIR).glob("*.seg") if p.stat().st_size]
        if log_files:
            what = "is missing" if saved is None else "has no roost section"
            raise CommandFailed(
                f"{path} {what}, but {data_dir / MESSAGES_DIR} holds a message log: its "
                "messages could not be matched with queues; nothing was changed. Restore "
                "the definitions.json this data directory was written with first.",
                1,
            )
    if saved is not None:
        for problem in definitions.restore(broker, saved):
            say(f"warning: {path}: {problem}")
    return broker


def _assign_queue_ids(broker: Broker) -> None:
    # Without a journal the vhost leaves new durable queues without a log
    # id; give them one as it would, from the counter saved in the file.
    for vh in broker.vhosts.values():
        for q in vh.queues.values():
            if q.durable and not q.store_id:
                q.store_id = broker.allocate_queue_id()


def read_definitions(source: str) -> Any:
    label = "standard input" if source == "-" else source
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CommandFailed(f"cannot read {label}: {exc.strerror}", 2) from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CommandFailed(f"{label} is not valid JSON: {exc}", 2) from exc
    return data


def import_warnings(data: dict[str, Any]) -> list[str]:
    out = []
    for section in UNSUPPORTED:
        n = len(data.get(section) or [])
        if n:
            out.append(f"ignored {_count(n, section)} (not supported by roost)")
    for section in ("exchanges", "queues"):
        names = [e["name"] for e in data.get(section) or [] if e.get("durable") is False]
        if names:
            shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
            out.append(
                f"skipped {_count(len(names), 'non-durable ' + section)} "
                f"(only durable ones are stored): {shown}"
            )
    return out


def summary(data: dict[str, Any]) -> str:
    return ", ".join(_count(len(data.get(s) or []), s) for s in SECTIONS)


_SINGULAR = {"policies": "policy", "parameters": "parameter"}


def _count(n: int, plural: str) -> str:
    """``_count(1, "queues")`` is "1 queue"; names are given in the plural."""
    plural = plural.replace("_", " ")
    if n != 1:
        return f"{n} {plural}"
    return f"1 {_SINGULAR.get(plural, plural.removesuffix('s'))}"
