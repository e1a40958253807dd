"""Real-time watching of mailboxes: IMAP IDLE held for many accounts by few asyncio processes."""
