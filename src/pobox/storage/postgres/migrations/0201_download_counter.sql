-- pobox schema 201: the octets each user downloaded today (pop3_daily_download_bytes).
--
-- One row per user, replaced by the user's first charge of a new UTC day (day: days since
-- the epoch, from pobox's clock). UNLOGGED like the rest of the cluster state: a crash of
-- PostgreSQL resets the day's counts, which only makes the cap lenient for that day.
CREATE UNLOGGED TABLE {schema}.download_counter (
    username text    NOT NULL,
    day      integer NOT NULL,
    octets   bigint  NOT NULL,
    PRIMARY KEY (username),
    CHECK (octets >= 0)
);
