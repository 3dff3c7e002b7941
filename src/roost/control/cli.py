"""``roost ctl``: manage users, vhosts and permissions.

With a broker running on the data directory, the command goes through its
control socket (see ``roost.control.server``) and takes effect at once.
With none, it takes the data directory's lock and edits its definitions
directly, as ``roost definitions import`` does; the next ``roost serve``
starts with the change. Either way the output is the same.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from roost.cli_messages import CommandFailed, say
from roost.config import ConfigError, load_config
from roost.control import runtime_cli
from roost.control.commands import READ_ONLY, ControlError, execute
from roost.control.socket_path import control_socket, reachable
from roost.store import definitions, fsio
from roost.store.datadir import DataDirInUse, DataDirLock, DataDirUnsafe
from roost.store.definitions_cli import load_broker, new_broker

TIMEOUT = 30.0

USAGE = """\
examples:
  roost ctl add-user alice --password-stdin --tags monitoring < secret.txt
  roost ctl add-vhost orders
  roost ctl set-permissions -p orders alice '^alice-.*' '.*' '.*'
  roost ctl list-permissions -p orders --json
  roost ctl list queues -p orders
  roost ctl publish -e amq.direct orders.new '{"id": 1}' --count 1000
  roost ctl get orders --count 5 --requeue
  roost ctl status
  roost ctl export defs.json

The user, vhost and permission commands, export and import work on a
running broker (through the control socket roost.ctl in its data directory,
usable only by the directory's owner) and on a stopped one (editing the data
directory's definitions). list, purge, delete, publish, get and status need
a running broker.
"""


class ControlUnavailable(Exception):
    """No broker answers on the control socket."""


def add_parser(sub: Any) -> None:
    """Add ``ctl`` to the ``roost`` command's sub-parsers."""
    parser = sub.add_parser(
        "ctl",
        help="manage users, vhosts, permissions, queues and exchanges",
        description=(
            "Manage users, virtual hosts, permissions, queues and exchanges, and "
            "inspect a running broker, like rabbitmqctl."
        ),
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", help="the broker's data directory")
    common.add_argument(
        "--config", metavar="FILE", help="TOML configuration file, as for 'roost serve'"
    )
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = parser.add_subparsers(dest="ctl_action", metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", parents=[common]
        )
        return p

    def password_options(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--password", metavar="P", help="the password (visible to ps)")
        group.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )

    p = action("add-user", "add a user")
    p.add_argument("name", metavar="NAME")
    password_options(p)
    p.add_argument("--tags", default="", help="comma-separated tags, e.g. administrator")
    p = action("delete-user", "delete a user and its permissions")
    p.add_argument("name", metavar="NAME")
    p = action("change-password", "set a user's password")
    p.add_argument("name", metavar="NAME")
    password_options(p)
    p = action("set-tags", "replace a user's tags (none given: no tags)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("tags", metavar="TAG", nargs="*")
    action("list-users", "list users and their tags")
    p = action("add-vhost", "add a virtual host")
    p.add_argument("name", metavar="NAME")
    p = action("delete-vhost", "delete a virtual host with its queues, exchanges and messages")
    p.add_argument("name", metavar="NAME")
    action("list-vhosts", "list virtual hosts")
    p = action("set-permissions", "set a user's permissions in a vhost (regular expressions)")
    p.add_argument("-p", "--vhost", default="/", help="the vhost (default: /)")
    for arg in ("user", "configure", "write", "read"):
        p.add_argument(arg, metavar=arg.upper())
    p = action("clear-permissions", "remove a user's permissions in a vhost")
    p.add_argument("-p", "--vhost", default="/", help="the vhost (default: /)")
    p.add_argument("user", metavar="USER")
    p = action("list-permissions", "list the users' permissions in a vhost")
    p.add_argument("-p", "--vhost", default="/", help="the vhost (default: /)")
    runtime_cli.add_actions(action)
    parser.set_defaults(ctl_parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.ctl_action is None:
        args.ctl_parser.print_help(sys.stderr)
        return 2
    command = args.ctl_action.replace("-", "_")
    if command in runtime_cli.ACTIONS:
        return runtime_cli.run(args)
    try:
        config = load_config(args.config, overrides={"data_dir": args.data_dir})
        request_args = _request_args(command, args)
        data_dir = config.resolved_data_dir()
        try:
            result = request(control_socket(data_dir), command, request_args)
        except ControlUnavailable:
            result = _offline(data_dir, command, request_args, config)
    except ConfigError as exc:
        say(str(exc))
        return 2
    except ControlError as exc:
        say(str(exc))
        return 1
    except CommandFailed as exc:
        say(str(exc))
        return exc.code
    _print(command, result, args.json)
    return 0


def request(path: Path, command: str, args: dict[str, Any]) -> Any:
    """Run ``command`` on the broker listening on ``path``. Raises
    ``ControlUnavailable`` if none does, ``ControlError`` if it refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            with reachable(path) as short:
                _check_owner(path, os.lstat(short))
                sock.connect(short)
                _check_peer(path, sock)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise ControlUnavailable(str(exc)) from exc
        except PermissionError as exc:
            raise ControlError(
                f"cannot use the control socket {path}: permission denied "
                "(run as the user owning the data directory)"
            ) from exc
        line = json.dumps({"command": command, "args": args}).encode("utf-8") + b"\n"
        try:
            sock.sendall(line)
            with sock.makefile("rb") as reader:
                answer = reader.readline()
        except TimeoutError as exc:
            raise ControlError(f"the broker did not answer within {TIMEOUT:.0f}s") from exc
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        response = json.loads(answer)
    except ValueError as exc:
        raise ControlError("the broker's answer is not valid JSON") from exc
    if not isinstance(response, dict):
        raise ControlError("the broker's answer is not a JSON object")
    if not response.get("ok"):
        raise ControlError(str(response.get("error") or "the broker refused the command"))
    return response.get("result")


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Refuse a socket another user could have put there: commands carry
    passwords, and answers are trusted."""
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket; refusing to use it")
    if st.st_uid != os.geteuid():
        raise ControlError(
            f"the control socket {path} is owned by uid {st.st_uid}, not by uid "
            f"{os.geteuid()} running roost ctl; refusing to use it"
        )


def _check_peer(path: Path, sock: socket.socket) -> None:
    """The process listening must run as this user too (Linux tells)."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:  # pragma: no cover - not Linux
        return
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
    if uid != os.geteuid():
        raise ControlError(
            f"the broker listening on {path} runs as uid {uid}, not as uid "
            f"{os.geteuid()} running roost ctl; refusing to use it"
        )


def _offline(data_dir: Path, command: str, args: dict[str, Any], config: Any) -> Any:
    """Run ``command`` on the stopped broker's definitions."""
    if config.cluster:
        # A cluster node's data directory holds no definitions: an edit
        # there would be silently ignored.
        raise ControlError(
            "no roost is running on this data directory, and in cluster mode the "
            "definitions are in the cluster's database: run the command where a node "
            "runs (or use the management API of any node)"
        )
    if not data_dir.is_dir():
        if command in READ_ONLY:
            # Nothing stored yet: what the first ``roost serve`` would start with.
            return execute(new_broker(config), command, args)
        try:
            fsio.makedirs(data_dir)  # never group-writable, whatever the umask
        except OSError as exc:
            raise CommandFailed(
                f"cannot create data directory {data_dir}: {exc.strerror}", 1
            ) from exc
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        # A broker holds the directory yet did not answer on the socket.
        raise ControlError(f"{exc}, but its control socket does not answer") from exc
    except DataDirUnsafe as exc:
        raise ControlError(str(exc)) from exc
    except OSError as exc:
        raise ControlError(f"cannot use data directory {data_dir}: {exc.strerror}") from exc
    try:
        broker = load_broker(config, data_dir, writing=command not in READ_ONLY)
        result = execute(broker, command, args)
        if command not in READ_ONLY:
            path = data_dir / definitions.FILENAME
            content = definitions.encode(definitions.export(broker, include_internal=True))
            try:
                definitions.write_atomic(path, content)
            except OSError as exc:
                raise CommandFailed(f"cannot write {path}: {exc.strerror or exc}", 1) from exc
    finally:
        lock.release()
    return result


def _request_args(command: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "user", "vhost", "configure", "write", "read"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    if command in ("add_user", "change_password"):
        out["password"] = _password(args)
    if command == "add_user":
        out["tags"] = [args.tags]
    elif command == "set_tags":
        out["tags"] = args.tags
    return out


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise ControlError("no password on standard input")
        return line.rstrip("\r\n")
    if sys.stdin.isatty():
        try:
            return getpass.getpass("Password: ")
        except (EOFError, KeyboardInterrupt) as exc:
            raise ControlError("no password given") from exc
    raise ControlError("give the password with --password or --password-stdin")


# -- output ---------------------------------------------------------------

_COLUMNS = {
    "list_users": ("name", "tags"),
    "list_vhosts": ("name",),
    "list_permissions": ("user", "configure", "write", "read"),
}


def _print(command: str, result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    elif command in _COLUMNS:
        print(table(_COLUMNS[command], result), end="")
    else:
        print(result["message"])


def table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    cells = [list(columns)] + [
        [", ".join(v) if isinstance(v := row[c], list) else str(v) for c in columns] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"
