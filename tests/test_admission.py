"""The gateway's handshake checks on real loopback websockets (no model): the per-address table,
repeated headers and the trusted proxies' X-Forwarded-For."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from server.admission import Admission, ChatSocket, client_address

TOKEN = "s3cret"


@asynccontextmanager
async def gateway(cap: int, trusted: Sequence[str] = ("127.0.0.0/8", "::1")) -> AsyncIterator[tuple[Admission, int]]:
    adm = Admission(
        token=TOKEN,
        origin_allowed=lambda o: True,
        site_origin=lambda o: False,
        max_per_address=cap,
        trusted_proxies=trusted,
    )

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(
        handler,
        "127.0.0.1",
        0,
        process_request=adm.check,
        select_subprotocol=adm.select_subprotocol,
        create_connection=ChatSocket,
    ) as srv:
        yield adm, next(iter(srv.sockets)).getsockname()[1]


async def wait_empty(adm: Admission) -> None:
    for _ in range(100):  # the server sees each close a moment after the client
        if not adm._by_address:
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("cap", [0, 3], ids=["no cap", "cap 3"])
async def test_closed_connections_leave_the_per_address_table(cap: int) -> None:
    async with gateway(cap) as (adm, port):
        for i in range(50):
            headers = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": f"10.0.0.{i}"}
            async with connect(f"ws://127.0.0.1:{port}", additional_headers=headers):
                pass
        await wait_empty(adm)
        assert adm._by_address == {}


async def test_a_repeated_origin_or_authorization_header_gets_400_and_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with gateway(100) as (_, port):
        for name, values in (
            ("Authorization", [f"Bearer {TOKEN}", "Bearer x"]),
            ("Origin", ["https://a", "https://b"]),
        ):
            with pytest.raises(InvalidStatus) as err:
                await connect(f"ws://127.0.0.1:{port}", additional_headers=[(name, v) for v in values])
            assert err.value.response.status_code == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "more than one" in r.getMessage()]) == 2


def test_x_forwarded_for_is_read_from_trusted_proxies_only() -> None:
    proxies = Admission(
        token=None, origin_allowed=bool, site_origin=bool, max_per_address=1, trusted_proxies=["172.18.0.0/16", "::1"]
    ).trusted_proxies
    xff = Headers([("X-Forwarded-For", "6.6.6.6, 198.51.100.7:5123"), ("X-Forwarded-For", "172.18.0.9")])
    # a proxy container on the docker network: its client's address, past another trusted hop, port stripped
    assert client_address(("172.18.0.2", 4000), xff, proxies) == "198.51.100.7"
    assert (
        client_address(("::1", 4000, 0, 0), Headers({"X-Forwarded-For": "[2001:db8::1]:443"}), proxies) == "2001:db8::1"
    )
    assert client_address(("203.0.113.5", 4000), xff, proxies) == "203.0.113.5"  # not a proxy: its own address
    assert client_address(("127.0.0.1", 4000), xff, proxies) == "127.0.0.1"  # loopback is not trusted here
    assert client_address(("127.0.0.1", 4000), xff) == "172.18.0.9"  # the default: loopback only, as before


async def test_a_trusted_proxys_clients_are_counted_apart() -> None:
    async with gateway(1, trusted=["127.0.0.0/8"]) as (adm, port):
        url = f"ws://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with connect(url, additional_headers={**auth, "X-Forwarded-For": "198.51.100.7, 127.0.0.5"}):
            async with connect(url, additional_headers={**auth, "X-Forwarded-For": "198.51.100.8"}):
                assert set(adm._by_address) == {"198.51.100.7", "198.51.100.8"}
            with pytest.raises(InvalidStatus) as err:
                await connect(url, additional_headers={**auth, "X-Forwarded-For": "198.51.100.7:9"})
            assert err.value.response.status_code == 429
