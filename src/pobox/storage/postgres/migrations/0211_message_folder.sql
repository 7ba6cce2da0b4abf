-- pobox schema 211: the folder of each message (pop3_folders: Junk merged into the listing).
--
-- Every message is in one folder; 'INBOX' (the default, so existing rows and every delivery
-- that names no folder) is the one POP3 lists unless pop3_folders names more. A message moved
-- between folders keeps its row, so its UID and UIDL: a POP3 client that saw it in Junk does
-- not download it again from the INBOX. Folder names are checked by pobox (pobox.names):
-- printable ASCII, no '/', at most 100 characters; the CHECK repeats the essentials.
-- A constant default makes this ADD COLUMN a catalog change only (no table rewrite).
ALTER TABLE {schema}.message
    ADD COLUMN folder text NOT NULL DEFAULT 'INBOX'
    CHECK (octet_length(folder) BETWEEN 1 AND 100 AND folder ~ '^[ -~]+$' AND folder !~ '/');
-- The messages outside the INBOX, few: the INBOX listing stays an index-only scan of the
-- primary key, less these (an anti-join), instead of visiting every row for its folder.
-- Building it reads the message table once (deliveries wait for it, as for any migration).
CREATE INDEX message_not_inbox ON {schema}.message (mailbox, uid) WHERE folder <> 'INBOX';
