"""Object-store servers on 127.0.0.1 for the readers' URL tests.

- ``http_server``: serves a temporary directory over HTTP with range requests and HEAD, what
  fsspec's ``http://`` filesystem needs (werkzeug's ``send_file`` implements both, so no
  hand-written HTTP handling).
- ``s3_server``: moto's standalone S3 server, with s3fs pointed at it for the test's duration.

Both are started and stopped by the fixture, and each checks that it left no thread behind.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _threads() -> set[threading.Thread]:
    """Running threads, without fsspec's: it runs its async filesystems (http, s3) on one
    event-loop thread per process ("fsspecIO"), whose default executor keeps worker threads
    (botocore resolves credentials there); both live until the interpreter exits, by design.
    They belong to the client, not to a server, and cannot be stopped without breaking fsspec
    for the rest of the process."""
    import fsspec.asyn

    loop = fsspec.asyn.loop[0]
    executor = getattr(loop, "_default_executor", None) if loop is not None else None
    owned = set(getattr(executor, "_threads", ()))
    iothread = fsspec.asyn.iothread[0]
    if iothread is not None:
        owned.add(iothread)
    return set(threading.enumerate()) - owned


def _assert_threads_back_to(before: set[threading.Thread], what: str) -> None:
    # A request thread may be finishing its last reply; give it a moment before calling it a leak.
    for _ in range(100):
        left = _threads() - before
        if not left:
            return
        for thread in left:
            thread.join(timeout=0.05)
    raise AssertionError(f"{what} left threads running: {sorted(t.name for t in left)}")


def _clear_fsspec_instances(protocol: str) -> None:
    """Forget cached filesystem objects of ``protocol``, closing their connections, so no
    client made for one server is reused for the next (which listens on another port), and no
    keep-alive connection holds a server's request thread."""
    import fsspec

    cls = fsspec.get_filesystem_class(protocol)
    for fs in list(cls._cache.values()):
        # Each class's own close_session: the one it runs itself when an instance is collected.
        client = fs._session if protocol == "http" else fs._s3
        if client is not None:
            cls.close_session(fs.loop, client)
    cls.clear_instance_cache()


@dataclass
class HttpServer:
    url: str
    """Base URL with a trailing slash: ``url + name`` is the file ``root / name``."""
    root: Path


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    """An HTTP server on 127.0.0.1 serving a fresh directory, with range requests and HEAD."""
    from werkzeug.exceptions import NotFound
    from werkzeug.security import safe_join
    from werkzeug.serving import make_server
    from werkzeug.utils import send_file
    from werkzeug.wrappers import Request

    root = tmp_path / "served"
    root.mkdir()

    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Any:
        path = safe_join(str(root), request.path.lstrip("/"))
        if path is None or not Path(path).is_file():
            return NotFound()
        # conditional=True answers Range with 206 Partial Content and HEAD with Content-Length.
        return send_file(path, request.environ, conditional=True, etag=False)

    before = _threads()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-http-server")
    thread.start()
    try:
        yield HttpServer(url=f"http://127.0.0.1:{server.server_port}/", root=root)
    finally:
        _clear_fsspec_instances("http")
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    _assert_threads_back_to(before, "http_server")


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    @property
    def bucket_url(self) -> str:
        """``s3://<bucket>/``: ``bucket_url + name`` is the object ``put(name, ...)`` wrote."""
        return f"s3://{self.bucket}/"

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as the object ``name`` in the bucket."""
        import fsspec

        with fsspec.open(self.bucket_url + name, "wb") as f:
            f.write(data)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a random free port), an empty bucket, and s3fs set up to
    reach it; configuration, environment and moto's stored objects are restored afterwards."""
    import fsspec
    import requests
    from moto.server import ThreadedMotoServer

    before = _threads()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Dummy credentials, so neither boto nor s3fs looks for real ones on this machine.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # s3fs takes its constructor's defaults from fsspec's configuration under "s3".
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}})
    _clear_fsspec_instances("s3")
    s3 = S3Server(endpoint_url=endpoint, bucket=f"feedline-test-{uuid.uuid4().hex[:12]}")
    try:
        fsspec.filesystem("s3").mkdir(s3.bucket)
        yield s3
    finally:
        _clear_fsspec_instances("s3")
        # moto keeps its buckets in this process's memory across servers: empty them.
        requests.post(f"{endpoint}/moto-api/reset", timeout=10)
        server.stop()
        server._server.server_close()  # type: ignore[union-attr]  # stop() leaves it open
    _assert_threads_back_to(before, "s3_server")
