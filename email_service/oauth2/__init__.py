"""OAuth2 logins for mail accounts: providers from the settings, tokens kept fresh, the consent flow."""
