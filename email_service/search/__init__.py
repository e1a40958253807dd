"""Full-text search over an account's messages across folders."""
