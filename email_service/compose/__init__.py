"""Building outgoing messages (RFC 5322/MIME) from what a user composed."""
