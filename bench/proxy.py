"""A TCP relay between MQTT clients and a broker that can cut, refuse or partition the line.

    with TcpProxy(broker_url) as proxy:
        client = MqttTransport(proxy.url, "cam0").connect()
        proxy.cut()            # every live connection reset, as by a broken link
        proxy.partition(30)    # nothing relayed for 30 s, sockets left open: a real network cut

The tests own one per client they break; the faults benchmark (fogsplit.bench.faults) puts
one in front of every tier process, to cut one process off the network and to count the bytes
each process sends (``upstream_bytes``: what a client wrote towards the broker, packet headers
included, i.e. its bytes on the wire).

A partition is not a cut. A cut resets the sockets, so both peers learn at once that the link
is gone; a partition only stops relaying, in both directions, and leaves every socket open, so
the peers learn it the way they would over a real network: by their keep-alive timeouts. What
they send meanwhile waits in the kernel's buffers and is relayed when the partition heals, as
TCP would retransmit it; a connection attempted during the partition is accepted (the SYN is
answered by the kernel) but only joined to the broker when it heals, and dropped then if its
client has given up on it (a real network would never have delivered that attempt).

One thread does all the relaying (a selector over every socket), so a proxy costs one thread
however many clients go through it; ``cut``, ``refuse``, ``partition``, ``heal`` and ``close``
are handed to that thread and return once it has done them.
"""
from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
import time
from typing import Callable

from fogsplit.core.mqtt import parse_broker_url

__all__ = ["TcpProxy"]


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN: the peer sees the connection broken, not ended."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _drain(sock: socket.socket) -> bytes | None:
    """What a held client has sent so far, without waiting; None if it has closed its end."""
    chunks = []
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return None
            chunks.append(data)
    except BlockingIOError:
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        if sock.fileno() != -1:
            sock.setblocking(True)


class TcpProxy:
    """Listens on a free loopback port and relays each connection to the broker of ``broker_url``.

    ``upstream_bytes`` counts what clients sent towards the broker, ``downstream_bytes`` what the
    broker sent them; ``connections`` counts the connections relayed."""

    def __init__(self, broker_url: str, *, name: str = "") -> None:
        target = parse_broker_url(broker_url)
        self.target = (target.host, target.port)
        self.name = name
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._peers: dict[socket.socket, socket.socket] = {}
        self._towards_broker: set[socket.socket] = set()
        self._held: list[socket.socket] = []          # clients accepted during a partition
        self._refuse_until = 0.0
        self._partitioned = False
        self._heal_timer: threading.Timer | None = None
        self._stopping = False
        self._requests: queue.Queue[tuple[Callable[[], object], list, threading.Event]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def bytes(self) -> dict[str, int]:
        """The counters now: ``{"up": ..., "down": ...}``."""
        return {"up": self.upstream_bytes, "down": self.downstream_bytes}

    def cut(self) -> int:
        """Reset every live connection, the broker's side first (so the broker sees the loss at
        once and publishes the wills); return how many were cut. The proxy keeps listening."""
        return self._call(self._cut)

    def refuse(self, seconds: float) -> None:
        """Reset every connection attempt for the next ``seconds``, as a broker that is down."""
        self._call(lambda: setattr(self, "_refuse_until", time.monotonic() + seconds))

    def partition(self, seconds: float | None = None) -> None:
        """Stop relaying in both directions, sockets left open; heal after ``seconds`` if given,
        else on :meth:`heal`."""
        self._call(self._partition)
        if seconds is not None:
            self._heal_timer = threading.Timer(seconds, self.heal)
            self._heal_timer.daemon = True
            self._heal_timer.start()

    def heal(self) -> None:
        """End a partition: relay again what waited, and join the connections held meanwhile."""
        if self._heal_timer is not None and self._heal_timer is not threading.current_thread():
            self._heal_timer.cancel()
        self._heal_timer = None
        if self._thread.is_alive():
            self._call(self._heal)

    def close(self) -> None:
        """Stop listening, reset every connection and end the relay thread."""
        if self._heal_timer is not None:
            self._heal_timer.cancel()
        if self._thread.is_alive():
            self._call(lambda: setattr(self, "_stopping", True))
            self._thread.join(5)

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- on the relay thread ------------------------------------------------------------------
    def _call(self, fn: Callable[[], object]):
        done, result = threading.Event(), []
        self._requests.put((fn, result, done))
        self._wake_w.send(b"x")
        if not done.wait(5):
            raise TimeoutError("the proxy's relay thread did not answer")
        return result[0]

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._server:
                        self._accept()
                    elif sock is self._wake_r:
                        self._serve_requests()
                    elif sock in self._peers:
                        self._relay(sock)
        finally:
            self._cut()
            for sock in (self._server, self._wake_r, self._wake_w, *self._held):
                sock.close()
            self._selector.close()

    def _serve_requests(self) -> None:
        self._wake_r.recv(4096)
        while not self._requests.empty():
            fn, result, done = self._requests.get()
            result.append(fn())
            done.set()

    def _accept(self) -> None:
        client, _ = self._server.accept()
        if time.monotonic() < self._refuse_until:
            _reset(client)
        elif self._partitioned:
            self._held.append(client)
        else:
            self._join(client)

    def _join(self, client: socket.socket, pending: bytes = b"") -> None:
        """Connect ``client`` to the broker and relay between them, ``pending`` (what it sent
        while held) first; reset it if the broker is down."""
        try:
            broker = socket.create_connection(self.target, timeout=2)
            if pending:
                broker.sendall(pending)
                self.upstream_bytes += len(pending)
        except OSError:
            _reset(client)
            return
        for sock in (client, broker):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peers[client], self._peers[broker] = broker, client
        self._towards_broker.add(broker)
        self.connections += 1

    def _relay(self, sock: socket.socket) -> None:
        peer = self._peers[sock]
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
        except OSError:
            data = b""
        if not data:
            self._drop(sock, reset=False)
        elif peer in self._towards_broker:
            self.upstream_bytes += len(data)
        else:
            self.downstream_bytes += len(data)

    def _drop(self, sock: socket.socket, *, reset: bool) -> None:
        peer = self._peers.pop(sock)
        del self._peers[peer]
        broker_first = (sock, peer) if sock in self._towards_broker else (peer, sock)
        for s in broker_first:
            self._towards_broker.discard(s)
            if not self._partitioned:
                self._selector.unregister(s)
            if reset:
                _reset(s)
            else:
                s.close()

    def _cut(self) -> int:
        live = list(self._towards_broker)
        for broker in live:
            self._drop(broker, reset=True)
        return len(live)

    def _partition(self) -> None:
        """Stop watching the relayed sockets: nothing is read, so nothing is relayed."""
        if not self._partitioned:
            for sock in self._peers:
                self._selector.unregister(sock)
            self._partitioned = True

    def _heal(self) -> None:
        if not self._partitioned:
            return
        self._partitioned = False
        for sock in self._peers:
            self._selector.register(sock, selectors.EVENT_READ)
        held, self._held = self._held, []
        for client in held:
            pending = _drain(client)
            if pending is None:         # the client gave up meanwhile: its attempt never reaches the broker
                client.close()
            else:
                self._join(client, pending)
