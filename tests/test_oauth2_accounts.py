"""OAuth2 accounts against a real authorization server, a Dovecot that checks its tokens, and aiosmtpd.

The authorization server (tests/oauth2server.py, authlib) issues, refreshes, rotates and revokes
tokens; Dovecot's oauth2 passdb and the SMTP server ask its introspection endpoint about every
token they are given. Nothing in between is simulated.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet
from helpers import account_body, assert_error_shape
from oauth2server import PROVIDER, RETURN_URL, SERVICE_CALLBACK
from sqlalchemy import text
from syncing import create_account, eventually, imap_account, inbox_subjects, run_sync, wait_task, watcher

from email_service.api.app import create_app
from email_service.crypto import CredentialCipher
from email_service.oauth2.providers import load_providers
from email_service.oauth2.tokens import TokenRefreshFailed, TokenSource, hold_refresh
from email_service.protocols.errors import ConnectionFailed
from email_service.protocols.tls import client_context
from email_service.runtime import Runtime
from email_service.services.accounts import rotate_credentials
from email_service.services.servers import load_servers
from email_service.tenancy import Principal
from email_service.watch.idle import IdleConnection

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def service(backing, oauth2_server, oauth2_dovecot):
    """The API with the test authorization server as provider ``testidp`` (as the worker has it).

    Accounts made by its consent flow use the OAuth2 Dovecot's IMAP.
    """
    env = oauth2_server.provider_env()
    env[f"EMAIL_SERVICE_OAUTH2_{PROVIDER.upper()}_IMAP"] = f"{oauth2_dovecot.host}:{oauth2_dovecot.imaps_port}/tls"
    settings = replace(
        backing,
        rate_limits_enabled=False,
        oauth2_providers=load_providers(env),
        oauth2_return_urls=(RETURN_URL,),
    )
    runtime = Runtime.build(settings)
    with create_app(runtime).test_client() as test_client:
        yield test_client, runtime
    runtime.close()


@pytest.fixture
def api(service):
    return service[0]


@pytest.fixture
def rt(service):
    return service[1]


@pytest.fixture
def mailbox(oauth2_dovecot):
    return oauth2_dovecot.add_user()


def oauth2_body(dovecot, mail_user, grant: dict, smtp=None, **overrides) -> dict:
    """The tests' IMAP account on ``dovecot``, logging in with ``grant`` instead of a password."""
    body = imap_account(
        dovecot, mail_user, accountName="Work (OAuth2)", authType="oauth2", oauth2={"provider": PROVIDER, **grant}
    )
    del body["password"]
    if smtp is not None:
        body.update(smtpHostname=dovecot.host, smtpPort=smtp.port, smtpEncryption="starttls")
    body.update(overrides)
    return body


def with_access_token(dovecot, mail_user, grant) -> dict:
    """An account given the access token too, valid for an hour by its stated expiry."""
    current = {
        "refreshToken": grant.refresh_token,
        "accessToken": grant.access_token,
        "expiresAt": int(time.time() * 1000) + 3_600_000,
    }
    return oauth2_body(dovecot, mail_user, current)


def stored(rt, account_id: str):
    with rt.db.maintenance_session() as session:
        return session.execute(
            text("SELECT a.*, a::text AS whole FROM accounts a WHERE id = :id"), {"id": account_id}
        ).one()


def expire_access_token(rt, account_id: str) -> None:
    with rt.db.maintenance_session() as session:
        session.execute(
            text("UPDATE accounts SET oauth2_expires_at = now() - interval '1 minute' WHERE id = :id"),
            {"id": account_id},
        )


def account(api, user, account_id: str) -> dict:
    response = api.get(f"/api/accounts/{account_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def send_and_receive(api, user, account_id: str, smtp, mail_user, subject: str) -> None:
    """Send one message through the API and see the SMTP server receive it from ``mail_user``'s login."""
    sent = api.post(
        "/api/compose/send",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": subject, "body": "Hi"},
        headers=user.headers,
    )
    assert sent.status_code == 202, sent.text
    assert wait_task(api, user, sent.json()["taskId"])["status"] == "success"
    [received] = smtp.wait_for(1)
    assert received.auth_login == mail_user.name and subject.encode() in received.data


def token_logins(dovecot, mail_user) -> list[str]:
    """The SASL mechanism of each of ``mail_user``'s token logins, from the Dovecot's log, in order.

    The tests' own logins (appending mail) use the password, with PLAIN or LOGIN: left out.
    """
    logins = re.findall(rf"Login: user=<{re.escape(mail_user.name)}>, method=([A-Z0-9-]+)", dovecot.log_tail(10**7))
    return [method for method in logins if method not in ("PLAIN", "LOGIN")]


def test_an_account_made_with_a_refresh_token_syncs_and_sends_with_tokens_it_fetched(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox, smtp_server
):
    smtp = smtp_server("starttls", introspect=oauth2_server.introspect)
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    oauth2_dovecot.append(mailbox, "INBOX", b"Subject: Hello over OAuth2\r\n\r\nBody\r\n")
    created = api.post(
        "/api/accounts",
        json=oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}, smtp),
        headers=user.headers,
    )
    assert created.status_code == 201, created.text
    shown = created.json()
    assert shown["authType"] == "oauth2"
    assert shown["oauth2"] == {
        "provider": PROVIDER,
        "tokenState": "valid",
        "tokenError": None,
        "accessTokenExpiresAt": None,
    }
    assert grant.refresh_token not in created.text
    account_id = shown["id"]

    status, _ = run_sync(api, user, account_id)
    assert status["status"] == "success", status
    listed = api.get(f"/api/{account_id}/folders", headers=user.headers).json()
    inbox = next(f for f in listed["folders"] if f["name"] == "INBOX")
    page = api.get(f"/api/{account_id}/folders/{inbox['id']}/messages", headers=user.headers).json()
    assert [m["subject"] for m in page["messages"]] == ["Hello over OAuth2"]

    # The first use refreshed the token; the provider rotated the refresh token and the new one is kept.
    row = stored(rt, account_id)
    refresh_now = rt.cipher.decrypt(row.oauth2_refresh_token_encrypted)
    access_now = rt.cipher.decrypt(row.oauth2_access_token_encrypted)
    assert refresh_now != grant.refresh_token and oauth2_server.find(refresh=grant.refresh_token).refresh_revoked
    assert oauth2_server.find(refresh=refresh_now).access_token == access_now
    for secret in (refresh_now, access_now, grant.refresh_token):
        assert secret not in row.whole and secret.encode() not in bytes(row.oauth2_refresh_token_encrypted)
        assert secret not in api.get(f"/api/accounts/{account_id}", headers=user.headers).text
    assert account(api, user, account_id)["oauth2"]["accessTokenExpiresAt"] > time.time() * 1000

    send_and_receive(api, user, account_id, smtp, mailbox, "Sent with a token")
    # Where both are offered, the standard mechanism is the one used.
    assert smtp.oauth2_logins == ["OAUTHBEARER"]
    methods = token_logins(oauth2_dovecot, mailbox)
    assert methods and set(methods) == {"OAUTHBEARER"}


def test_an_smtp_server_refusing_oauth2_logins_fails_the_send_and_leaves_the_account_syncing(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox, smtp_server
):
    # Microsoft 365 with SMTP AUTH turned off for the mailbox refuses every token (535 5.7.139)
    # while IMAP takes them. The refusal marked the tokens failed, which stopped the sync too,
    # and signing in again helped only until the next send.
    smtp = smtp_server("starttls", introspect=lambda token: {"active": False})
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(
        api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}, smtp)
    )
    sent = api.post(
        "/api/compose/send",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Not allowed", "body": "Hi"},
        headers=user.headers,
    )
    assert sent.status_code == 202, sent.text
    failed = wait_task(api, user, sent.json()["taskId"])
    assert failed["status"] == "failure" and failed["attempts"] == 1, failed
    assert "refused the account's OAuth2 login for sending" in failed["error"] and "535" in failed["error"]
    assert smtp.messages == [] and smtp.oauth2_logins == []
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_a_server_offering_only_xoauth2_gets_xoauth2_logins_to_sync_and_send(
    api, user, oauth2_server, xoauth2_dovecot, smtp_server
):
    # Microsoft's IMAP and SMTP offer XOAUTH2 and no OAUTHBEARER; the service prefers the latter.
    mail_user = xoauth2_dovecot.add_user()
    smtp = smtp_server("starttls", introspect=oauth2_server.introspect, oauth2_mechanisms=("XOAUTH2",))
    grant = oauth2_server.issue(oauth2_server.service, mail_user.name)
    xoauth2_dovecot.append(mail_user, "INBOX", b"Subject: Hello over XOAUTH2\r\n\r\nBody\r\n")
    created = api.post(
        "/api/accounts",
        json=oauth2_body(xoauth2_dovecot, mail_user, {"refreshToken": grant.refresh_token}, smtp),
        headers=user.headers,
    )
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]

    status, _ = run_sync(api, user, account_id)
    assert status["status"] == "success", status
    assert list(inbox_subjects(api, user, account_id)) == ["Hello over XOAUTH2"]
    methods = token_logins(xoauth2_dovecot, mail_user)
    assert methods and set(methods) == {"XOAUTH2"}

    send_and_receive(api, user, account_id, smtp, mail_user, "Sent over XOAUTH2")
    assert smtp.oauth2_logins == ["XOAUTH2"]


def test_an_expired_access_token_is_refreshed_before_use_and_each_rotation_is_kept(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    body = with_access_token(oauth2_dovecot, mailbox, grant)
    account_id = create_account(api, user, body)
    before = oauth2_server.refreshes
    assert run_sync(api, user, account_id)[0]["status"] == "success"
    assert oauth2_server.refreshes == before  # the given access token was still good: no refresh

    seen_refresh_tokens = {grant.refresh_token}
    for _ in range(2):
        expire_access_token(rt, account_id)
        assert run_sync(api, user, account_id)[0]["status"] == "success"
        refresh_now = rt.cipher.decrypt(stored(rt, account_id).oauth2_refresh_token_encrypted)
        assert refresh_now not in seen_refresh_tokens  # rotated, and the rotated one worked next time
        seen_refresh_tokens.add(refresh_now)
    assert oauth2_server.refreshes == before + 2


def test_a_token_the_server_refuses_is_refreshed_once_and_the_login_retried(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    body = with_access_token(oauth2_dovecot, mailbox, grant)
    account_id = create_account(api, user, body)
    grant.access_revoked = True  # the provider dropped the access token early (e.g. a policy change)
    before = oauth2_server.refreshes
    assert run_sync(api, user, account_id)[0]["status"] == "success"
    assert oauth2_server.refreshes == before + 1
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"


def test_revoked_consent_shows_refresh_failed_and_backs_off_without_asking_again(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(
        api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}, isSyncEnabled=True)
    )
    assert run_sync(api, user, account_id)[0]["status"] == "success"
    oauth2_server.revoke_user(mailbox.name)
    expire_access_token(rt, account_id)

    before = oauth2_server.refreshes
    status, _ = run_sync(api, user, account_id)
    assert status["status"] == "failure" and "refused to refresh the token (invalid_grant)" in status["error"]
    # The task ends before its failure hook has written the account's record: wait for that.
    shown = eventually(lambda: (found := account(api, user, account_id))["lastSyncError"] and found, 10)
    assert shown["oauth2"]["tokenState"] == "refresh_failed"
    assert "invalid_grant" in shown["oauth2"]["tokenError"] and shown["lastSyncError"] == status["error"]
    # Backed off like any refused login: 15 minutes at first.
    assert shown["nextSyncAt"] >= time.time() * 1000 + 14 * 60 * 1000
    assert oauth2_server.refreshes == before + 1

    # Asked again (a manual sync): fails at once, the provider is not asked again.
    status, _ = run_sync(api, user, account_id)
    assert status["status"] == "failure" and "sign in again" in status["error"]
    assert oauth2_server.refreshes == before + 1

    # New tokens from the user end it.
    fresh = oauth2_server.issue(oauth2_server.service, mailbox.name)
    patched = api.put(
        f"/api/accounts/{account_id}",
        json={"oauth2": {"provider": PROVIDER, "refreshToken": fresh.refresh_token}},
        headers=user.headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["oauth2"]["tokenState"] == "valid" and patched.json()["oauth2"]["tokenError"] is None
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_a_throttled_token_endpoint_is_tried_again_later_and_the_grant_kept(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    oauth2_server.token_outage = (429, "temporarily_unavailable")
    try:
        status, _ = run_sync(api, user, account_id)
    finally:
        oauth2_server.token_outage = None
    assert status["status"] == "failure" and "not answering now (temporarily_unavailable)" in status["error"]
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
    # The provider is back: the same grant works, with nothing asked of the user.
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_sessions_needing_a_token_at_once_cause_one_refresh(api, rt, user, oauth2_server, oauth2_dovecot, mailbox):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    providers = load_providers(oauth2_server.provider_env())
    before = oauth2_server.refreshes
    tokens: list[str] = []
    errors: list[BaseException] = []

    def take() -> None:
        try:
            tokens.append(TokenSource(rt.db, rt.cipher, user.principal, account_id, providers).access_token())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(tokens) == 8 and len(set(tokens)) == 1
    assert oauth2_server.refreshes == before + 1
    assert oauth2_server.introspect(tokens[0])["active"] is True


def test_another_tenant_or_user_can_neither_see_nor_use_the_tokens(
    api, rt, user, make_user, verifier, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    for stranger in (make_user(), user.colleague(verifier)):
        assert_error_shape(api.get(f"/api/accounts/{account_id}", headers=stranger.headers), 404)
        assert_error_shape(api.post(f"/api/sync/{account_id}", json={}, headers=stranger.headers), 404)
        replaced = {"oauth2": {"provider": PROVIDER, "refreshToken": "theirs"}}
        assert_error_shape(api.put(f"/api/accounts/{account_id}", json=replaced, headers=stranger.headers), 404)
        assert account_id not in api.get("/api/accounts", headers=stranger.headers).text
        # Even handed the id, their token source finds no row under row-level security.
        source = TokenSource(
            rt.db, rt.cipher, stranger.principal, account_id, load_providers(oauth2_server.provider_env())
        )
        with pytest.raises(Exception, match="no OAuth2 tokens"):
            source.access_token()
    foreign = Principal(uuid.uuid4(), uuid.uuid4())
    with pytest.raises(Exception, match="no OAuth2 tokens"):
        TokenSource(rt.db, rt.cipher, foreign, account_id).access_token()
    assert rt.cipher.decrypt(stored(rt, account_id).oauth2_refresh_token_encrypted) == grant.refresh_token


def test_bad_oauth2_requests_are_refused_cleanly(api, user, oauth2_dovecot, mailbox):
    def create(**overrides):
        return api.post(
            "/api/accounts",
            json=oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": "r"}, **overrides),
            headers=user.headers,
        )

    assert_error_shape(create(oauth2={"provider": "nobody", "refreshToken": "r"}), 400, "OAUTH2_PROVIDER_UNKNOWN")
    assert_error_shape(create(oauth2={"provider": PROVIDER, "refreshToken": "r", "accessToken": "a"}), 400)
    assert_error_shape(create(oauth2={"provider": PROVIDER}), 400)
    assert_error_shape(create(protocol="pop3"), 400)
    assert_error_shape(create(password="a-password-too"), 400)
    no_password = oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": "r"})
    del no_password["authType"], no_password["oauth2"]
    assert_error_shape(api.post("/api/accounts", json=no_password, headers=user.headers), 400)
    password_with_tokens = dict(no_password, password="long-enough", oauth2={"provider": PROVIDER, "refreshToken": "r"})
    assert_error_shape(api.post("/api/accounts", json=password_with_tokens, headers=user.headers), 400)


def test_the_idle_watcher_logs_in_with_the_token_and_brings_new_mail_in(
    api, user, backing, oauth2_server, oauth2_dovecot, mailbox, tmp_path
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    oauth2_dovecot.append(mailbox, "INBOX", b"Subject: Before watching\r\n\r\nBody\r\n")
    account_id = create_account(
        api,
        user,
        oauth2_body(
            oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}, isSyncEnabled=True, syncInterval=604800
        ),
    )
    log = tmp_path / "watch.log"
    with watcher(backing, oauth2_dovecot, log, **oauth2_server.provider_env()):
        assert eventually(lambda: "Before watching" in inbox_subjects(api, user, account_id), 30), log.read_text()
        time.sleep(0.5)  # back in IDLE
        oauth2_dovecot.append(mailbox, "INBOX", b"Subject: While watching\r\n\r\nBody\r\n")
        assert eventually(lambda: "While watching" in inbox_subjects(api, user, account_id), 10), log.read_text()
    assert grant.refresh_token not in log.read_text()


def test_an_idle_login_with_a_revoked_token_ends_in_refresh_failed_without_hanging(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, with_access_token(oauth2_dovecot, mailbox, grant))
    oauth2_server.revoke_user(mailbox.name)
    servers = load_servers(rt.db, rt.cipher, user.principal, account_id)
    settings = replace(
        rt.settings,
        ca_file=oauth2_dovecot.ca_file,
        imap_timeout_seconds=30,
        oauth2_providers=load_providers(oauth2_server.provider_env()),
    )
    started = time.monotonic()
    with pytest.raises(TokenRefreshFailed):
        asyncio.run(IdleConnection.open(servers.incoming, settings, client_context(oauth2_dovecot.ca_file)))
    # Refused at once (the server's challenge after a refused token is answered), not at the timeout.
    assert time.monotonic() - started < 15
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "refresh_failed"


def test_rotate_keys_re_encrypts_the_tokens(api, rt, user, oauth2_server, oauth2_dovecot, mailbox):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, with_access_token(oauth2_dovecot, mailbox, grant))
    new_key = Fernet.generate_key().decode()
    try:
        assert rotate_credentials(rt.db, CredentialCipher((new_key, *rt.settings.credential_keys))) >= 2
        only_new = CredentialCipher((new_key,))
        row = stored(rt, account_id)
        assert only_new.decrypt(row.oauth2_refresh_token_encrypted) == grant.refresh_token
        assert only_new.decrypt(row.oauth2_access_token_encrypted) == grant.access_token
    finally:
        # Every credential of the shared database back under the suite's key, for the tests that follow.
        rotate_credentials(rt.db, CredentialCipher((*rt.settings.credential_keys, new_key)))


# ---------------------------------------------------------------------------- consent flow


def begin(api, user, **fields):
    body = {"returnUrl": RETURN_URL + "?tab=accounts", "emailAddress": f"c{uuid.uuid4().hex[:10]}@example.com"}
    body.update(fields)
    return api.post(f"/api/oauth2/{PROVIDER}/authorize", json=body, headers=user.headers), body


def consent(authorization_url: str, who: str) -> str:
    """The user's browser at the provider: signs in as ``who``, consents; answers the callback path."""
    answer = httpx.get(f"{authorization_url}&{urlencode({'test_user': who})}", follow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(SERVICE_CALLBACK + "?")
    return location.removeprefix("http://127.0.0.1:5000")


def test_the_consent_flow_creates_an_account_that_syncs_and_its_state_works_once(
    api, rt, user, make_user, oauth2_server
):
    started, body = begin(api, user, accountName="Consented")
    assert started.status_code == 200, started.text
    url = started.json()["authorizationUrl"]
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["redirect_uri"] == [SERVICE_CALLBACK] and query["client_id"] == [oauth2_server.service.client_id]
    assert started.json()["expiresAt"] > time.time() * 1000

    callback = consent(url, body["emailAddress"])
    finished = api.get(callback, follow_redirects=False)
    assert finished.status_code == 303, finished.text
    target = urlsplit(finished.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == RETURN_URL
    outcome = parse_qs(target.query)
    assert outcome["tab"] == ["accounts"] and outcome["status"] == ["connected"]
    [account_id] = outcome["accountId"]

    shown = account(api, user, account_id)
    assert shown["accountName"] == "Consented" and shown["username"] == body["emailAddress"]
    assert shown["authType"] == "oauth2" and shown["oauth2"]["tokenState"] == "valid"
    assert run_sync(api, user, account_id)[0]["status"] == "success"

    # The same redirect again (a replay, or a reload): nothing more is made.
    replayed = api.get(callback, follow_redirects=False)
    assert_error_shape(replayed, 403, "OAUTH2_STATE_INVALID")
    assert api.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 1
    # Another user never sees what the flow made.
    assert make_user().headers and account_id not in api.get("/api/accounts", headers=make_user().headers).text


def test_the_outcome_goes_into_the_query_of_a_return_url_with_a_fragment(api, user, oauth2_server):
    # A single-page app's route after "#": the outcome used to be appended to the fragment.
    started, body = begin(api, user, returnUrl=RETURN_URL + "?tab=accounts#/mail/accounts")
    assert started.status_code == 200, started.text
    finished = api.get(consent(started.json()["authorizationUrl"], body["emailAddress"]), follow_redirects=False)
    assert finished.status_code == 303, finished.text
    target = urlsplit(finished.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == RETURN_URL
    assert target.fragment == "/mail/accounts"
    outcome = parse_qs(target.query)
    assert outcome["tab"] == ["accounts"] and outcome["status"] == ["connected"] and outcome["accountId"]


def test_unknown_expired_and_declined_flows_create_nothing(api, rt, user, oauth2_server):
    assert_error_shape(
        api.get("/api/oauth2/callback?state=made-up&code=x", follow_redirects=False), 403, "OAUTH2_STATE_INVALID"
    )
    assert_error_shape(api.get("/api/oauth2/callback", follow_redirects=False), 403, "OAUTH2_STATE_INVALID")

    started, body = begin(api, user)
    callback = consent(started.json()["authorizationUrl"], body["emailAddress"])
    with rt.db.maintenance_session() as session:
        session.execute(text("UPDATE oauth2_states SET expires_at = now() - interval '1 second'"))
    assert_error_shape(api.get(callback, follow_redirects=False), 403, "OAUTH2_STATE_INVALID")

    started, body = begin(api, user)
    state = parse_qs(urlsplit(started.json()["authorizationUrl"]).query)["state"][0]
    declined = api.get(f"/api/oauth2/callback?state={state}&error=access_denied", follow_redirects=False)
    assert declined.status_code == 303
    assert parse_qs(urlsplit(declined.headers["location"]).query)["status"] == ["failed"]
    assert api.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 0


def test_a_flow_must_return_to_an_allowed_url_and_use_a_configured_provider(api, user):
    for bad in (
        "https://evil.example.net/settings/mail",
        "https://app.example.com/other",
        "https://app.example.com@evil.example.net/settings/mail",
    ):
        assert_error_shape(begin(api, user, returnUrl=bad)[0], 400, "RETURN_URL_NOT_ALLOWED")
    unknown = api.post(
        "/api/oauth2/nobody/authorize",
        json={"returnUrl": RETURN_URL, "emailAddress": "a@example.com"},
        headers=user.headers,
    )
    assert_error_shape(unknown, 400, "OAUTH2_PROVIDER_UNKNOWN")
    assert_error_shape(begin(api, user, accountId="not-mine")[0], 404)
    # A NUL no column can hold, in a field with no pattern: the caller's error, not the service's.
    for fields in ({"accountId": "\x00"}, {"returnUrl": RETURN_URL + "\x00"}, {"accountName": "Work\x00"}):
        assert_error_shape(begin(api, user, **fields)[0], 400)


def test_a_flow_for_an_account_that_cannot_take_tokens_ends_back_on_the_callers_page(api, user, oauth2_server):
    pop3 = api.post("/api/accounts", json=account_body(protocol="pop3", port=995), headers=user.headers)
    assert pop3.status_code == 201, pop3.text
    assert_error_shape(begin(api, user, accountId=pop3.json()["id"])[0], 409, "OAUTH2_NOT_SUPPORTED")

    # The account goes while the user is at the provider: the browser still returns to the page.
    imap = api.post("/api/accounts", json=account_body(), headers=user.headers).json()["id"]
    started, body = begin(api, user, accountId=imap)
    callback = consent(started.json()["authorizationUrl"], body["emailAddress"])
    assert api.delete(f"/api/accounts/{imap}", headers=user.headers).status_code == 204
    answer = api.get(callback, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    assert parse_qs(urlsplit(answer.headers["location"]).query)["reason"] == ["account_not_found"]


def test_tokens_given_while_a_refresh_is_under_way_are_the_ones_kept(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    fresh = oauth2_server.issue(oauth2_server.service, mailbox.name)
    given = {"oauth2": {"provider": PROVIDER, "refreshToken": fresh.refresh_token}}
    with ThreadPoolExecutor(1) as pool, rt.db.tenant_session(user.principal) as refreshing:
        # A refresh holds the account's tokens and is about to store what the provider gave it.
        hold_refresh(refreshing, account_id)
        put = pool.submit(api.put, f"/api/accounts/{account_id}", json=given, headers=user.headers)
        time.sleep(0.5)
        refreshing.execute(
            text("UPDATE accounts SET oauth2_refresh_token_encrypted = :token WHERE id = :id"),
            {"token": rt.cipher.encrypt("rotated-by-the-refresh"), "id": account_id},
        )
    assert put.result(timeout=30).status_code == 200
    kept = rt.cipher.decrypt(stored(rt, account_id).oauth2_refresh_token_encrypted)
    assert kept == fresh.refresh_token


def test_a_refusal_of_old_tokens_does_not_fail_the_new_ones_given_meanwhile(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    # A login refused with the refreshed token while the user signs in again (the usual answer
    # to such a refusal): the refusal was marked after the new tokens and failed them too.
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, with_access_token(oauth2_dovecot, mailbox, grant))
    source = TokenSource(rt.db, rt.cipher, user.principal, account_id)
    fresh = oauth2_server.issue(oauth2_server.service, mailbox.name)
    given = {
        "provider": PROVIDER,
        "refreshToken": fresh.refresh_token,
        "accessToken": fresh.access_token,
        "expiresAt": int(time.time() * 1000) + 3_600_000,
    }
    response = api.put(f"/api/accounts/{account_id}", json={"oauth2": given}, headers=user.headers)
    assert response.status_code == 200, response.text

    outcome = source.server_refused_refreshed("imap.example.test:993", grant.access_token)
    assert isinstance(outcome, ConnectionFailed) and not isinstance(outcome, TokenRefreshFailed)
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
    assert source.access_token() == fresh.access_token
    assert run_sync(api, user, account_id)[0]["status"] == "success"

    # The token still the account's is marked, as before: nothing changes until new ones come.
    outcome = source.server_refused_refreshed("imap.example.test:993", fresh.access_token)
    assert isinstance(outcome, TokenRefreshFailed)
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "refresh_failed"


def test_a_refresh_ending_after_a_switch_to_a_password_leaves_no_tokens_behind(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    source = TokenSource(rt.db, rt.cipher, user.principal, account_id, rt.settings.oauth2_providers, timeout=20.0)
    oauth2_server.token_trickle = 0.005  # the refresh is still reading its answer when the switch comes
    try:
        with ThreadPoolExecutor(1) as pool:
            refreshing = pool.submit(source.access_token)
            time.sleep(0.5)
            switched = api.put(
                f"/api/accounts/{account_id}",
                json={"authType": "password", "password": mailbox.password},
                headers=user.headers,
            )
            assert switched.status_code == 200, switched.text
            refreshing.result(timeout=30)
    finally:
        oauth2_server.token_trickle = None
    row = stored(rt, account_id)
    assert row.auth_type == "password" and row.oauth2_token_state is None
    assert row.oauth2_access_token_encrypted is None and row.oauth2_refresh_token_encrypted is None
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_a_return_url_can_neither_break_the_redirect_nor_climb_out_of_the_allowed_path(api, user):
    for bad in (
        # A line break would end the callback's Location header (a 500 after the account was made).
        RETURN_URL + "/\r\nSet-Cookie: session=evil",
        RETURN_URL + "/\tdone",
        # Dot segments the browser resolves: the allowed path's prefix would mean nothing.
        RETURN_URL + "/../../admin",
        RETURN_URL + "/%2e%2E/%2E%2e/admin",
        RETURN_URL + "/..",
    ):
        assert_error_shape(begin(api, user, returnUrl=bad)[0], 400, "RETURN_URL_NOT_ALLOWED")
    assert begin(api, user, returnUrl=RETURN_URL + "/done..again/ok?x=..")[0].status_code == 200


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"access_token": "a", "refresh_token": "r", "token_type": "Bearer", "expires_in": 1e400}'),
        (200, b'{"access_token": "a", "refresh_token": "r", "token_type": "Bearer", "expires_in": [3600]}'),
        (400, b'{"error": {"code": "invalid_grant"}}'),
        (200, b"<html><body>Sign in to the corporate proxy</body></html>"),
    ],
)
def test_a_token_endpoint_answering_garbage_fails_cleanly_and_the_grant_is_kept(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox, status, body
):
    started, fields = begin(api, user)
    callback = consent(started.json()["authorizationUrl"], fields["emailAddress"])
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    oauth2_server.token_reply = (status, body, "text/html" if body.startswith(b"<") else "application/json")
    try:
        # The browser goes back to the caller's page, told the exchange failed.
        finished = api.get(callback, follow_redirects=False)
        assert finished.status_code == 303, finished.text
        assert parse_qs(urlsplit(finished.headers["location"]).query)["status"] == ["failed"]
        # A sync says the token endpoint is at fault, not the mail server, and tries again later.
        failed, _ = run_sync(api, user, account_id)
    finally:
        oauth2_server.token_reply = None
    assert failed["status"] == "failure" and f"the {PROVIDER} token endpoint" in failed["error"], failed
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_a_token_endpoint_redirecting_elsewhere_is_not_sent_the_secrets(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    # A 307 is followed with the same body: the client secret and the refresh token (or the
    # code and its verifier) went wherever the endpoint sent them.
    started, fields = begin(api, user)
    callback = consent(started.json()["authorizationUrl"], fields["emailAddress"])
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    oauth2_server.token_redirect = f"{oauth2_server.url}/collect"
    try:
        finished = api.get(callback, follow_redirects=False)
        assert parse_qs(urlsplit(finished.headers["location"]).query)["status"] == ["failed"]
        failed, _ = run_sync(api, user, account_id)
    finally:
        oauth2_server.token_redirect = None
    assert oauth2_server.collected == []
    assert failed["status"] == "failure" and f"the {PROVIDER} token endpoint" in failed["error"], failed
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
    assert run_sync(api, user, account_id)[0]["status"] == "success"


def test_a_token_lifetime_beyond_any_date_is_kept_within_bounds(api, rt, user, oauth2_server, oauth2_dovecot, mailbox):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    oauth2_server.expires_in = 10**15
    try:
        assert run_sync(api, user, account_id)[0]["status"] == "success"
    finally:
        oauth2_server.expires_in = 3600
    assert account(api, user, account_id)["oauth2"]["accessTokenExpiresAt"] > time.time() * 1000


def test_a_token_endpoint_answering_byte_by_byte_is_given_up_on_at_the_timeout(
    api, rt, user, oauth2_server, oauth2_dovecot, mailbox
):
    grant = oauth2_server.issue(oauth2_server.service, mailbox.name)
    account_id = create_account(api, user, oauth2_body(oauth2_dovecot, mailbox, {"refreshToken": grant.refresh_token}))
    providers = load_providers(oauth2_server.provider_env())
    # Each byte well within the read timeout, the whole answer (about 150 bytes) a minute late.
    oauth2_server.token_trickle = 0.4
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionFailed, match="did not answer in time"):
            TokenSource(rt.db, rt.cipher, user.principal, account_id, providers, timeout=2.0).access_token()
        waited = time.monotonic() - started
        # The account's token lock went with it: the next session is not kept waiting behind it.
        with rt.db.tenant_session(user.principal) as session:
            session.execute(text("SET LOCAL lock_timeout = '1s'"))
            hold_refresh(session, account_id)
    finally:
        oauth2_server.token_trickle = None
    assert waited < 6
    assert account(api, user, account_id)["oauth2"]["tokenState"] == "valid"
