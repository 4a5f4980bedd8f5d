"""The official MCP SDK (PyPI `mcp`) through two Portcullis instances.

Two members each run the SDK's Streamable HTTP server with stateful sessions (the SDK keeps its
session map in memory). Two Portcullis instances share the route's envelope keys and nothing
else. The SDK's client discovers the authorization server from the proxy's 401 and the
protected-resource metadata, registers, authorizes and gets a token (from a small
authorization server here that mints what Portcullis verifies), then initialises, lists tools,
calls a tool that streams progress over SSE, and calls again, each request sent to the other
instance. Every request with the session must reach the member that created it. Then the
refusals: another subject replaying the session id, a tampered one, a tool the token does not
grant (a JSON-RPC error through the SDK), a mismatched `Mcp-Method`, an evil `Origin`; and the
stateless revision (2026-07-28) through the SDK's default mode.

    tests/mcp/run.sh        (installs the SDK into target/mcp-sdk, then runs this)

Environment: PORTCULLIS_BIN (the portcullis binary; tests/procs.py). Loopback only; ports are bound as 0 and handed over
(the members' sockets here, the proxies' from their log lines). Prints `mcp: N passed, M failed`.
"""

import asyncio
import logging
import base64
import itertools
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from urllib.parse import parse_qs, urlencode, urlparse

import httpx2
import jwt
import uvicorn
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from mcp import Client
from mcp.client.auth import OAuthClientProvider, TokenStorage
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from procs import proxy, stop_all  # noqa: E402

EDGE = "mcp.test"  # the proxy's name in the resource id; mapped to the instances below
IDP = "auth.test"  # the authorization server's name; mapped to the server below
RESOURCE = f"https://{EDGE}/agents/a1/mcp"
GRANTED = "mcp:a1:tools/call:whoami mcp:a1:tools/call:slow"

SEEN = []  # (member, HTTP method, mcp-session-id, mcp-method) of every request a member got


def bind():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s, s.getsockname()[1]


def member_app(name):
    """An SDK server with stateful sessions, logging what reaches it."""
    server = MCPServer(f"member-{name}")

    @server.tool()
    async def whoami() -> str:
        return name

    @server.tool()
    async def slow(n: int, ctx: Context) -> str:
        for i in range(n):
            await ctx.report_progress(i + 1, n, f"step {i + 1}")
            await asyncio.sleep(0.02)
        return name

    @server.tool()
    async def secret() -> str:
        return "the secret"

    app = server.streamable_http_app(
        stateless_http=False,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))

    async def logged(scope, receive, send):
        if scope["type"] == "http":
            h = {k.decode(): v.decode() for k, v in scope["headers"]}
            SEEN.append((name, scope["method"], h.get("mcp-session-id"), h.get("mcp-method")))
        await app(scope, receive, send)
    return logged


def idp_app(secret_key):
    """An authorization server: metadata, registration, an authorize step that approves at once,
    and a token endpoint that mints the JWT Portcullis verifies (aud: the resource asked for)."""
    issuer = f"https://{IDP}"
    codes = {}

    async def meta(_):
        return JSONResponse({
            "issuer": issuer, "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token", "registration_endpoint": f"{issuer}/register",
            "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
        })

    async def register(req):
        body = await req.json()
        return JSONResponse({**body, "client_id": "sdk-client", "token_endpoint_auth_method": "none"},
                            status_code=201)

    async def authorize(req):
        q = dict(req.query_params)
        code = secrets.token_urlsafe(12)
        codes[code] = q
        return RedirectResponse(q["redirect_uri"] + "?" + urlencode({"code": code, "state": q["state"],
                                                                     "iss": issuer}), status_code=302)

    async def token(req):
        form = dict(await req.form())
        asked = codes.pop(form.get("code", ""), None)
        if asked is None:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        claims = {"sub": "alice", "iss": issuer, "aud": form.get("resource"), "agents": ["a1"],
                  "scope": GRANTED, "exp": int(time.time()) + 600}
        return JSONResponse({"access_token": jwt.encode(claims, secret_key, algorithm="HS256"),
                             "token_type": "Bearer", "expires_in": 600})

    return Starlette(routes=[Route("/.well-known/oauth-authorization-server", meta),
                             Route("/register", register, methods=["POST"]),
                             Route("/authorize", authorize), Route("/token", token, methods=["POST"])])


class Names(httpx2.AsyncBaseTransport):
    """The client's resolver: the proxy's name goes to the two instances in turn (TLS, the
    certificate checked for the name), the authorization server's to its plain port."""

    def __init__(self, instances, idp_port, ca):
        ctx = ssl.create_default_context(cafile=ca)
        self.tls = httpx2.AsyncHTTPTransport(verify=ctx)
        self.plain = httpx2.AsyncHTTPTransport()
        self.instances = list(instances)
        self.turn = itertools.cycle(instances)
        self.idp_port = idp_port
        self.used = []

    async def handle_async_request(self, req):
        # A request sent again (the OAuth flow's retry with its token) has been mapped already.
        again = req.url.host == "127.0.0.1" and req.url.port in self.instances
        if req.url.host == EDGE or again:
            port = next(self.turn)
            self.used.append(port)
            req.extensions = {**req.extensions, "sni_hostname": EDGE}
            req.url = req.url.copy_with(host="127.0.0.1", port=port)
            return await self.tls.handle_async_request(req)
        if req.url.host == IDP or (req.url.host == "127.0.0.1" and req.url.port == self.idp_port):
            req.url = req.url.copy_with(scheme="http", host="127.0.0.1", port=self.idp_port)
            return await self.plain.handle_async_request(req)
        raise httpx2.ConnectError(f"no such host here: {req.url.host}")


class Memory(TokenStorage):
    def __init__(self):
        self.tokens, self.client = None, None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, info):
        self.client = info


def start_proxy(procs, run, n, members, hs_path, keys_path):
    config = f"""
[[listeners]]
addresses = ["127.0.0.1:0"]
tls = true
[tls]
cert = "{run}/edge.crt"
key = "{run}/edge.key"
[admin]
address = "127.0.0.1:0"
[fleet]
state_dir = "{run}/state-{n}"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "{hs_path}"
[[routes]]
name = "mcp"
path = "/agents/{{agent}}/mcp"
kind = "mcp"
backend_path = "/mcp"
backends = [{", ".join(f'"{m}"' for m in members)}]
[routes.balance]
policy = "round_robin"
[routes.auth]
agent_claim = "agents"
required_claims = ["sub"]
[routes.mcp]
tool_scope = "mcp:{{agent}}:tools/call:{{tool}}"
metric_tools = ["whoami", "slow"]
[routes.affinity]
keys_file = "{keys_path}"
[routes.resource]
id = "https://{EDGE}/agents/{{agent}}/mcp"
authorization_servers = ["https://{IDP}"]
scopes_supported = ["mcp:a1:tools/call:whoami", "mcp:a1:tools/call:slow"]
"""
    path = f"{run}/portcullis-{n}.toml"
    with open(path, "w") as f:
        f.write(config)
    [port] = proxy(procs, path, r"listening.*addr=127\.0\.0\.1:(\d+).*tls=true", seconds=30)
    return int(port)


def make_cert(run):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", f"{run}/edge.key", "-out", f"{run}/edge.crt", "-days", "2",
                    "-subj", f"/CN={EDGE}", "-addext", f"subjectAltName=DNS:{EDGE}"],
                   check=True, capture_output=True)


class Checks:
    def __init__(self):
        self.passed, self.failed = [], []

    async def check(self, name, coro):
        try:
            detail = await coro
            self.passed.append(name)
            print(f"  ok: {name}{': ' + detail if isinstance(detail, str) else ''}")
        except Exception as e:  # noqa: BLE001 (a check that fails for any reason is a failure)
            self.failed.append(name)
            while isinstance(e, BaseExceptionGroup) and e.exceptions:
                e = e.exceptions[0]
            print(f"  FAILED: {name}: {type(e).__name__}: {e}")


async def main():
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    run = tempfile.mkdtemp(prefix="portcullis-mcp-")
    procs, servers = [], []
    checks = Checks()
    try:
        make_cert(run)
        # Text, not raw bytes: the proxy removes a secret file's trailing whitespace (as documented),
        # so 32 random bytes ending in one (2 % of runs) signed tokens it could never verify.
        hs = secrets.token_urlsafe(32).encode()
        with open(f"{run}/hs.key", "wb") as f:
            f.write(hs)
        with open(f"{run}/envelope.keys", "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")

        members = {}
        for name in ("m1", "m2"):
            sock, port = bind()
            members[name] = port
            s = uvicorn.Server(uvicorn.Config(member_app(name), log_level="warning"))
            servers.append((s, asyncio.create_task(s.serve(sockets=[sock]))))
        idp_sock, idp_port = bind()
        s = uvicorn.Server(uvicorn.Config(idp_app(hs), log_level="warning"))
        servers.append((s, asyncio.create_task(s.serve(sockets=[idp_sock]))))
        while not all(s.started for s, _ in servers):
            await asyncio.sleep(0.02)
        addrs = [f"127.0.0.1:{p}" for p in members.values()]
        instances = [start_proxy(procs, run, n, addrs, f"{run}/hs.key", f"{run}/envelope.keys") for n in (1, 2)]
        names = Names(instances, idp_port, f"{run}/edge.crt")
        timeout = httpx2.Timeout(30, read=120)
        state = {}

        async def discovered_and_stateful():
            box = {}

            async def redirect_handler(url):
                async with httpx2.AsyncClient(transport=names) as c:
                    r = await c.get(url, follow_redirects=False)
                q = parse_qs(urlparse(r.headers["location"]).query)
                box.update(code=q["code"][0], state=q["state"][0], iss=q["iss"][0])

            async def callback_handler():
                return AuthorizationCodeResult(code=box["code"], state=box["state"], iss=box["iss"])

            storage = Memory()
            oauth = OAuthClientProvider(
                server_url=RESOURCE,
                client_metadata=OAuthClientMetadata(redirect_uris=[AnyHttpUrl("http://127.0.0.1:1/callback")],
                                                    client_name="portcullis-test"),
                storage=storage, redirect_handler=redirect_handler, callback_handler=callback_handler)
            first = len(SEEN)
            sessions = set()

            async def keep_session(response):
                sid = response.headers.get("mcp-session-id")
                if sid:
                    sessions.add(sid)
            async with httpx2.AsyncClient(transport=names, auth=oauth, timeout=timeout,
                                          event_hooks={"response": [keep_session]}) as hc:
                # The session stays open at the server for the refusals below (no DELETE at exit).
                transport = streamable_http_client(RESOURCE, http_client=hc, terminate_on_close=False)
                async with Client(transport, mode="legacy") as c:
                    tools = await c.list_tools()
                    assert {t.name for t in tools.tools} >= {"whoami", "slow"}, tools
                    progress = []

                    async def on_progress(p, total, message):
                        progress.append((p, total, message))
                    slow = await c.call_tool("slow", {"n": 3}, progress_callback=on_progress)
                    assert [p for p, _, _ in progress] == [1, 2, 3], progress
                    again = await c.call_tool("whoami", {})
                    owner = slow.content[0].text
                    assert again.content[0].text == owner, (owner, again.content[0].text)
            assert storage.tokens is not None, "the SDK got its token from the discovered server"
            assert len(sessions) == 1 and next(iter(sessions)).startswith("pc1."), f"one stable session id: {sessions}"
            state.update(envelope=next(iter(sessions)), token=storage.tokens.access_token, owner=owner)
            with_session = [s for s in SEEN[first:] if s[2]]
            assert with_session, "requests carried the session"
            assert {s[0] for s in with_session} == {owner}, f"every session request reaches {owner}: {with_session}"
            assert not any(s[2].startswith("pc1.") for s in with_session), "the members get their own ids"
            used = set(names.used)
            assert used == set(instances), f"both instances carried the session: {used}"
            return (f"401 -> metadata -> authorization server -> token; {len(with_session)} session requests "
                    f"through both instances, all on {owner}; progress {progress}")

        await checks.check("the SDK discovers the authorization server, and a session stays on its member",
                           discovered_and_stateful())

        async def raw(method, headers, body=None):
            async with httpx2.AsyncClient(transport=names, timeout=timeout) as hc:
                return await hc.request(method, RESOURCE, headers=headers, content=body)

        def bearer(sub, scope=GRANTED):
            claims = {"sub": sub, "iss": f"https://{IDP}", "aud": RESOURCE, "agents": ["a1"], "scope": scope,
                      "exp": int(time.time()) + 600}
            return "Bearer " + jwt.encode(claims, hs, algorithm="HS256")

        base = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                "mcp-protocol-version": "2025-11-25"}
        ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})

        async def replay_by_another_subject():
            assert state, "no session from the first check"
            r = await raw("POST", {**base, "authorization": bearer("mallory"), "mcp-session-id": state["envelope"]},
                          ping)
            assert r.status_code == 404, (r.status_code, r.text)
            ok = await raw("POST", {**base, "authorization": bearer("alice"), "mcp-session-id": state["envelope"]},
                           ping)
            assert ok.status_code == 200, (ok.status_code, ok.text)
            return "mallory 404, alice 200"

        await checks.check("another subject replaying the session id gets 404", replay_by_another_subject())

        async def tampered():
            env = state["envelope"]
            flipped = env[:-3] + ("A" if env[-3] != "A" else "B") + env[-2:]
            r = await raw("POST", {**base, "authorization": bearer("alice"), "mcp-session-id": flipped}, ping)
            assert r.status_code == 404, (r.status_code, r.text)

        await checks.check("a tampered session id gets 404", tampered())

        async def not_granted():
            before = len(SEEN)
            async with httpx2.AsyncClient(transport=names, timeout=timeout,
                                          headers={"authorization": bearer("alice")}) as hc:
                async with Client(streamable_http_client(RESOURCE, http_client=hc), mode="legacy") as c:
                    try:
                        await c.call_tool("secret", {})
                    except Exception as e:  # noqa: BLE001 (the SDK's McpError, whatever its module)
                        text = str(e)
                        assert "secret" in text and "grant" in text, text
                        code = getattr(getattr(e, "error", None), "code", None)
                        assert code == -32602, (code, text)
                    else:
                        raise AssertionError("the call went through")
            calls = [s for s in SEEN[before:] if s[3] == "tools/call"]
            assert not calls, f"a tools/call reached a member: {calls}"
            return f"McpError {code}: {text}"

        await checks.check("a tool the token does not grant is a JSON-RPC error", not_granted())

        async def deleted():
            auth = {"authorization": bearer("alice"), "mcp-session-id": state["envelope"],
                    "mcp-protocol-version": "2025-11-25"}
            r = await raw("DELETE", auth)
            assert r.status_code == 200, (r.status_code, r.text)
            after = [await raw("POST", {**base, **auth}, ping) for _ in range(2)]
            assert [a.status_code for a in after] == [404, 404], [(a.status_code, a.text) for a in after]
            return "; ".join(a.text.strip() for a in after)

        await checks.check("a DELETE ends the session: its id is refused through either instance", deleted())

        async def mismatched():
            call = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                               "params": {"name": "whoami", "arguments": {}}})
            r = await raw("POST", {**base, "authorization": bearer("alice"), "mcp-protocol-version": "2026-07-28",
                                   "mcp-method": "tools/list", "mcp-name": "whoami"}, call)
            assert r.status_code == 400, (r.status_code, r.text)
            assert r.json()["error"]["code"] == -32020, r.text

        await checks.check("a mismatched Mcp-Method is refused", mismatched())

        async def evil_origin():
            r = await raw("POST", {**base, "authorization": bearer("alice"), "origin": "https://evil.example"}, ping)
            assert r.status_code == 403, (r.status_code, r.text)

        await checks.check("an evil Origin gets 403", evil_origin())

        async def stateless():
            before = len(SEEN)
            async with httpx2.AsyncClient(transport=names, timeout=timeout,
                                          headers={"authorization": bearer("alice")}) as hc:
                async with Client(streamable_http_client(RESOURCE, http_client=hc)) as c:
                    version = c.protocol_version
                    r = await c.call_tool("whoami", {})
                    r2 = await c.call_tool("whoami", {})
            methods = [s[3] for s in SEEN[before:]]
            assert "tools/call" in methods, methods
            assert not any(s[2] for s in SEEN[before:]), "no session in the stateless revision"
            return f"revision {version}: {r.content[0].text}, {r2.content[0].text}"

        await checks.check("the stateless revision works through the proxy", stateless())
    finally:
        stop_all(procs)
        for s, _ in servers:
            s.should_exit = True
        for _, t in servers:
            try:
                await asyncio.wait_for(t, 10)
            except Exception:  # noqa: BLE001
                pass
    print(f"mcp: {len(checks.passed)} passed, {len(checks.failed)} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
