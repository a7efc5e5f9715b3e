"""gkd's HTTP calls: one request with a deadline on the whole exchange.

A socket timeout (`urlopen(timeout=...)`) bounds each read, not the request: a server that trickles a byte every half
second keeps such a request waiting for ever. Here a timer shuts down the request's sockets when its time is up,
whatever it is doing (connecting, sending, waiting for headers, reading the body), and the request raises
`TimeoutError`. The request goes through urllib, so proxies set in the environment apply as with `urlopen`.
"""

import functools
import http.client
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class Answer:
    """What a server answered: any HTTP status (an error status is an answer too: its body says why)."""

    status: int
    body: bytes
    content_type: str


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> Answer:
    """Send one request and read its whole answer within `timeout` seconds, end to end.

    Raises `TimeoutError` when the time is up, otherwise what urllib and http.client raise for a server that cannot
    be reached or answers half: `OSError` (`urllib.error.URLError` among them) or `http.client.HTTPException`.
    Name resolution (DNS) runs before the first socket exists and is not bounded here."""
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(_Handler(deadline), _SecureHandler(deadline))
    prepared = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with deadline:
            try:
                response = opener.open(prepared, timeout=timeout)
            except urllib.error.HTTPError as error:
                if error.fp is None:
                    return Answer(error.code, b"", "")
                response = error
            with response:
                answer = Answer(response.status, response.read(), response.headers.get("Content-Type") or "")
    except (OSError, http.client.HTTPException):
        if deadline.expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout:g} s") from None
        raise
    if deadline.expired.is_set():  # a body read until the connection closed ends early, without an error
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    return answer


class _Deadline:
    """Shuts down every socket of one request when `seconds` have passed since it started."""

    def __init__(self, seconds: float):
        self.expired = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()

    def create_connection(self, address, timeout, source_address=None, *args):
        """`socket.create_connection`, the socket watched from then on (connecting itself is bounded by `timeout`)."""
        sock = socket.create_connection(address, timeout, source_address, *args)
        with self.lock:
            self.sockets.append(sock)
            expired = self.expired.is_set()
        if expired:
            sock.close()
            raise TimeoutError("time was up while connecting")
        return sock

    def _expire(self):
        with self.lock:
            self.expired.set()
            for sock in self.sockets:
                try:  # wakes a read blocked in another thread; the fd stays open for its owner to close
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Connection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        # http.client opens its socket through this attribute (HTTPS wraps that socket in TLS afterwards, so the
        # handshake is watched too).
        self._create_connection = deadline.create_connection


class _SecureConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = deadline.create_connection


class _Handler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_Connection, deadline=self.deadline), req)


class _SecureHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):  # the default TLS context, as urlopen's
        return self.do_open(functools.partial(_SecureConnection, deadline=self.deadline), req)
