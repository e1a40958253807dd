"""A real OAuth2 authorization server for tests, built from authlib's server components.

It runs in a thread on 127.0.0.1 (Flask on werkzeug) and speaks the protocol the service talks to
Google and Microsoft: the authorization code grant with PKCE (``/authorize``, which consents at
once for the user named by its ``test_user`` parameter), refresh tokens that rotate on every use
(the old one is revoked), revocation (RFC 7009) and introspection (RFC 7662). The test Dovecot and
the test SMTP server check the tokens they are given through its introspection endpoint, as a
mail provider checks its own.

Fixtures: ``oauth2_server`` and ``oauth2_dovecot`` (session).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, Response, request
from mailservers import Dovecot, TlsFiles, running_dovecot
from werkzeug.serving import WSGIRequestHandler, make_server

SERVICE_CLIENT_ID = "email-service"
RESOURCE_CLIENT_ID = "mail-servers"  # Dovecot and the SMTP server introspect as this client
SCOPE = "mail offline_access"
PROVIDER = "testidp"  # the name the service knows this server by
# Where the test service's consent flow returns (its default public URL).
SERVICE_CALLBACK = "http://127.0.0.1:5000/api/oauth2/callback"
# Where the tests' consent flows return the browser to (on the services' allow-list).
RETURN_URL = "https://app.example.com/settings/mail"


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    redirect_uris: list[str] = field(default_factory=list)

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in (scope or "").split() if s in SCOPE.split())

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class Token(TokenMixin):
    client_id: str
    user: str
    scope: str
    access_token: str
    refresh_token: str | None
    expires_in: int
    issued_at: float = field(default_factory=time.time)
    access_revoked: bool = False
    refresh_revoked: bool = False

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.refresh_revoked

    def get_user(self) -> str:
        return self.user

    def get_client(self) -> ClientMixin:
        raise NotImplementedError


@dataclass
class Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    user: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


class OAuth2TestServer:
    """The server and its state; tests read and change the state directly."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.tokens: list[Token] = []
        self.expires_in = 3600  # of the access tokens issued from now on
        # (HTTP status, OAuth2 error code) the token endpoint answers with instead, while set:
        # a provider throttling or briefly down.
        self.token_outage: tuple[int, str] | None = None
        # (HTTP status, body, content type) the token endpoint answers with instead, while set: a
        # provider, or a proxy in front of it, answering with something that is no token response.
        self.token_reply: tuple[int, bytes, str] | None = None
        # While set, the token endpoint answers one byte of its body every this many seconds: a
        # provider that answers slowly enough never to trip a read timeout.
        self.token_trickle: float | None = None
        # While set, the token endpoint answers 307 to this URL (a moved or hijacked endpoint).
        self.token_redirect: str | None = None
        self.collected: list[bytes] = []  # bodies posted to /collect, where a redirect may point
        self.refreshes = 0  # refresh-token grants answered, successful or not
        self.introspections = 0
        self.resource_secret = secrets.token_urlsafe(16)
        self.clients[RESOURCE_CLIENT_ID] = Client(RESOURCE_CLIENT_ID, self.resource_secret)
        self.service = self.register(SERVICE_CALLBACK)  # the service's registration
        self.port = 0
        self._httpd: Any = None
        self.app = self._build()

    # ---- state, for tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    def provider_env(self) -> dict[str, str]:
        """The settings that make this server the service's provider ``testidp``."""
        prefix = f"EMAIL_SERVICE_OAUTH2_{PROVIDER.upper()}_"
        return {
            "EMAIL_SERVICE_OAUTH2_PROVIDERS": PROVIDER,
            prefix + "CLIENT_ID": self.service.client_id,
            prefix + "CLIENT_SECRET": self.service.client_secret,
            prefix + "TOKEN_URL": f"{self.url}/token",
            prefix + "AUTHORIZE_URL": f"{self.url}/authorize",
            prefix + "SCOPES": SCOPE,
        }

    def register(self, redirect_uri: str | None = None) -> Client:
        """A client registration for one service instance (its own secret, its callback)."""
        client = Client(SERVICE_CLIENT_ID + "-" + secrets.token_hex(4), secrets.token_urlsafe(16))
        if redirect_uri:
            client.redirect_uris.append(redirect_uri)
        with self.lock:
            self.clients[client.client_id] = client
        return client

    def issue(self, client: Client, user: str, expires_in: int | None = None) -> Token:
        """Tokens as a caller that ran its own consent flow would hold them."""
        token = Token(
            client.client_id,
            user,
            SCOPE,
            secrets.token_urlsafe(24),
            secrets.token_urlsafe(24),
            self.expires_in if expires_in is None else expires_in,
        )
        with self.lock:
            self.tokens.append(token)
        return token

    def revoke_user(self, user: str) -> None:
        """The user withdrew consent (or changed their password): every token of theirs is dead."""
        with self.lock:
            for token in self.tokens:
                if token.user == user:
                    token.access_revoked = token.refresh_revoked = True

    def find(self, *, access: str | None = None, refresh: str | None = None) -> Token | None:
        with self.lock:
            for token in self.tokens:
                if (access and token.access_token == access) or (refresh and token.refresh_token == refresh):
                    return token
        return None

    def introspect(self, access_token: str) -> dict[str, Any]:
        """What a mail server learns of a token (over HTTP, as Dovecot asks)."""
        response = httpx.post(
            self.introspection_url,
            data={"token": access_token},
            auth=(RESOURCE_CLIENT_ID, self.resource_secret),
            timeout=10,
        )
        return response.json()

    # ---- the server

    def _build(self) -> Flask:
        app = Flask(__name__)
        server_state = self

        def query_client(client_id: str) -> Client | None:
            return server_state.clients.get(client_id)

        def save_token(token: dict, req: Any) -> None:
            with server_state.lock:
                server_state.tokens.append(
                    Token(
                        req.client.client_id,
                        req.user,
                        token.get("scope", SCOPE),
                        token["access_token"],
                        token.get("refresh_token"),
                        token["expires_in"],
                    )
                )

        class CodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def save_authorization_code(self, code: str, req: Any) -> None:
                with server_state.lock:
                    server_state.codes[code] = Code(
                        code,
                        req.client.client_id,
                        req.user,
                        req.payload.redirect_uri,
                        req.payload.scope or SCOPE,
                        req.payload.data.get("code_challenge"),
                        req.payload.data.get("code_challenge_method"),
                    )

            def query_authorization_code(self, code: str, client: Client) -> Code | None:
                found = server_state.codes.get(code)
                return found if found and found.client_id == client.client_id else None

            def delete_authorization_code(self, authorization_code: Code) -> None:
                server_state.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code: Code) -> str:
                return authorization_code.user

        class RotatingRefreshGrant(grants.RefreshTokenGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
            INCLUDE_NEW_REFRESH_TOKEN = True  # every refresh rotates the refresh token

            def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
                with server_state.lock:
                    server_state.refreshes += 1
                token = server_state.find(refresh=refresh_token)
                return token if token and not token.refresh_revoked else None

            def authenticate_user(self, refresh_token: Token) -> str:
                return refresh_token.user

            def revoke_old_credential(self, refresh_token: Token) -> None:
                refresh_token.refresh_revoked = True

        class Revocation(RevocationEndpoint):
            CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
                return server_state.find(access=token_string) or server_state.find(refresh=token_string)

            def revoke_token(self, token: Token, req: Any) -> None:
                token.access_revoked = token.refresh_revoked = True

        class Introspection(IntrospectionEndpoint):
            def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
                with server_state.lock:
                    server_state.introspections += 1
                return server_state.find(access=token_string)

            def check_permission(self, token: Token, client: Client, req: Any) -> bool:
                return client.client_id == RESOURCE_CLIENT_ID

            def introspect_token(self, token: Token) -> dict[str, Any]:
                if token.access_revoked or token.is_expired():
                    return {"active": False}
                return {
                    "active": True,
                    "username": token.user,
                    "client_id": token.client_id,
                    "scope": token.scope,
                    "exp": int(token.issued_at + token.expires_in),
                }

        server = AuthorizationServer(app, query_client, save_token)

        def new_token(*_args: Any, **_kwargs: Any) -> str:
            return secrets.token_urlsafe(24)

        server.register_token_generator(
            "default", BearerTokenGenerator(new_token, new_token, lambda *_args, **_kwargs: server_state.expires_in)
        )
        server.register_grant(CodeGrant, [CodeChallenge(required=True)])
        server.register_grant(RotatingRefreshGrant)
        server.register_endpoint(Revocation)
        server.register_endpoint(Introspection)

        @app.get("/authorize")
        def authorize() -> Any:
            # The user signs in and consents at once: who they are is the test's choice.
            user = request.args["test_user"]
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                return server.handle_error_response(None, error)
            return server.create_authorization_response(grant=grant, grant_user=user)

        @app.post("/token")
        def issue_token() -> Any:
            if server_state.token_outage is not None:
                status, error = server_state.token_outage
                return {"error": error, "error_description": "try again later"}, status, {"Retry-After": "5"}
            if server_state.token_reply is not None:
                status, body, content_type = server_state.token_reply
                return Response(body, status, content_type=content_type)
            if server_state.token_redirect is not None:
                return Response(b"", 307, headers={"Location": server_state.token_redirect})
            answer = server.create_token_response()
            if server_state.token_trickle is not None:
                delay, body = server_state.token_trickle, answer.get_data()

                def trickle() -> Iterator[bytes]:
                    for byte in body:
                        time.sleep(delay)
                        yield bytes([byte])

                return Response(trickle(), answer.status_code, content_type=answer.content_type)
            return answer

        @app.post("/collect")
        def collect() -> Any:
            server_state.collected.append(request.get_data())
            return {"access_token": "collected", "token_type": "Bearer", "expires_in": 3600}

        @app.post("/revoke")
        def revoke() -> Any:
            return server.create_endpoint_response(RevocationEndpoint.ENDPOINT_NAME)

        @app.post("/introspect")
        def introspect() -> Any:
            return server.create_endpoint_response(IntrospectionEndpoint.ENDPOINT_NAME)

        return app

    def start(self) -> None:
        self._httpd = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=_QuietHandler)
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, name="oauth2-test-server", daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd = None


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass  # one line per token request would bury the test output


@pytest.fixture(scope="session")
def oauth2_server() -> Iterator[OAuth2TestServer]:
    server = OAuth2TestServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _introspection_with_credentials(oauth2_server: OAuth2TestServer) -> str:
    return oauth2_server.introspection_url.replace("://", f"://{RESOURCE_CLIENT_ID}:{oauth2_server.resource_secret}@")


@pytest.fixture(scope="session")
def oauth2_dovecot(mail_tls: TlsFiles, oauth2_server: OAuth2TestServer) -> Iterator[Dovecot]:
    """A private Dovecot whose IMAP also logs users in with this server's access tokens."""
    with running_dovecot(mail_tls, oauth2_introspection_url=_introspection_with_credentials(oauth2_server)) as server:
        yield server


@pytest.fixture(scope="module")
def xoauth2_dovecot(mail_tls: TlsFiles, oauth2_server: OAuth2TestServer) -> Iterator[Dovecot]:
    """As ``oauth2_dovecot``, but offering XOAUTH2 alone, as Microsoft's servers do (no OAUTHBEARER)."""
    url = _introspection_with_credentials(oauth2_server)
    with running_dovecot(mail_tls, oauth2_introspection_url=url, oauth2_mechanisms=("XOAUTH2",)) as server:
        yield server
