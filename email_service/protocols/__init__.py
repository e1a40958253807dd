"""Mail protocol clients (IMAP, POP3, SMTP) with verified TLS and bounded waits."""
