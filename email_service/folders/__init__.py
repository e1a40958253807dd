"""Folders as the user manages them: roles (Drafts, Sent, ...) on the server, and creating,
renaming and deleting folders through the API."""
