module github.com/metabuilder/email-service-client

go 1.23

require (
)
