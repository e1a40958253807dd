"""Tables of the service. Every tenant-owned row carries ``tenant_id`` and ``user_id``."""

from email_service.models.account import Account, AuthType, OAuth2State, TokenState
from email_service.models.base import Base
from email_service.models.change import Change, ChangeEntity, ChangeKind
from email_service.models.mail import Attachment, DeliveryStatus, Folder, Message, MessageMove
from email_service.models.task import Task, TaskKind, TaskStatus
from email_service.models.webhook import WebhookAttempt, WebhookCursor, WebhookDelivery, WebhookEndpoint

__all__ = [
    "Account",
    "Attachment",
    "AuthType",
    "Base",
    "Change",
    "ChangeEntity",
    "ChangeKind",
    "DeliveryStatus",
    "Folder",
    "Message",
    "MessageMove",
    "OAuth2State",
    "Task",
    "TaskKind",
    "TaskStatus",
    "TokenState",
    "WebhookAttempt",
    "WebhookCursor",
    "WebhookDelivery",
    "WebhookEndpoint",
]
