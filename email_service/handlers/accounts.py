from __future__ import annotations

from datetime import datetime
from typing import Any

from email_service.handlers import principal, runtime
from email_service.models import Account
from email_service.services import accounts as service

# PostgreSQL's OFFSET is a bigint; anything larger than this can only be past the end.
MAX_OFFSET = 2**62


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def account_view(account: Account) -> dict[str, Any]:
    """The API form of an account; credentials never leave the service."""
    return {
        "id": account.id,
        "tenantId": str(account.tenant_id),
        "userId": str(account.user_id),
        "accountName": account.account_name,
        "emailAddress": account.email_address,
        "protocol": account.protocol,
        "hostname": account.hostname,
        "port": account.port,
        "encryption": account.encryption,
        "username": account.username,
        "isSyncEnabled": account.is_sync_enabled,
        "syncInterval": account.sync_interval,
        "lastSyncAt": _ms(account.last_sync_at),
        "isSyncing": account.is_syncing,
        "isEnabled": account.is_enabled,
        "createdAt": _ms(account.created_at),
        "updatedAt": _ms(account.updated_at),
        "smtpHostname": account.smtp_hostname,
        "smtpPort": account.smtp_port,
        "smtpEncryption": account.smtp_encryption,
        "smtpUsername": account.smtp_username,
    }


def list_accounts(limit: int = 100, offset: int = 0) -> tuple[dict, int]:
    page = service.list_accounts(runtime().db, principal(), limit, min(offset, MAX_OFFSET))
    return {
        "accounts": [account_view(a) for a in page.items],
        "pagination": {"total": page.total, "limit": limit, "offset": offset},
    }, 200


def create_account(body: dict[str, Any]) -> tuple[dict, int]:
    rt = runtime()
    return account_view(service.create_account(rt.db, rt.cipher, principal(), body)), 201


def get_account(account_id: str) -> tuple[dict, int]:
    return account_view(service.get_account(runtime().db, principal(), account_id)), 200


def update_account(account_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    rt = runtime()
    return account_view(service.update_account(rt.db, rt.cipher, principal(), account_id, body)), 200


def delete_account(account_id: str) -> tuple[None, int]:
    service.delete_account(runtime().db, principal(), account_id)
    return None, 204
