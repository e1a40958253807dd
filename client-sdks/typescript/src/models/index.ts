/* tslint:disable */
/* eslint-disable */
export * from './Account';
export * from './AccountListResponse';
export * from './AccountResponse';
export * from './Attachment';
export * from './ChangedIds';
export * from './ChangesResponse';
export * from './CreateAccountRequest';
export * from './ErrorResponse';
export * from './Folder';
export * from './GetSyncStatus200Response';
export * from './HealthCheck200Response';
export * from './ListFolders200Response';
export * from './ListMessages200Response';
export * from './Message';
export * from './MessageDetail';
export * from './Pagination';
export * from './RetrySend202Response';
export * from './SaveDraft201Response';
export * from './SendEmail202Response';
export * from './SendEmailRequest';
export * from './StreamEvents200Response';
export * from './StreamedChange';
export * from './SyncAccount202Response';
export * from './SyncAccountRequest';
export * from './UpdateAccountRequest';
export * from './UpdateMessageRequest';
