"""email_service: a multi-tenant REST service for users' email accounts (IMAP, POP3, SMTP)."""

__version__ = "0.1.0"
