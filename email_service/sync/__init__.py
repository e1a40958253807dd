"""Mailbox sync: mail protocol code feeding the models, run by queue jobs."""
