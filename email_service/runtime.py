"""The long-lived collaborators of one API process: database, cipher, Redis."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from email_service.config import Settings
from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.queue.connection import redis_from_url
from email_service.storage import ObjectStore, object_store


@dataclass
class Runtime:
    settings: Settings
    db: Database
    cipher: CredentialCipher
    redis: Redis
    objects: ObjectStore

    @classmethod
    def build(cls, settings: Settings, *, pre_ping: bool = True) -> Runtime:
        """``pre_ping=False`` for the API: its sessions recover from dead connections without it."""
        if settings.database_url is None or settings.redis_url is None:
            raise ValueError("Runtime.build needs resolved DATABASE_URL and REDIS_URL")
        objects = object_store(settings)
        objects.ensure_bucket()
        return cls(
            settings=settings,
            db=Database(settings.database_url, settings.db_app_role, pre_ping=pre_ping),
            cipher=CredentialCipher(settings.credential_keys),
            redis=redis_from_url(settings.redis_url, timeout=2.0),
            objects=objects,
        )

    def close(self) -> None:
        self.db.dispose()
        self.redis.close()
