"""What the start-up warning says about listeners that other machines can
reach while the only way in is a loopback-only or well-known account."""

from __future__ import annotations

from collections.abc import Collection

from roost.broker.access import is_loopback
from roost.config import Config


def exposed_listeners(config: Config) -> dict[str, list[str]]:
    """The listeners bound beyond loopback, by address ("" is every
    interface): {"192.0.2.2": ["AMQP", "AMQPS"], "": ["HTTP"]}."""
    listeners = [("AMQP", config.host)]
    if config.tls_cert:
        listeners.append(("AMQPS", config.host))
    if config.http_port != -1:
        scheme = "HTTPS" if config.http_tls_cert else "HTTP"
        listeners.append((scheme, config.http_host or config.host))
    exposed: dict[str, list[str]] = {}
    for protocol, host in listeners:
        if host == "localhost" or (host and is_loopback(host)):
            continue
        exposed.setdefault(host, []).append(protocol)
    return exposed


def exposure_warning(
    config: Config, users: Collection[str], loopback_users: Collection[str]
) -> str | None:
    """The warning to print at start, or None: every listener other
    machines can reach, when guest is the only user (loopback-only, so
    nobody can use them, or open to anyone who knows its password) or when
    loopback-only users exist (who cannot log in there, over AMQP or HTTP);
    and on any listener when there are no users at all."""
    if not users:
        # Possible once every user was deleted: the default user is created
        # only on a brand-new data directory.
        return "there are no users, so nobody can log in; add one with roost ctl add-user"
    exposed = exposed_listeners(config)
    if not exposed:
        return None
    where = " and ".join(
        f"{host or 'all interfaces'} ({', '.join(protocols)})"
        for host, protocols in exposed.items()
    )
    local_only = sorted(u for u in users if u in loopback_users)
    if list(users) == ["guest"]:
        if "guest" in loopback_users:
            why = "guest may only connect from localhost, so remote clients cannot log in"
        else:
            why = "anyone on the network who knows its password can log in"
        return (
            f"listening on {where} and the only user is 'guest': {why}; "
            "create a user of your own (roost ctl) and delete guest"
        )
    if local_only:
        names = ", ".join(f"'{u}'" for u in local_only)
        return (
            f"listening on {where}: {names} may only connect from localhost "
            "(loopback_users), over AMQP and HTTP alike"
        )
    return None
