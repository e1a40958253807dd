# flake8: noqa

# import apis into api package
from email_service_client.api.accounts_api import AccountsApi
from email_service_client.api.attachments_api import AttachmentsApi
from email_service_client.api.changes_api import ChangesApi
from email_service_client.api.compose_api import ComposeApi
from email_service_client.api.conversations_api import ConversationsApi
from email_service_client.api.events_api import EventsApi
from email_service_client.api.folders_api import FoldersApi
from email_service_client.api.messages_api import MessagesApi
from email_service_client.api.o_auth2_api import OAuth2Api
from email_service_client.api.search_api import SearchApi
from email_service_client.api.storage_api import StorageApi
from email_service_client.api.sync_api import SyncApi
from email_service_client.api.system_api import SystemApi
from email_service_client.api.webhooks_api import WebhooksApi

