"""The HTTP side: Connexion app factory, authentication, errors, limits."""
