"""Reversible, authenticated encryption of mail-server credentials.

The service must log in to IMAP/POP3/SMTP servers as the user, so a hash is useless here.
Fernet (AES-128-CBC with HMAC-SHA256) authenticates every token, so a tampered or foreign
ciphertext fails loudly instead of decrypting to garbage. MultiFernet gives rotation:
the first key encrypts, every key decrypts, and ``rotate`` re-encrypts under the first.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class CredentialError(Exception):
    """A stored credential cannot be decrypted with any configured key."""


class CredentialCipher:
    def __init__(self, keys: tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("at least one credential key is required")
        self._fernets = [Fernet(k.encode()) for k in keys]
        self._multi = MultiFernet(self._fernets)

    def encrypt(self, secret: str) -> bytes:
        return self._multi.encrypt(secret.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._multi.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken:
            raise CredentialError("stored credential does not decrypt with any configured key") from None

    def needs_rotation(self, token: bytes) -> bool:
        """True when the newest key cannot decrypt ``token`` (an older key encrypted it)."""
        try:
            self._fernets[0].decrypt(bytes(token))
        except InvalidToken:
            return True
        return False

    def rotate(self, token: bytes) -> bytes:
        try:
            return self._multi.rotate(bytes(token))
        except InvalidToken:
            raise CredentialError("stored credential does not decrypt with any configured key") from None
