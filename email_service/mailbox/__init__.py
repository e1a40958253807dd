"""The incoming side: syncing mailboxes into the database, changes written back, and their jobs."""
