-- pobox schema 200: cluster-wide state (numbers from 0200 on are pobox.state.postgres's):
-- failed-login counters, the nodes' leases and the session registry.
--
-- {schema} is replaced by the configured schema name (postgresql_schema), quoted as an
-- identifier. Times are seconds since the epoch (double precision) that pobox passes in from
-- its own clock, never now(): the same contract tests run here with a clock moved by hand.
--
-- The tables are UNLOGGED: this state expires by itself within minutes, so it is not worth
-- WAL traffic. A crash of PostgreSQL (or a failover to a standby) empties them, which only
-- ever makes the policies more lenient for a while: the nodes register again with their next
-- heartbeat, their sessions end and start anew.

-- Failed logins per key ("ip:203.0.113.7", "user:alice"): the count since first_at, forgotten
-- auth_failure_window seconds after first_at. last_at orders eviction when the table is over
-- its cap (the keys idle longest go first).
CREATE UNLOGGED TABLE {schema}.failure_counter (
    key      text             NOT NULL,
    first_at double precision NOT NULL,
    last_at  double precision NOT NULL,
    count    integer          NOT NULL,
    PRIMARY KEY (key)
);
CREATE INDEX failure_counter_first_at ON {schema}.failure_counter (first_at);
CREATE INDEX failure_counter_last_at ON {schema}.failure_counter (last_at);

-- Every pobox node (node_name) and the last time it renewed its lease. instance: a random
-- token of the process that renewed it last (two live processes with one name alternate it,
-- which is how a node notices that its name is taken).
CREATE UNLOGGED TABLE {schema}.cluster_node (
    name      text             NOT NULL,
    instance  text             NOT NULL,
    started   double precision NOT NULL,
    last_seen double precision NOT NULL,
    PRIMARY KEY (name)
);

-- The logged-in POP3 sessions of every node; a session counts only while its node's lease
-- runs. kicked: someone asked the node to end it (the node sees it at its next heartbeat).
CREATE UNLOGGED TABLE {schema}.cluster_session (
    id        text             NOT NULL,
    node      text             NOT NULL,
    username  text             NOT NULL,
    rip       text             NOT NULL,
    since     double precision NOT NULL,
    tls       boolean          NOT NULL,
    mechanism text             NOT NULL,
    kicked    boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (id)
);
CREATE INDEX cluster_session_user ON {schema}.cluster_session (username, rip);
CREATE INDEX cluster_session_node ON {schema}.cluster_session (node);
