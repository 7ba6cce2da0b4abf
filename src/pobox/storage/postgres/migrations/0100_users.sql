-- pobox schema 100: users, for userdb = "postgresql" (numbers from 0100 on are the userdb's).
--
-- {schema} is replaced by the configured schema name (postgresql_schema), quoted as an
-- identifier. The table is keyed by username, the same value the store uses as its mailbox
-- key, so users and their maildrops can be distributed by the same hash (Citus: distribution
-- column "username", colocated with mailbox) or hash-partitioned by username.

CREATE TABLE {schema}.users (
    username       text        NOT NULL,
    -- The password as "SCHEME in braces, then data", as in a passwd-file (pobox.auth.schemes); empty: nobody can log in
    -- (the user still receives mail).
    password       text        NOT NULL DEFAULT '',
    -- Owner of the user's mail on a Maildir store (NULL: the configured default).
    uid            integer,
    gid            integer,
    home           text,
    -- Per-user mail location (Dovecot's userdb_mail); NULL: mail_location.
    mail           text,
    -- The user's own quota (NULL: the configured quota_bytes/quota_messages; 0: none).
    quota_bytes    bigint,
    quota_messages bigint,
    -- Receives mail but may not log in (Dovecot's nologin).
    nologin        boolean     NOT NULL DEFAULT false,
    created        timestamptz NOT NULL DEFAULT now(),
    changed        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (username),
    CHECK (octet_length(username) BETWEEN 1 AND 255),
    CHECK (uid IS NULL OR uid >= 0),
    CHECK (gid IS NULL OR gid >= 0),
    CHECK (quota_bytes IS NULL OR quota_bytes >= 0),
    CHECK (quota_messages IS NULL OR quota_messages >= 0)
);

-- Every change of a user tells every pobox node to forget what it cached about that user
-- (channel pobox_users, payload the username): pobox user on any node, or plain SQL.
CREATE FUNCTION {schema}.users_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_catalog.pg_notify('pobox_users', OLD.username);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_catalog.pg_notify('pobox_users', NEW.username);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON {schema}.users
    FOR EACH ROW EXECUTE FUNCTION {schema}.users_changed();
