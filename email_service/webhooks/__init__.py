"""Signed webhook deliveries of the change log: the API's service, fan-out, dispatcher and signing.

The change log (``email_service.changes``) is the only source. Fan-out turns each committed change
into one delivery per matching endpoint, in the transaction that moves the account's position;
the dispatcher sends due deliveries with asyncio, bounded per endpoint and per tenant, and
retries failures on the schedule in ``queue.policy``.
"""
