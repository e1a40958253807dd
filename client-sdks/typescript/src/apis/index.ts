/* tslint:disable */
/* eslint-disable */
export * from './AccountsApi';
export * from './AttachmentsApi';
export * from './ChangesApi';
export * from './ComposeApi';
export * from './ConversationsApi';
export * from './EventsApi';
export * from './FoldersApi';
export * from './MessagesApi';
export * from './SearchApi';
export * from './StorageApi';
export * from './SyncApi';
export * from './SystemApi';
export * from './WebhooksApi';
