"""Mail protocol clients (IMAP, POP3) with verified TLS and bounded waits."""
