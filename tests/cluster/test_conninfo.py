"""The node's connections are set up to notice a database machine that
vanished without closing its sockets."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from roost.cluster.runtime import conninfo_for_failures


def test_keepalives_and_timeouts_follow_the_node_timeout() -> None:
    url = "postgresql://roost:pw@db1:5432,db2:5433/roost?target_session_attrs=read-write"
    got = conninfo_to_dict(conninfo_for_failures(url, 9))
    assert got["host"] == "db1,db2" and got["port"] == "5432,5433"
    assert got["target_session_attrs"] == "read-write" and got["password"] == "pw"
    assert (got["keepalives"], got["keepalives_idle"], got["keepalives_count"]) == ("1", "3", "3")
    assert got["tcp_user_timeout"] == "9000"
    assert got["connect_timeout"] == "9"


def test_what_the_url_sets_is_kept() -> None:
    url = "postgresql://roost@db/roost?connect_timeout=30&keepalives_idle=60"
    got = conninfo_to_dict(conninfo_for_failures(url, 3))
    assert (got["connect_timeout"], got["keepalives_idle"]) == ("30", "60")
    assert got["tcp_user_timeout"] == "3000"
