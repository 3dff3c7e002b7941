"""The cluster's tables in PostgreSQL, created and migrated automatically.

Every node runs :func:`migrate` at start: under a transaction-scoped
advisory lock (so nodes starting together take turns) it applies, in
order, each migration whose version is not yet in ``roost_schema``, each in
the same transaction as its row there. A database migrated by a newer roost
(a version this one does not know) is refused: an older node must not write
rows a newer schema means differently.

Migrations are append-only: never edit one that was released, add the next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

# pg_advisory_xact_lock key: "roost" in ASCII.
MIGRATION_LOCK = 0x726F6F7374

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "nodes, definitions and messages",
        """
-- One row per incarnation of a node: a node that restarts, or that wakes
-- from a pause after it was declared dead, registers again and gets a new
-- epoch. Every claim and ack names the epoch it was made under (fencing).
CREATE TABLE roost_nodes (
    epoch         bigserial PRIMARY KEY,
    name          text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    dead          boolean NOT NULL DEFAULT false,
    amqp_address  text NOT NULL DEFAULT '',
    http_address  text NOT NULL DEFAULT ''
);
CREATE INDEX roost_nodes_alive ON roost_nodes (name) WHERE NOT dead;

-- Definitions, in RabbitMQ's model. Field tables (arguments) are stored in
-- AMQP's own encoding, so their types survive (a long stays a long).
CREATE TABLE roost_vhosts (
    name         text PRIMARY KEY,
    description  text NOT NULL DEFAULT '',
    tags         text[] NOT NULL DEFAULT '{}'
);
CREATE TABLE roost_users (
    name               text PRIMARY KEY,
    password_hash      text NOT NULL DEFAULT '',
    hashing_algorithm  text NOT NULL DEFAULT '',
    tags               text[] NOT NULL DEFAULT '{}'
);
CREATE TABLE roost_permissions (
    username   text NOT NULL REFERENCES roost_users (name) ON DELETE CASCADE,
    vhost      text NOT NULL REFERENCES roost_vhosts (name) ON DELETE CASCADE,
    configure  text NOT NULL,
    write      text NOT NULL,
    read       text NOT NULL,
    PRIMARY KEY (username, vhost)
);
CREATE TABLE roost_exchanges (
    vhost        text NOT NULL REFERENCES roost_vhosts (name) ON DELETE CASCADE,
    name         text NOT NULL,
    type         text NOT NULL,
    durable      boolean NOT NULL,
    auto_delete  boolean NOT NULL,
    internal     boolean NOT NULL,
    arguments    bytea NOT NULL DEFAULT '\\x',
    PRIMARY KEY (vhost, name)
);
-- A queue's id is the key of its messages. An exclusive queue names the
-- node epoch and connection that own it; it goes when that epoch is dead.
CREATE TABLE roost_queues (
    id               bigserial PRIMARY KEY,
    vhost            text NOT NULL REFERENCES roost_vhosts (name) ON DELETE CASCADE,
    name             text NOT NULL,
    durable          boolean NOT NULL,
    auto_delete      boolean NOT NULL,
    arguments        bytea NOT NULL DEFAULT '\\x',
    owner_epoch      bigint REFERENCES roost_nodes (epoch),
    owner_connection text,
    UNIQUE (vhost, name)
);
CREATE TABLE roost_bindings (
    vhost             text NOT NULL REFERENCES roost_vhosts (name) ON DELETE CASCADE,
    source            text NOT NULL,
    destination       text NOT NULL,
    destination_type  text NOT NULL,
    routing_key       text NOT NULL,
    arguments         bytea NOT NULL DEFAULT '\\x',
    PRIMARY KEY (vhost, source, destination_type, destination, routing_key, arguments)
);

-- One row per message per queue it was routed to. Ready rows have no
-- owner; a claimed row is held by the node epoch delivering it until it
-- is acked (deleted) or released (owner back to NULL). Expiry is wall-clock
-- milliseconds, as the broker's queue entries keep it (no conversion on
-- the publish path). See roost.cluster.message_writer and claims.
CREATE TABLE roost_messages (
    id              bigserial PRIMARY KEY,
    queue_id        bigint NOT NULL REFERENCES roost_queues (id) ON DELETE CASCADE,
    priority        smallint NOT NULL DEFAULT 0,
    exchange        text NOT NULL,
    routing_key     text NOT NULL,
    properties      bytea NOT NULL,
    body            bytea NOT NULL,
    published_at    timestamptz NOT NULL DEFAULT now(),
    expires_ms      bigint,
    redelivered     boolean NOT NULL DEFAULT false,
    delivery_count  integer NOT NULL DEFAULT 0,
    owner           bigint
) WITH (
    -- A queue table turns over all its rows, over and over: vacuum (and
    -- analyze) after 1% of it changed, not the default 20%, and without
    -- the cost-based pauses, so dead row versions do not pile up in front
    -- of the ready index's head.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
-- Claims read the head of a queue's ready rows in delivery order.
CREATE INDEX roost_messages_ready ON roost_messages (queue_id, priority DESC, id)
    WHERE owner IS NULL;
-- Releasing a dead node's rows finds them by owner.
CREATE INDEX roost_messages_owned ON roost_messages (owner) WHERE owner IS NOT NULL;
-- The expiry sweep finds ready rows past their TTL that no consumer claims.
CREATE INDEX roost_messages_expiring ON roost_messages (expires_ms)
    WHERE owner IS NULL AND expires_ms IS NOT NULL;

-- Transient messages (and every message of a non-durable queue): the same
-- shape without the write-ahead log. PostgreSQL empties an unlogged table
-- after its own crash, never after a roost node's. The id default is the
-- same sequence as roost_messages' (LIKE copies the default), so ids are
-- unique across both tables and one order merges them. LIKE copies no
-- foreign key: it is declared again so a deleted queue takes these too.
CREATE UNLOGGED TABLE roost_transient_messages (
    LIKE roost_messages INCLUDING ALL,
    FOREIGN KEY (queue_id) REFERENCES roost_queues (id) ON DELETE CASCADE
) WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
""",
    ),
    (
        2,
        "dead-node cleanup, definitions version and change log",
        """
-- Set once a dead node's cleanup (its exclusive queues, the message
-- layer's release of its claims) has committed: the sweep that finds a
-- dead node without it does the cleanup, exactly one node at a time.
ALTER TABLE roost_nodes ADD COLUMN cleaned_at timestamptz;

-- One row. Every change of definitions bumps definitions_version in its
-- transaction: the row lock orders definition writes cluster-wide, and a
-- node that reloads knows which version it has caught up with.
-- changes_pruned_through: the change log holds every change after it.
CREATE TABLE roost_cluster (
    singleton               boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    definitions_version     bigint NOT NULL DEFAULT 0,
    changes_pruned_through  bigint NOT NULL DEFAULT 0
);
INSERT INTO roost_cluster DEFAULT VALUES;

-- What each definitions write touched (roost.cluster.changes): a node
-- catching up fetches those rows only.
CREATE TABLE roost_definition_changes (
    version  bigint NOT NULL,
    scope    text[] NOT NULL
);
CREATE INDEX roost_definition_changes_version ON roost_definition_changes (version);
""",
    ),
    (
        3,
        "consumer registry and queue use",
        """
-- Every consumer of every node (roost.cluster.consumers). The id is the
-- cluster's registration order (single active consumer: the lowest is
-- active); rows of one queue are inserted under its queue row's lock, so
-- ids follow commit order. A dead incarnation's rows go in its cleanup.
CREATE TABLE roost_consumers (
    id         bigserial PRIMARY KEY,
    queue_id   bigint NOT NULL REFERENCES roost_queues (id) ON DELETE CASCADE,
    epoch      bigint NOT NULL,
    local_id   bigint NOT NULL,
    tag        text NOT NULL,
    priority   integer NOT NULL DEFAULT 0,
    exclusive  boolean NOT NULL DEFAULT false,
    -- Whether the consumer can take a message now (consumer priorities:
    -- lower-priority consumers elsewhere wait while it can).
    has_room   boolean NOT NULL DEFAULT true,
    UNIQUE (epoch, local_id)
);
CREATE INDEX roost_consumers_queue ON roost_consumers (queue_id, id);

-- When each queue with x-expires was last used (declared, consumed
-- from, read) on any node, by PostgreSQL's clock.
CREATE TABLE roost_queue_use (
    queue_id  bigint PRIMARY KEY REFERENCES roost_queues (id) ON DELETE CASCADE,
    used_at   timestamptz NOT NULL DEFAULT now()
);
""",
    ),
    (
        4,
        "delayed messages and deduplication keys",
        """
-- Messages held by a delayed-message exchange until due_ms (PostgreSQL's
-- clock, ms since the epoch): routed through their exchange by whichever
-- node claims them first (owner, fenced like a message claim), in the same
-- transaction that deletes the held row. Persistent messages on durable
-- exchanges are logged; the rest go to the unlogged twin, as messages do.
-- cc keeps the CC and BCC routing keys (BCC is not in the headers).
-- A row with a queue_id is a message of that queue waiting out its retry
-- delay (x-retry-delay), not routed but put back as the row message_id
-- it was, with its delivery count (vhost is NULL: no exchange to check).
CREATE TABLE roost_delayed (
    id              bigserial PRIMARY KEY,
    vhost           text,
    exchange        text NOT NULL,
    routing_key     text NOT NULL,
    properties      bytea NOT NULL,
    body            bytea NOT NULL,
    cc              text[] NOT NULL DEFAULT '{}',
    due_ms          bigint NOT NULL,
    owner           bigint,
    queue_id        bigint REFERENCES roost_queues (id) ON DELETE CASCADE,
    message_id      bigint,
    priority        smallint NOT NULL DEFAULT 0,
    expires_ms      bigint,
    delivery_count  integer NOT NULL DEFAULT 0,
    published_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (vhost, exchange) REFERENCES roost_exchanges (vhost, name) ON DELETE CASCADE
);
CREATE INDEX roost_delayed_due ON roost_delayed (due_ms, id) WHERE owner IS NULL;
CREATE INDEX roost_delayed_owned ON roost_delayed (owner) WHERE owner IS NOT NULL;
CREATE UNLOGGED TABLE roost_transient_delayed (
    LIKE roost_delayed INCLUDING ALL,
    FOREIGN KEY (vhost, exchange) REFERENCES roost_exchanges (vhost, name) ON DELETE CASCADE,
    FOREIGN KEY (queue_id) REFERENCES roost_queues (id) ON DELETE CASCADE
);

-- Deduplication caches, cluster-wide: one row per key seen by a queue
-- (scope 'q<id>') or an exchange (scope 'x<vhost length>:<vhost><name>').
-- A publish's rows are written only if its keys were new (inserted, or
-- their row had expired) in the same transaction. seq orders a scope's
-- keys for the cache-size limit (the oldest go first).
CREATE TABLE roost_dedup_keys (
    scope       text NOT NULL,
    key         text NOT NULL,
    seq         bigserial NOT NULL,
    expires_at  timestamptz,
    queue_id    bigint REFERENCES roost_queues (id) ON DELETE CASCADE,
    PRIMARY KEY (scope, key)
);
CREATE INDEX roost_dedup_keys_order ON roost_dedup_keys (scope, seq);
CREATE INDEX roost_dedup_keys_expiry ON roost_dedup_keys (expires_at)
    WHERE expires_at IS NOT NULL;
""",
    ),
    (
        5,
        "non-durable queues' home node, cluster name, nodes' published views",
        """
-- The incarnation that declared a non-durable queue: the queue goes when
-- that incarnation is declared dead or leaves, as a non-durable queue goes
-- with its node in RabbitMQ. No foreign key: dead incarnations' rows are
-- pruned, and a queue written by a fenced node after its cleanup is found
-- by the sweep as an orphan (roost.cluster.node_views).
ALTER TABLE roost_queues ADD COLUMN home_epoch bigint;
CREATE INDEX roost_queues_home ON roost_queues (home_epoch) WHERE home_epoch IS NOT NULL;

-- Set by the first node to register: /api/overview's cluster_name.
ALTER TABLE roost_cluster ADD COLUMN cluster_name text NOT NULL DEFAULT '';

-- What each live node publishes every few seconds for the management API
-- of the others: its connections, channels and consumers (as the API shows
-- them), its per-queue figures and message counters. Unlogged: it is
-- rewritten all the time and worth nothing after a PostgreSQL crash.
CREATE UNLOGGED TABLE roost_node_views (
    epoch        bigint PRIMARY KEY,
    taken_at     timestamptz NOT NULL DEFAULT now(),
    connections  jsonb NOT NULL DEFAULT '[]',
    channels     jsonb NOT NULL DEFAULT '[]',
    consumers    jsonb NOT NULL DEFAULT '[]',
    queues       jsonb NOT NULL DEFAULT '[]',
    stats        jsonb NOT NULL DEFAULT '{}'
);
""",
    ),
    (
        6,
        "exact ready counts of length-limited queues, direct reply-to relay",
        """
-- Ready rows (owner IS NULL) and their body bytes, per queue and table,
-- kept only for queues with x-max-length / x-max-length-bytes: created by
-- the first batch publishing to such a queue, updated by every statement
-- that makes rows of it ready or not. A batch publishing to the queue
-- locks the row, so publishes of every node are decided against one exact
-- count. (roost.cluster.queue_limits)
CREATE TABLE roost_queue_counts (
    queue_id  bigint PRIMARY KEY REFERENCES roost_queues (id) ON DELETE CASCADE,
    ready     bigint NOT NULL,
    bytes     bigint NOT NULL
);
-- The counts of roost_transient_messages, unlogged like it: after
-- PostgreSQL's crash both are empty, and still agree.
CREATE UNLOGGED TABLE roost_transient_queue_counts (
    queue_id  bigint PRIMARY KEY REFERENCES roost_queues (id) ON DELETE CASCADE,
    ready     bigint NOT NULL,
    bytes     bigint NOT NULL
);

-- Direct reply-to replies too large for a NOTIFY payload, on their way to
-- the node (epoch) of the requester. (roost.cluster.reply_relay)
CREATE UNLOGGED TABLE roost_replies (
    id          bigserial PRIMARY KEY,
    epoch       bigint NOT NULL,
    vhost       text NOT NULL,
    key         text NOT NULL,
    properties  bytea NOT NULL,
    body        bytea NOT NULL
);
CREATE INDEX roost_replies_epoch ON roost_replies (epoch);
""",
    ),
]

LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer roost."""


def migrate(conn: psycopg.Connection[object]) -> int:
    """Bring the schema up to :data:`LATEST`; returns the version found
    before. ``conn`` must not be in a transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS roost_schema ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM roost_schema").fetchone()
        found = int(row[0]) if row else 0  # type: ignore[index]
        if found > LATEST:
            raise SchemaTooNew(
                f"the database's roost schema is version {found}, newer than this "
                f"roost's {LATEST}: upgrade this node"
            )
        for version, description, sql in MIGRATIONS:
            if version > found:
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO roost_schema (version, description) VALUES (%s, %s)",
                    (version, description),
                )
    return found
