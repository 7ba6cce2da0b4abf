-- pobox schema 101: per-user POP3 access and download cap in pobox's users table.
--
-- nopop3: the user may not log in by POP3 (the login gets -ERR [SYS/PERM]); mail is still
-- delivered. pop3_daily_download_bytes: octets of mail the user may download per UTC day
-- (NULL: the configured pop3_daily_download_bytes; 0: no cap). Custom user queries name
-- columns of these names instead.
ALTER TABLE {schema}.users
    ADD COLUMN nopop3 boolean NOT NULL DEFAULT false,
    ADD COLUMN pop3_daily_download_bytes bigint,
    ADD CHECK (pop3_daily_download_bytes IS NULL OR pop3_daily_download_bytes >= 0);
