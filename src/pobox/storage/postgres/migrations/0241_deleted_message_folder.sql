-- pobox schema 241: the folder a kept deleted message was in (pop3_delete_retention with
-- pop3_folders).
--
-- A message deleted over POP3 from a folder other than the INBOX (Junk merged into the
-- listing) is kept with its folder, and `pobox restore` puts it back there (or into the INBOX
-- if the user's pop3_folders no longer lists that folder), under its UIDL. Rows kept before
-- this migration were all INBOX messages: the default says so. A constant default makes
-- this ADD COLUMN a catalog change only (no table rewrite). The CHECK is message.folder's.
ALTER TABLE {schema}.deleted_message
    ADD COLUMN folder text NOT NULL DEFAULT 'INBOX'
    CHECK (octet_length(folder) BETWEEN 1 AND 100 AND folder ~ '^[ -~]+$' AND folder !~ '/');
