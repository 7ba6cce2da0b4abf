-- pobox schema 231: RFC 2449 EXPIRE and LOGIN-DELAY, enforced (pop3_expire_days,
-- pop3_login_delay).
--
-- message.retrieved: seconds since the epoch (pobox's clock) of the message's first RETR;
-- NULL until then. With pop3_expire_days = n, a session's UPDATE deletes the messages first
-- retrieved n days or more before.
ALTER TABLE {schema}.message ADD COLUMN retrieved double precision;

-- users: per-user values (NULL: the configured pop3_expire_days / pop3_login_delay).
-- pop3_expire_days is a number of days or 'never'. Custom user queries name columns of these
-- names instead.
ALTER TABLE {schema}.users
    ADD COLUMN pop3_expire_days text,
    ADD COLUMN pop3_login_delay integer,
    ADD CHECK (pop3_expire_days IS NULL
        OR (pop3_expire_days ~ '^([0-9]+|never)$' AND length(pop3_expire_days) <= 9)),
    ADD CHECK (pop3_login_delay IS NULL OR pop3_login_delay >= 0);

-- The time of each user's last successful login, for LOGIN-DELAY (shared_state =
-- "postgresql"). One row per user, replaced at each login. UNLOGGED like the rest of the
-- cluster state: a crash of PostgreSQL forgets the times, which only lets the next logins
-- in sooner.
CREATE UNLOGGED TABLE {schema}.login_time (
    username text             NOT NULL,
    at       double precision NOT NULL,
    PRIMARY KEY (username)
);
