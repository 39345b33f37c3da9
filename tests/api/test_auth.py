"""Tokens at the client API's door and on live connections (docs/security.md, "Tokens";
docs/client-protocol.md, "Tokens on a live connection")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import jwt
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_protocol import cluster, connect, ctx

from liferaft.observability.logs import JsonFormatter
from liferaft.security.tokens import mint
from liferaft.testing.localcluster import LocalCluster


def claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "mallory",
        "roles": ["admin"],
        "iss": "liferaft",
        "aud": "liferaft",
        "iat": now,
        "exp": now + 600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bad_tokens(certs: Path) -> dict[str, str | None]:
    private = (certs / "jwt-private.pem").read_bytes()
    key = serialization.load_pem_private_key(private, password=None)
    other = Ed25519PrivateKey.generate()
    public_pem = (certs / "jwt-public.pem").read_bytes()
    return {
        "missing": None,
        "malformed": "not.a.token",
        "expired": jwt.encode(claims(exp=int(time.time()) - 60), key, algorithm="EdDSA"),
        "not_yet_valid": jwt.encode(claims(nbf=int(time.time()) + 600), key, algorithm="EdDSA"),
        "bad_issuer": jwt.encode(claims(iss="someone-else"), key, algorithm="EdDSA"),
        "bad_audience": jwt.encode(claims(aud="another-app"), key, algorithm="EdDSA"),
        "bad_signature": jwt.encode(claims(), other, algorithm="EdDSA"),
        "alg_none": jwt.encode(claims(), None, algorithm="none"),
        # the classic confusion: HMAC "signed" with the server's public key
        "hmac": _hs256(claims(), public_pem),
    }


def _hs256(payload: dict[str, object], secret: bytes) -> str:
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def status_of(c: LocalCluster, token: str | None) -> int | None:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token is not None else []
    try:
        async with trio_websocket.open_websocket_url(
            c.endpoints()[0], ssl_context=ctx(c.certs), extra_headers=headers
        ):
            return None
    except trio_websocket.ConnectionRejected as exc:
        return exc.status_code


async def test_every_bad_token_gets_401_and_no_connection(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        for name, token in bad_tokens(certs).items():
            assert await status_of(c, token) == 401, name
        text = c.nodes["n1"].metrics.exposition().decode()
        for reason in (
            "missing",
            "malformed",
            "expired",
            "not_yet_valid",
            "bad_issuer",
            "bad_audience",
            "bad_signature",
            "bad_algorithm",
        ):
            assert f'liferaft_auth_failures_total{{reason="{reason}"}}' in text, reason
        assert all(n.healthy() for n in c.nodes.values())
        assert await status_of(c, c.token("read")) is None  # a good token still connects


async def test_a_token_that_expires_on_a_live_connection_then_refresh(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        key = (certs / "jwt-private.pem").read_bytes()
        # Valid at connect only thanks to the 5 s leeway; expires for real shortly.
        short = mint(key, sub="t", roles=["read"], ttl_s=1, now=time.time() - 4)
        async with connect(c, short) as r:
            while True:  # poll until the leeway runs out (bounded by the cluster's guard)
                st = await r.call(op="status")
                if not st["ok"]:
                    break
                await trio.sleep(0.2)
            assert st["error"]["code"] == "unauthenticated"
            bad = await r.call(op="refresh", token="garbage")
            assert bad["error"]["code"] == "unauthenticated"
            assert (await r.call(op="refresh", token=c.token("read")))["ok"]
            assert (await r.call(op="status"))["ok"]


@pytest.mark.parametrize("path", ["/", "/v2", "/raft"])
async def test_other_paths_are_not_found(tmp_path: Path, certs: Path, path: str) -> None:
    async with cluster(tmp_path, certs) as c:
        url = c.endpoints()[0].replace("/v1", path)
        headers = [(b"authorization", f"Bearer {c.token()}".encode())]
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(
                url, ssl_context=ctx(c.certs), extra_headers=headers
            ):
                pass
        assert info.value.status_code == 404


async def test_audit_records_name_who_did_what_to_which_key_but_never_the_value(
    tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="liferaft.audit")
    formatter = JsonFormatter()
    async with cluster(tmp_path, certs) as c:
        lead = c.ids.index(await c.wait_leader())
        async with connect(c, c.token("read,write", sub="alice"), lead) as r:
            assert (await r.call(op="put", key="audited", value=b"s3cret-value"))["ok"]
        async with connect(c, c.token("read", sub="bob"), lead) as r:
            assert (await r.call(op="put", key="nope", value=b"s3cret-value"))["error"]
        assert await status_of(c, "garbage") == 401
    lines = [
        json.loads(formatter.format(rec)) for rec in caplog.records if rec.name == "liferaft.audit"
    ]
    # Writes are audited one record per message and outcome, listing the keys.
    assert {"subject": "alice", "op": "put", "keys": ["audited"], "result": "ok"}.items() <= next(
        x for x in lines if x.get("keys") == ["audited"]
    ).items()
    assert any(
        x["subject"] == "bob" and x["result"] == "permission_denied" and x["keys"] == ["nope"]
        for x in lines
    )
    assert any(x["op"] == "connect" and "unauthenticated" in x["result"] for x in lines)
    assert all("remote" in x and x["msg"] == "audit" for x in lines)
    assert "s3cret-value" not in json.dumps(lines)


def _expiring(certs: Path, *, in_s: float, **kw: object) -> str:
    """A token the node accepts now (its 5 s leeway) that expires ``in_s`` from now."""
    key = (certs / "jwt-private.pem").read_bytes()
    return mint(key, sub="watcher", ttl_s=1, now=time.time() + in_s - 6, **kw)  # type: ignore[arg-type]


async def _watch_events(r: object, wid: int) -> list[dict[str, object]]:
    return [m for m in r.events if m["watch_id"] == wid]  # type: ignore[attr-defined]


async def test_an_expired_token_ends_its_watches_with_a_final_message_and_an_audit_record(
    tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="liferaft.audit")
    async with cluster(tmp_path, certs) as c:
        lead = c.ids.index(await c.wait_leader())
        async with (
            connect(c, _expiring(certs, in_s=1.5, roles=["read"]), lead) as r,
            connect(c, c.token("read,write"), lead) as w,
        ):
            wid = (await r.call(op="watch", prefix="x/"))["watch_id"]
            await w.call(op="put", key="x/before", value=b"1")
            while not r.events:
                await r._pump()
            assert r.events[0]["events"][0]["kv"]["key"] == "x/before"
            while not any(m.get("canceled") for m in r.events):  # the expiry ends it
                await r._pump()
            final = r.events[-1]
            assert final["watch_id"] == wid and final["error"]["code"] == "unauthenticated"
            # Nothing written after the expiry reaches the expired connection.
            await w.call(op="put", key="x/after", value=b"2")
            assert (await r.call(op="get", key="x/after"))["error"]["code"] == "unauthenticated"
            delivered = [e["kv"]["key"] for m in r.events for e in m["events"]]
            assert delivered == ["x/before"]
    formatter = JsonFormatter()
    audit = [
        json.loads(formatter.format(rec)) for rec in caplog.records if rec.name == "liferaft.audit"
    ]
    ended = [x for x in audit if x["op"] == "watch" and x["result"] == "unauthenticated"]
    assert len(ended) == 1 and ended[0]["subject"] == "watcher" and ended[0]["key"] == "x/"


async def test_a_refresh_before_expiry_keeps_watches_running(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = c.ids.index(await c.wait_leader())
        short = _expiring(certs, in_s=1.0, roles=["read"])
        async with connect(c, short, lead) as r, connect(c, c.token("read,write"), lead) as w:
            wid = (await r.call(op="watch", prefix="y/"))["watch_id"]
            assert (await r.call(op="refresh", token=c.token("read")))["ok"]
            deadline = time.time() + 1.5  # past the first token's expiry and leeway
            while time.time() < deadline:  # noqa: ASYNC110 - waiting for wall time to pass
                await trio.sleep(0.05)
            await w.call(op="put", key="y/1", value=b"")
            while not r.events:
                await r._pump()
            assert r.events[0]["watch_id"] == wid and not r.events[0].get("canceled")
            assert r.events[0]["events"][0]["kv"]["key"] == "y/1"


async def test_a_refresh_that_narrows_the_prefixes_ends_only_the_watches_it_no_longer_covers(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = c.ids.index(await c.wait_leader())
        wide = c.token("read", prefixes=["a/", "b/"])
        async with connect(c, wide, lead) as r, connect(c, c.token("read,write"), lead) as w:
            wa = (await r.call(op="watch", prefix="a/"))["watch_id"]
            wb = (await r.call(op="watch", prefix="b/"))["watch_id"]
            assert (await r.call(op="refresh", token=c.token("read", prefixes=["a/"])))["ok"]
            while not r.events:
                await r._pump()
            ended = r.events[0]
            assert ended["watch_id"] == wb and ended["canceled"] is True
            assert ended["error"]["code"] == "permission_denied"
            await w.call(op="put", key="b/1", value=b"")
            await w.call(op="put", key="a/1", value=b"")
            while len(r.events) < 2:
                await r._pump()
            assert r.events[1]["watch_id"] == wa
            assert [e["kv"]["key"] for e in r.events[1]["events"]] == ["a/1"]
            assert all(m["watch_id"] != wb for m in r.events[1:])
