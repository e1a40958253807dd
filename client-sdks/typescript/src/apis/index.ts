/* tslint:disable */
/* eslint-disable */
export * from './AccountsApi';
export * from './AttachmentsApi';
export * from './ChangesApi';
export * from './ComposeApi';
export * from './EventsApi';
export * from './FoldersApi';
export * from './MessagesApi';
export * from './OAuth2Api';
export * from './StorageApi';
export * from './SyncApi';
export * from './SystemApi';
export * from './WebhooksApi';
