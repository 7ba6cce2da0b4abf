-- pobox schema 1: maildrops, their messages, and message bodies stored once.
--
-- {schema} is replaced by the configured schema name (postgresql_schema), quoted as an
-- identifier. Every table but body and body_chunk is keyed by mailbox first, so that it can
-- be hash-distributed (Citus: distribution column "mailbox") or hash-partitioned by mailbox;
-- body and body_chunk are keyed by digest, and are distributed or partitioned by digest (see
-- README, "PostgreSQL": scaling out).

-- One row per maildrop: the counters that make quota checks, STAT totals and new UIDs cheap.
CREATE TABLE {schema}.mailbox (
    mailbox     text        NOT NULL,
    -- Seconds since the epoch when the maildrop was created: the second half of every UIDL
    -- made here (Dovecot's %08Xu%08Xv), so UIDLs differ from those of a maildrop of the same
    -- name that was deleted and created again.
    uidvalidity bigint      NOT NULL,
    -- The UID the next message gets; never goes back, so UIDLs are never reused.
    next_uid    bigint      NOT NULL DEFAULT 1,
    -- What the maildrop holds: count and stored octets (header + body), kept by every
    -- delivery and UPDATE in the same transaction.
    messages    bigint      NOT NULL DEFAULT 0,
    octets      bigint      NOT NULL DEFAULT 0,
    created     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox),
    CHECK (next_uid > 0 AND messages >= 0 AND octets >= 0)
);

-- One row per message of a maildrop. The listing a POP3 session starts with (STAT, LIST,
-- UIDL) is one scan of the primary key, which carries everything it needs.
CREATE TABLE {schema}.message (
    mailbox   text        NOT NULL,
    uid       bigint      NOT NULL,
    -- RFC 1939 §7 unique-id, fixed at delivery (or kept from the source at import).
    uidl      text        NOT NULL,
    -- Octets on the POP3 wire (every line ending CRLF), fixed at delivery, never recomputed.
    wire_size bigint      NOT NULL,
    -- Octets stored: header + body, as the quota counts them.
    size      bigint      NOT NULL,
    -- SHA-256 of the body (body.digest); the per-recipient header lines are kept here.
    digest    bytea       NOT NULL,
    header    bytea       NOT NULL,
    delivered timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox, uid) INCLUDE (wire_size, uidl, digest),
    UNIQUE (mailbox, uidl),
    CHECK (octet_length(uidl) BETWEEN 1 AND 70 AND uidl ~ '^[!-~]+$'),
    CHECK (wire_size >= 0 AND size >= 0 AND octet_length(digest) = 32)
);
-- For the garbage collection of bodies: is a body still used by any message?
CREATE INDEX message_digest ON {schema}.message (digest);

-- A message body, stored once for every message that has it (content-addressed).
CREATE TABLE {schema}.body (
    digest  bytea       NOT NULL,
    size    bigint      NOT NULL,
    chunks  integer     NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (digest),
    CHECK (octet_length(digest) = 32 AND size >= 0 AND chunks >= 0)
);

-- The body's octets in chunks, so that RETR streams a large message a chunk at a time.
CREATE TABLE {schema}.body_chunk (
    digest bytea   NOT NULL,
    seq    integer NOT NULL,
    data   bytea   NOT NULL,
    PRIMARY KEY (digest, seq)
);
