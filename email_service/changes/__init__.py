"""The change log and everything fed from it: the changes feed, server-sent events, webhooks."""
