"""``roost ctl`` actions on a running broker's contents: list, purge,
delete, publish, get, status; and export/import of definitions, which also
work on a stopped broker's data directory (as ``roost definitions`` does).

Long operations (a bulk ``publish --count``, a large ``import``) are sent
in batches and show a progress bar on standard error when it is a terminal.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from roost.cli_messages import CommandFailed, say
from roost.config import Config, ConfigError, load_config
from roost.control import cli as ctl
from roost.control.commands import ControlError
from roost.control.runtime import MAX_BATCH
from roost.control.socket_path import control_socket
from roost.store import definitions_cli, definitions_import
from roost.store.definitions_import import SECTIONS

LIST_KINDS = ("queues", "exchanges", "bindings", "connections", "consumers", "channels")
ACTIONS = frozenset({"list", "purge", "delete", "publish", "get", "status", "export", "import"})
# Definitions entries per import request: a progress step each.
IMPORT_BATCH = 500

_COLUMNS = {
    "queues": ("name", "messages", "ready", "unacked", "consumers", "durable"),
    "exchanges": ("name", "type", "durable", "auto_delete", "internal"),
    "bindings": ("source", "destination", "destination_type", "routing_key"),
    "connections": ("peer", "user", "vhost", "channels", "tls", "client"),
    "consumers": ("queue", "tag", "connection", "channel", "ack_required", "prefetch"),
    "channels": ("connection", "number", "user", "consumers", "unacked", "prefetch"),
    "get": ("routing_key", "exchange", "redelivered", "payload_bytes", "payload"),
}


def add_actions(action: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add this module's actions, made by ``action(name, help)``."""

    def vhost(p: argparse.ArgumentParser) -> None:
        p.add_argument("-p", "--vhost", default="/", help="the vhost (default: /)")

    p = action("list", "list a running broker's queues, exchanges, bindings, connections, ...")
    p.add_argument("kind", choices=LIST_KINDS, metavar="|".join(LIST_KINDS))
    vhost(p)
    p = action("purge", "remove every ready message from a queue")
    p.add_argument("name", metavar="QUEUE")
    vhost(p)
    p = action("delete", "delete a queue (with its messages) or an exchange")
    p.add_argument("delete_kind", choices=("queue", "exchange"), metavar="queue|exchange")
    p.add_argument("name", metavar="NAME")
    vhost(p)
    p = action("publish", "publish a message (BODY, --file, or standard input)")
    p.add_argument("-e", "--exchange", default="", help="the exchange (default: the default one)")
    p.add_argument("routing_key", metavar="ROUTING_KEY")
    p.add_argument("body", metavar="BODY", nargs="?", help="the message body")
    p.add_argument("--file", metavar="F", help="read the body from file F")
    p.add_argument("--count", type=int, default=1, help="publish it N times (default: 1)")
    p.add_argument("--persistent", action="store_true", help="delivery mode 2 (persistent)")
    vhost(p)
    p = action("get", "fetch messages from a queue (acknowledged unless --requeue)")
    p.add_argument("name", metavar="QUEUE")
    p.add_argument("--count", type=int, default=1, help="at most N messages (default: 1)")
    p.add_argument("--requeue", action="store_true", help="put them back in the queue")
    vhost(p)
    action("status", "show a running broker's status")
    p = action("export", "write the definitions to FILE (- for standard output)")
    p.add_argument("file", metavar="FILE")
    p = action("import", "merge the definitions in FILE (- for standard input)")
    p.add_argument("file", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    action = args.ctl_action
    try:
        config = load_config(args.config, overrides={"data_dir": args.data_dir})
        data_dir = config.resolved_data_dir()
        path = control_socket(data_dir)
        if action in ("export", "import"):
            return _definitions(action, args, config, path)
        try:
            return _online(action, args, path)
        except ctl.ControlUnavailable:
            say(f"no broker running on {data_dir}")
            return 1
    except ConfigError as exc:
        say(str(exc))
        return 2
    except ControlError as exc:
        say(str(exc))
        return 1
    except CommandFailed as exc:
        say(str(exc))
        return exc.code


def _vhost_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"vhost": args.vhost}


def _online(action: str, args: argparse.Namespace, path: Path) -> int:
    if action == "list":
        result = ctl.request(path, f"list_{args.kind}", _vhost_args(args))
        columns = _COLUMNS[args.kind]
        if args.kind in ("connections", "channels", "consumers") and any(
            "node" in row for row in result
        ):
            columns = ("node", *columns)  # a cluster's
        _output(columns, result, args.json)
    elif action == "status":
        _status(ctl.request(path, "status", {}), args.json)
    elif action in ("purge", "delete"):
        command = action if action == "purge" else f"delete_{args.delete_kind}"
        result = ctl.request(path, command, {**_vhost_args(args), "name": args.name})
        print(json.dumps(result, indent=2) if args.json else result["message"])
    elif action == "get":
        if args.count < 1:
            raise ControlError("--count must be at least 1")
        rows: list[dict[str, Any]] = []
        # --requeue fetches all in one request: requeued between requests,
        # the same messages would come back again.
        batch = args.count if args.requeue else MAX_BATCH
        while len(rows) < args.count:
            n = min(batch, args.count - len(rows))
            request = {**_vhost_args(args), "name": args.name, "count": n, "requeue": args.requeue}
            got = ctl.request(path, "get", request)
            rows += got
            if len(got) < n:
                break
        _output(_COLUMNS["get"], rows, args.json)
    else:
        _publish(args, path)
    return 0


def _publish(args: argparse.Namespace, path: Path) -> None:
    if args.count < 1:
        raise ControlError("--count must be at least 1")
    if args.body is not None and args.file is not None:
        raise ControlError("give the body either as an argument or with --file, not both")
    if args.body is not None:
        body = args.body.encode("utf-8")
    elif args.file is not None:
        try:
            body = Path(args.file).read_bytes()
        except OSError as exc:
            raise ControlError(f"cannot read {args.file}: {exc.strerror}") from exc
    else:
        body = sys.stdin.buffer.read()
    request = {
        **_vhost_args(args),
        "exchange": args.exchange,
        "routing_key": args.routing_key,
        "body_base64": base64.b64encode(body).decode("ascii"),
        "persistent": args.persistent,
    }
    done = routed = 0
    bar = Progress("publishing", args.count)
    while done < args.count:
        n = min(MAX_BATCH, args.count - done)
        result = ctl.request(path, "publish", {**request, "count": n})
        done += n
        routed += int(result["routed"])
        bar.update(done)
    bar.finish()
    if args.json:
        print(json.dumps({"published": done, "routed": routed}, indent=2))
    else:
        print(f"published {done} message(s), {routed} routed")


def _definitions(action: str, args: argparse.Namespace, config: Config, path: Path) -> int:
    if action == "export":
        try:
            data = ctl.request(path, "export_definitions", {})
        except ctl.ControlUnavailable:
            definitions_cli.export_definitions(config, args.file)
            return 0
        content = json.dumps(data, indent=2) + "\n"
        if args.file == "-":
            sys.stdout.write(content)
        else:
            try:
                # Owner-only: the file holds password hashes.
                fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(content)
            except OSError as exc:
                raise CommandFailed(f"cannot write {args.file}: {exc.strerror}", 1) from exc
        say(f"exported {definitions_cli.summary(data)} from the running broker")
        return 0
    data = definitions_cli.read_definitions(args.file)
    label = "standard input" if args.file == "-" else args.file
    # All of it before the first batch: the broker checks each batch too,
    # but a batch it refused would leave the ones before it imported.
    try:
        data = definitions_import.validated(data)
    except definitions_import.ImportRefused as exc:
        raise CommandFailed(f"{label} is {exc}", 2) from exc
    batches = _import_batches(data)
    try:
        first = ctl.request(path, "import_definitions", {"definitions": batches[0]})
    except ctl.ControlUnavailable:
        # No broker: edit the stopped data directory, as `roost definitions import`.
        definitions_cli.import_data(config, data, label)
        return 0
    problems: list[str] = first["problems"]
    total = sum(_entries(b) for b in batches)
    bar = Progress("importing", total)
    done = _entries(batches[0])
    bar.update(done)
    for batch in batches[1:]:
        problems += ctl.request(path, "import_definitions", {"definitions": batch})["problems"]
        done += _entries(batch)
        bar.update(done)
    bar.finish()
    say(f"imported {definitions_cli.summary(data)} from {label} into the running broker")
    for warning in definitions_cli.import_warnings(data):
        say(f"warning: {warning}")
    for problem in problems:
        say(f"problem: {problem}")
    return 1 if problems else 0


def _entries(batch: dict[str, Any]) -> int:
    return sum(len(batch.get(s) or []) for s in SECTIONS)


def _import_batches(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``data`` cut into requests of at most ``IMPORT_BATCH`` entries, in
    the order ``apply`` needs (users, vhosts, ... bindings last)."""
    # Each batch has to be definitions on its own: the first one carries
    # every section ``data`` has, even if all of them are empty.
    batches: list[dict[str, Any]] = [{s: [] for s in SECTIONS if s in data}]
    size = 0
    for section in SECTIONS:
        for entry in data.get(section) or []:
            if size == IMPORT_BATCH:
                batches.append({})
                size = 0
            batches[-1].setdefault(section, []).append(entry)
            size += 1
    return batches


# -- output ---------------------------------------------------------------


def _output(columns: tuple[str, ...], rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(ctl.table(columns, rows), end="")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    listeners = ", ".join(
        f"{x['protocol']} {x['ip_address']}:{x['port']}" for x in status["listeners"]
    )
    lines = [
        ("version", status["version"]),
        ("pid", status["pid"]),
        ("uptime", f"{status['uptime_s']} s"),
        ("listeners", listeners or "none"),
        ("connections", status["connections"]),
        ("vhosts", status["vhosts"]),
        ("queues", status["queues"]),
        (
            "messages",
            f"{status['messages']} ({status['messages_ready']} ready, "
            f"{status['messages_unacked']} unacknowledged)",
        ),
        ("memory (RSS)", _size(status["memory_rss"])),
        ("alarms", ", ".join(status["alarms"]) or "none"),
        ("data directory", status["data_dir"]),
        ("store size", _size(status["store_bytes"])),
    ]
    if "nodes" in status:  # a cluster node's
        lines[1:1] = [
            ("cluster", status["cluster_name"]),
            ("nodes", ", ".join(status["nodes"])),
            ("cluster connections", status["cluster_connections"]),
        ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


class Progress:
    """A progress bar on standard error, drawn only when it is a terminal."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.shown = self.stream.isatty() and total > 1
        self.drawn = False

    def update(self, done: int) -> None:
        if not self.shown:
            return
        width = 30
        filled = width * done // self.total
        pct = 100 * done // self.total
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {pct:3d}% {done}/{self.total}"
        )
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
