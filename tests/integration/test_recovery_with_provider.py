"""HSM unplug and replug while pkcs11-provider shares the module in the same process (shim).

Measured while building this: if recovery runs C_Finalize under the provider, the provider can
no longer use any key until the process restarts (even a new SSLContext fails). So once the
provider is loaded, recovery only renews sessions and the login; an SSLContext made before the
fault stays stale (pkcs11-provider #494) and a new one works — which the hub watchdog builds.
"""

from __future__ import annotations

import socket
import ssl
import threading

import addresses
import pytest
from service_harness import certify_hsm_key
from tls_client import client_context
from waiting import wait_for

from spyrus_hsm.cloud.hub import HubClient, HubIdentity
from spyrus_hsm.hsm import Hsm, HsmUnavailable, PoolSettings, Secret, TokenSelector
from spyrus_hsm.hsm.library import is_shared
from spyrus_hsm.identity import tls
from spyrus_hsm.identity import x509 as x509_id

pytestmark = [pytest.mark.shim, pytest.mark.timeout(90)]
HOST = addresses.host()


@pytest.fixture
def pool(token_env, tmp_path_factory):  # type: ignore[no-untyped-def]
    token_env.set_shim(state="plugged")
    h = Hsm(PoolSettings(token_env.module, TokenSelector(token_env.label), retry_min=0.05, retry_max=0.2),
            Secret(token_env.pin)).start()
    tls.load_provider(token_env.module, str(token_env.pin_file), tmp_path_factory.mktemp("ossl"))
    yield h
    token_env.set_shim(state="plugged")
    h.close()


def _credential(h: Hsm, label: str, cn: str, issuer, directory) -> x509_id.TlsFiles:  # type: ignore[no-untyped-def]
    certify_hsm_key(h, label, cn, issuer)
    return x509_id.write_tls_files(x509_id.select(h, label=label), h.state.token_label or "", directory)


def _replug(token_env, h: Hsm) -> None:  # type: ignore[no-untyped-def]
    token_env.set_shim(state="unplugged")
    with pytest.raises(HsmUnavailable):
        h.hmac_sha256("anything", b"x")
    token_env.set_shim(state="plugged")
    wait_for(lambda: h.state.ready, 5, "the pool recovered")


def test_new_tls_contexts_work_after_a_replug_with_the_provider_loaded(
        pool, token_env, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = _credential(pool, label, "leaf-" + label, emulator_pki.intermediate, tmp_path)
    server_files = emulator_pki.server(["localhost"])
    server_ctx = tls.server_context(server_files.cert_file, server_files.key_file, emulator_pki.ca_file,
                                    require_client_cert=True)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()

    def handshake() -> bytes:
        ctx = client_context(files.cert_file, files.key_file, emulator_pki.ca_file)
        with ctx.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname="localhost") as c:
            return c.recv(2)

    try:
        assert handshake() == b"ok"
        _replug(token_env, pool)
        assert is_shared(token_env.module)
        assert handshake() == b"ok"   # a fresh context after recovery signs in the HSM again
        assert pool.state.recoveries >= 1
    finally:
        listener.close()


def test_x509_hub_client_dropped_while_unplugged_is_rebuilt_after_replug(
        pool, token_env, make_emulator, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    emu = make_emulator(HOST)
    device = "unplug-" + label
    files = _credential(pool, label, device, emulator_pki.intermediate, tmp_path)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    client = HubClient(pool, HubIdentity(HOST, device, x509=files, server_ca_pem=emulator_pki.ca_pem),
                       reconnect_after=1.0, watch_interval=0.2).connect()
    try:
        token_env.set_shim(state="unplugged")
        with pytest.raises(HsmUnavailable):
            pool.hmac_sha256("anything", b"x")
        emu.drop_connection(device)
        wait_for(lambda: not client.connected, 10, "the client saw the dropped connection")
        token_env.set_shim(state="plugged")
        wait_for(lambda: client.connected and client.stats.rebuilds >= 1, 30, "rebuilt and connected after the replug",
                 every=0.1)
        client.send("after the replug")
        emu.wait_for(lambda: any(t.device_id == device for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()


def _tls_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS connection held in memory on this thread, handshake done: (client, server)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[str] = set()
    while len(done) < 2:
        for name, end in (("client", client), ("server", server)):
            try:
                end.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    return client, server


def test_the_error_the_provider_leaves_after_a_replug_drops_no_api_connection(
        pool, token_env, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # After a replug the provider's first signature (here the module's own client certificate,
    # as the hub connection makes) succeeds on a fresh session but leaves the stale session's
    # "General Error" on the thread's OpenSSL error queue; freeing TLS objects that signed before
    # the replug does the same on the thread the garbage collector runs on. CPython does not clear
    # that queue before SSL_read (python/cpython#81891): the next "no data yet" of an unrelated
    # connection on the thread (the API's event loop serves every leaf) read as a fatal SSLError.
    files = _credential(pool, label, "leaf-" + label, emulator_pki.intermediate, tmp_path)
    server_files = emulator_pki.server(["localhost"])
    mutual = tls.server_context(server_files.cert_file, server_files.key_file, emulator_pki.ca_file,
                                require_client_cert=True)
    # The module's own link (as to the hub), signed with its HSM key and open across the replug.
    module_link = _tls_pair(mutual, client_context(files.cert_file, files.key_file, emulator_pki.ca_file))
    _, api_side = _tls_pair(tls.server_context(server_files.cert_file, server_files.key_file),
                            ssl.create_default_context(cafile=str(emulator_pki.ca_file)))  # a leaf, connected
    _replug(token_env, pool)
    _tls_pair(mutual, client_context(files.cert_file, files.key_file, emulator_pki.ca_file))  # reconnects
    with pytest.raises(ssl.SSLWantReadError):
        api_side.read(4)  # the leaf has sent nothing yet: "want read", not an error
    del module_link
