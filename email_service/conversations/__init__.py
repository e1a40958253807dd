"""Messages grouped into conversations: a folder by conversation, and one conversation across folders."""
