/* tslint:disable */
/* eslint-disable */
export * from './AccountsApi';
export * from './AttachmentsApi';
export * from './ComposeApi';
export * from './FoldersApi';
export * from './MessagesApi';
export * from './StorageApi';
export * from './SyncApi';
export * from './SystemApi';
export * from './WebhooksApi';
