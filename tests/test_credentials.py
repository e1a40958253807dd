"""Mail passwords: encrypted at rest, never shown, logged or echoed; keys rotate."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from helpers import account_body
from sqlalchemy import text

from email_service.crypto import CredentialCipher, CredentialError
from email_service.runtime import Runtime
from email_service.services.accounts import rotate_credentials

PASSWORD = "Sup3r-secret-imap-pass"
SMTP_PASSWORD = "another-smtp-secret"


def stored(runtime, user, account_id):
    with runtime.db.tenant_session(user.principal) as session:
        return session.execute(
            text(
                "SELECT password_encrypted, smtp_password_encrypted, accounts::text AS whole FROM accounts"
                " WHERE id = :id"
            ),
            {"id": account_id},
        ).one()


def test_database_holds_only_ciphertext_that_decrypts_to_the_password(client, user, runtime, caplog):
    caplog.set_level(logging.DEBUG)
    body = account_body(password=PASSWORD, smtpHostname="smtp.example.com", smtpPassword=SMTP_PASSWORD)
    response = client.post("/api/accounts", json=body, headers=user.headers)
    assert response.status_code == 201
    row = stored(runtime, user, response.json()["id"])
    assert PASSWORD not in row.whole and PASSWORD.encode() not in bytes(row.password_encrypted)
    assert SMTP_PASSWORD.encode() not in bytes(row.smtp_password_encrypted)
    assert runtime.cipher.decrypt(row.password_encrypted) == PASSWORD
    assert runtime.cipher.decrypt(row.smtp_password_encrypted) == SMTP_PASSWORD
    for secret in (PASSWORD, SMTP_PASSWORD):
        assert secret not in response.text
        assert secret not in caplog.text


def test_password_update_reencrypts(client, user, runtime):
    account = client.post("/api/accounts", json=account_body(password=PASSWORD), headers=user.headers).json()
    before = stored(runtime, user, account["id"]).password_encrypted
    response = client.put(f"/api/accounts/{account['id']}", json={"password": "a-new-password"}, headers=user.headers)
    assert response.status_code == 200 and "a-new-password" not in response.text
    after = stored(runtime, user, account["id"]).password_encrypted
    assert after != before and runtime.cipher.decrypt(after) == "a-new-password"


@pytest.mark.parametrize("password", ["short", "has\nnewline-inside"])
def test_rejected_passwords_are_not_echoed_or_logged(client, user, caplog, password):
    caplog.set_level(logging.DEBUG)
    response = client.post("/api/accounts", json=account_body(password=password), headers=user.headers)
    assert response.status_code == 400
    assert "password" in response.json()["message"]
    assert password not in response.text and password not in caplog.text


def test_tampered_ciphertext_does_not_decrypt():
    cipher = CredentialCipher((Fernet.generate_key().decode(),))
    token = bytearray(cipher.encrypt(PASSWORD))
    token[-5] ^= 1
    with pytest.raises(CredentialError):
        cipher.decrypt(bytes(token))
    with pytest.raises(CredentialError):
        CredentialCipher((Fernet.generate_key().decode(),)).decrypt(cipher.encrypt(PASSWORD))


def test_rotation_reencrypts_every_credential_under_the_newest_key(client, make_user, runtime, settings_with):
    users = [make_user(), make_user()]
    ids = []
    for u in users:
        body = account_body(password=PASSWORD, smtpHostname="smtp.example.com", smtpPassword=SMTP_PASSWORD)
        ids.append(client.post("/api/accounts", json=body, headers=u.headers).json()["id"])
    old_key = runtime.settings.credential_keys[0]
    new_key = Fernet.generate_key().decode()
    rotated = Runtime.build(settings_with(credential_keys=(new_key, old_key)))
    try:
        # Before rotation both keys still read everything.
        assert rotated.cipher.decrypt(stored(runtime, users[0], ids[0]).password_encrypted) == PASSWORD
        changed = rotate_credentials(rotated.db, rotated.cipher)
        assert changed >= 4
        only_new = CredentialCipher((new_key,))
        for u, account_id in zip(users, ids, strict=True):
            row = stored(runtime, u, account_id)
            assert only_new.decrypt(row.password_encrypted) == PASSWORD
            assert only_new.decrypt(row.smtp_password_encrypted) == SMTP_PASSWORD
            with pytest.raises(CredentialError):
                CredentialCipher((old_key,)).decrypt(row.password_encrypted)
        assert rotate_credentials(rotated.db, rotated.cipher) == 0
        # Put the suite's key back in front for the tests that follow.
        rotate_credentials(runtime.db, CredentialCipher((old_key, new_key)))
    finally:
        rotated.close()


def test_a_password_changed_while_keys_rotate_is_kept(client, user, runtime, settings_with):
    account_id = client.post("/api/accounts", json=account_body(password=PASSWORD), headers=user.headers).json()["id"]
    read = stored(runtime, user, account_id).password_encrypted
    old_key = runtime.settings.credential_keys[0]
    new_key = Fernet.generate_key().decode()
    rotated = Runtime.build(settings_with(credential_keys=(new_key, old_key)))
    rotate = rotated.cipher.rotate

    def rotate_while_the_user_changes_it(token: bytes) -> bytes:
        if token == read:
            # The API (still on the old key list) commits a new password after rotation read the old.
            changed = client.put(
                f"/api/accounts/{account_id}", json={"password": "changed-meanwhile"}, headers=user.headers
            )
            assert changed.status_code == 200
        return rotate(token)

    rotated.cipher.rotate = rotate_while_the_user_changes_it
    try:
        rotate_credentials(rotated.db, rotated.cipher)
        assert rotated.cipher.decrypt(stored(runtime, user, account_id).password_encrypted) == "changed-meanwhile"
    finally:
        rotate_credentials(runtime.db, CredentialCipher((old_key, new_key)))
        rotated.close()


def test_a_credential_no_key_decrypts_does_not_stop_rotation(client, make_user, runtime, settings_with, caplog):
    good, broken = make_user(), make_user()
    good_id = client.post("/api/accounts", json=account_body(password=PASSWORD), headers=good.headers).json()["id"]
    broken_id = client.post("/api/accounts", json=account_body(), headers=broken.headers).json()["id"]
    # Encrypted under a key the service no longer has (dropped before this account was rotated).
    lost = CredentialCipher((Fernet.generate_key().decode(),)).encrypt("lost-password")
    replace = text("UPDATE accounts SET password_encrypted = :v WHERE id = :id")
    with runtime.db.tenant_session(broken.principal) as session:
        session.execute(replace, {"v": lost, "id": broken_id})
    old_key = runtime.settings.credential_keys[0]
    new_key = Fernet.generate_key().decode()
    rotated = Runtime.build(settings_with(credential_keys=(new_key, old_key)))
    caplog.set_level(logging.WARNING)
    try:
        assert rotate_credentials(rotated.db, rotated.cipher) >= 1
        # Everything else is rotated; the value no key reads is left as it was, and the log says which.
        assert CredentialCipher((new_key,)).decrypt(stored(runtime, good, good_id).password_encrypted) == PASSWORD
        assert bytes(stored(runtime, broken, broken_id).password_encrypted) == lost
        assert broken_id in caplog.text and "password_encrypted" in caplog.text
        assert "lost-password" not in caplog.text
    finally:
        with runtime.db.tenant_session(broken.principal) as session:
            session.execute(replace, {"v": runtime.cipher.encrypt(PASSWORD), "id": broken_id})
        rotate_credentials(runtime.db, CredentialCipher((old_key, new_key)))
        rotated.close()
