"""Downloads of official dataset files (pimjax.data.download, with pooch) from a local HTTP server.

Never the internet: conftest.py sets PIMJAX_OFFLINE=1 for every test; the tests here that
download unset it and point the URLs at a server on 127.0.0.1 started by the test.
"""

import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest
from datafiles import MNIST_TEST_COUNTS, clear_env

import pimjax.data.locate as locate
from pimjax import data
from pimjax.data import download
from pimjax.data.registry import OfficialFile


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


class Server:
    """HTTP server on 127.0.0.1 serving `files` {path: bytes}; `mode` breaks some transfers."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode = "ok"  # "ok" | "drop" (Content-Length sent, half the body) | "short" (no length)
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's naming)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if server.mode != "short":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if server.mode == "ok" else body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch, server):
    """Downloads on, from the local server only."""
    monkeypatch.delenv("PIMJAX_OFFLINE", raising=False)
    monkeypatch.setenv("PIMJAX_DOWNLOAD_URL", server.url)
    return server


def fixture_file(name: str, payload: bytes, url: str) -> OfficialFile:
    return OfficialFile(name, len(payload), hashlib.sha256(payload).hexdigest(), url, ("test",))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_download_mnist_when_bundled_copy_is_missing(tmp_path, monkeypatch, online, capfd):
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    for n in names:
        online.files[f"/mnist/{n}"] = (locate.BUNDLED_MNIST / n).read_bytes()
    monkeypatch.setattr(locate, "BUNDLED_MNIST", tmp_path / "not-installed")
    cache = tmp_path / "cache"
    ds = data.load_dataset("mnist", "test", cache_dir=cache)
    assert len(ds) == 10000 and np.bincount(ds.labels).tolist() == MNIST_TEST_COUNTS
    dest = cache / "downloads" / "mnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)  # no temporary file left
    for n in names:
        assert (dest / n).read_bytes() == online.files[f"/mnist/{n}"]
    assert sorted(online.requests) == sorted(f"/mnist/{n}" for n in names)
    assert "100%" in capfd.readouterr().err  # the progress bar
    # Downloaded files are reused (no request), online or offline.
    assert len(data.load_dataset("mnist", "test", cache_dir=cache)) == 10000
    monkeypatch.setenv("PIMJAX_OFFLINE", "1")
    ds = data.load_dataset("mnist", "test", cache_dir=cache, limit=3)
    assert ds.labels.tolist() == [7, 2, 1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(data.load_dataset("mnist", "test", data_dir=empty, cache_dir=cache,
                                 download=True)) == 10000
    assert len(online.requests) == 2
    # A downloaded file damaged later is refused when decoded (here: a new .npz cache).
    labels = dest / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-3] ^= 0xFF
    labels.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="downloaded file .*t10k-labels.* is corrupt") as e:
        data.load_dataset("mnist", "test", cache_dir=cache)
    assert "delete it" in one_line(e)


def test_download_wrong_checksum_or_size(tmp_path, online):
    online.files["/x/a.bin"] = b"served content"
    want = fixture_file("a.bin", b"official data", "")
    dest = tmp_path / "dl"
    with pytest.raises(ValueError, match="has 14 bytes, expected 13") as e:
        download.fetch_files((want,), dest, [online.url + "/x/a.bin"])
    assert "nothing was kept" in one_line(e)
    want = fixture_file("a.bin", b"official datum", "")  # same size, other content
    with pytest.raises(ValueError, match="not the official file") as e:
        download.fetch_files((want,), dest, [online.url + "/x/a.bin"])
    msg = one_line(e)
    assert hashlib.sha256(b"served content").hexdigest() in msg and want.sha256 in msg
    assert f"in {dest}" in msg
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("mode", ["drop", "short"])
def test_download_interrupted_is_never_kept(tmp_path, online, mode):
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    online.files["/x/big.bin"] = payload
    want = fixture_file("big.bin", payload, "")
    dest = tmp_path / "dl"
    online.mode = mode
    with pytest.raises(FileNotFoundError) as e:
        download.fetch_files((want,), dest, [online.url + "/x/big.bin"], progress=False)
    msg = one_line(e)
    assert "big.bin" in msg and f"in {dest}" in msg
    if mode == "short":  # no Content-Length: the size check catches it
        assert "stopped after 150000 of 300000 bytes" in msg
    else:  # the HTTP client sees fewer bytes than announced
        assert "Connection broken" in msg or "stopped after" in msg
    assert list(dest.iterdir()) == []
    online.mode = "ok"  # the next try downloads the whole file
    (path,) = download.fetch_files((want,), dest, [online.url + "/x/big.bin"], progress=False)
    assert path.read_bytes() == payload and list(dest.iterdir()) == [path]


def test_download_server_down(tmp_path, monkeypatch):
    monkeypatch.delenv("PIMJAX_OFFLINE", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    want = fixture_file("a.bin", b"x", "")
    with pytest.raises(FileNotFoundError, match="could not download a.bin from http://127") as e:
        download.fetch_files((want,), tmp_path / "dl", [f"http://127.0.0.1:{port}/a.bin"])
    assert f"put the official a.bin (1 bytes, sha256 {want.sha256}) in" in one_line(e)


def test_offline_env_and_opt_outs_make_no_request(tmp_path, server, monkeypatch):
    monkeypatch.setenv("PIMJAX_DOWNLOAD_URL", server.url)
    server.files["/fashion_mnist/t10k-images-idx3-ubyte.gz"] = b"x"
    want = fixture_file("a.bin", b"x", "")
    with pytest.raises(FileNotFoundError, match="downloads are off .PIMJAX_OFFLINE is set.: put "
                       "a.bin") as e:
        download.fetch_files((want,), tmp_path / "dl", [server.url + "/a.bin"])
    assert str(tmp_path / "dl") in one_line(e)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="downloads are off: PIMJAX_OFFLINE is set"):
        data.load_dataset("fashion_mnist", "test", cache_dir=cache)
    monkeypatch.delenv("PIMJAX_OFFLINE")
    with pytest.raises(FileNotFoundError, match="downloads are off: download=False"):
        data.load_dataset("fashion_mnist", "test", cache_dir=cache, download=False)
    with pytest.raises(FileNotFoundError, match="no download since data_dir was given"):
        data.load_dataset("fashion_mnist", "test", data_dir=tmp_path, cache_dir=cache)
    assert server.requests == []


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_offline_env_values(monkeypatch, value, off):
    monkeypatch.setenv("PIMJAX_OFFLINE", value)
    assert download.offline() is off


def test_download_urls(monkeypatch):
    f = data.info("fashion_mnist").split_files("test")[0]
    assert download.file_url("fashion_mnist", f) == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz")
    monkeypatch.setenv("PIMJAX_DOWNLOAD_URL", "http://mirror/data/")
    assert download.file_url("fashion_mnist", f) == (
        "http://mirror/data/fashion_mnist/t10k-images-idx3-ubyte.gz")
    assert download.download_dir("cifar100", "/c").as_posix() == "/c/downloads/cifar100"
