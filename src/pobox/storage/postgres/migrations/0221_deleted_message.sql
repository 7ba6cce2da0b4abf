-- pobox schema 221: deleted mail kept for restore (pop3_delete_retention).
--
-- With a retention set, the UPDATE that deletes messages over POP3 moves their rows here, in
-- the same transaction (and behind the same lock check) as the DELETE from message: POP3 never
-- sees them (every listing reads message only), the maildrop's counters, and so the quota, no
-- longer count them, and their bodies stay, because the garbage collection of bodies counts
-- the rows here as users of a body as it counts those of message. `pobox restore` moves them
-- back under new UIDs with their UIDL and wire size; they are purged (and their bodies freed)
-- after the retention, at the maildrop's next UPDATE or by `pobox restore --purge`.
CREATE TABLE {schema}.deleted_message (
    mailbox   text        NOT NULL,
    -- A row of its own, whatever the message's UID was (a maildrop made anew reuses UIDs).
    id        bigint      GENERATED ALWAYS AS IDENTITY,
    uid       bigint      NOT NULL,
    uidl      text        NOT NULL,
    wire_size bigint      NOT NULL,
    size      bigint      NOT NULL,
    digest    bytea       NOT NULL,
    header    bytea       NOT NULL,
    delivered timestamptz NOT NULL,
    -- When it was deleted, from pobox's clock.
    deleted   timestamptz NOT NULL,
    PRIMARY KEY (mailbox, id),
    CHECK (octet_length(uidl) BETWEEN 1 AND 70 AND uidl ~ '^[!-~]+$'),
    CHECK (wire_size >= 0 AND size >= 0 AND octet_length(digest) = 32)
);
-- For the garbage collection of bodies: is a body still used by a kept message?
CREATE INDEX deleted_message_digest ON {schema}.deleted_message (digest);
