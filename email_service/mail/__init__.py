"""Pure mail-format code: MIME parsing, HTML sanitising, IMAP mailbox names and folder roles."""
