/* tslint:disable */
/* eslint-disable */
export * from './AccountsApi.js';
export * from './AttachmentsApi.js';
export * from './ChangesApi.js';
export * from './ComposeApi.js';
export * from './ConversationsApi.js';
export * from './EventsApi.js';
export * from './FoldersApi.js';
export * from './MessagesApi.js';
export * from './OAuth2Api.js';
export * from './SearchApi.js';
export * from './StorageApi.js';
export * from './SyncApi.js';
export * from './SystemApi.js';
export * from './WebhooksApi.js';
