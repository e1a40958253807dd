from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.models import Account, AuthType
from email_service.services import accounts as service

# PostgreSQL's OFFSET is a bigint; anything larger than this can only be past the end.
MAX_OFFSET = 2**62


def account_view(account: Account, syncing: set[str] | frozenset[str]) -> dict[str, Any]:
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
        "lastSyncAt": ms(account.last_sync_at),
        "isSyncing": account.id in syncing,
        "isEnabled": account.is_enabled,
        "pop3DeleteOnServer": account.pop3_delete_on_server,
        "createdAt": ms(account.created_at),
        "updatedAt": ms(account.updated_at),
        "smtpHostname": account.smtp_hostname,
        "smtpPort": account.smtp_port,
        "smtpEncryption": account.smtp_encryption,
        "smtpUsername": account.smtp_username,
        "lastSyncError": account.last_sync_error,
        "lastSyncErrorAt": ms(account.last_sync_error_at),
        "nextSyncAt": ms(account.next_sync_at) if account.is_sync_enabled and account.is_enabled else None,
        "authType": account.auth_type,
        "oauth2": (
            {
                "provider": account.oauth2_provider,
                "tokenState": account.oauth2_token_state,
                "tokenError": account.oauth2_token_error,
                "accessTokenExpiresAt": ms(account.oauth2_expires_at),
            }
            if account.auth_type == AuthType.OAUTH2
            else None
        ),
    }


def list_accounts(limit: int = 100, offset: int = 0) -> tuple[dict, int]:
    rt = runtime()
    page = service.list_accounts(rt.db, principal(), limit, min(offset, MAX_OFFSET))
    return {
        "accounts": [account_view(a, page.syncing) for a in page.items],
        "pagination": {"total": page.total, "limit": limit, "offset": offset},
    }, 200


def create_account(body: dict[str, Any]) -> tuple[dict, int]:
    rt = runtime()
    account = service.create_account(
        rt.db, rt.cipher, principal(), body, rt.settings.destinations, rt.settings.oauth2_providers
    )
    return account_view(account, set()), 201


def get_account(account_id: str) -> tuple[dict, int]:
    account, syncing = service.account_and_syncing(runtime().db, principal(), account_id)
    return account_view(account, {account.id} if syncing else set()), 200


def update_account(account_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    rt = runtime()
    account = service.update_account(
        rt.db, rt.cipher, principal(), account_id, body, rt.settings.destinations, rt.settings.oauth2_providers
    )
    return account_view(account, service.syncing(rt, principal(), [account.id])), 200


def delete_account(account_id: str) -> tuple[None, int]:
    service.delete_account(runtime(), principal(), account_id)
    return None, 204
