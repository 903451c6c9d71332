"""The daemon process: store + service + web server, signals, systemd notifications and watchdog.

    d = Daemon(profile, bind="127.0.0.1", port=8080)   # the store is locked and the port bound here
    d.start()                                           # camera thread + uvicorn thread
    d.run_forever()                                     # until SIGTERM / SIGINT; SIGHUP reloads the bundle

Start-up order: lock and open the store (refused if another serve holds it), bind the port (refused
if taken), then READY=1. Stop order (SIGTERM): STOPPING=1; the service grades and stores the FOVs in
flight; the web server closes; the store checkpoints its WAL and releases the lock. WATCHDOG=1 is sent
every WatchdogSec/2 while the service is healthy, so systemd restarts a daemon whose loop hangs.
"""
from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import threading
import time
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.runtime.daemon import sdnotify
from cyto_edge.runtime.daemon.logs import event, get_logger

log = get_logger("server")
STATUS_EVERY_S = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it a
    # response written in two parts waits for the client's delayed ACK (~40 ms per keep-alive request)
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise BadInput(f"server {host}:{port}: cannot listen there ({e.strerror}); another process may use the "
                       "port: choose another with --port or server.port") from None
    s.listen(128)
    s.set_inheritable(True)
    return s


class Daemon:
    def __init__(self, profile, *, bind: str | None = None, port: int | None = None, bundle: Path | None = None,
                 token: str | None = None, start_session: str | None = None):
        from cyto_edge.runtime.daemon.service import Service
        from cyto_edge.runtime.daemon.store import Store

        self.profile = profile
        self.host = bind or profile.server.bind
        port = profile.server.port if port is None else port
        if not is_loopback(self.host) and not token:
            raise BadInput(f"bind {self.host} is reachable from the network: a token is required (server.token_file "
                           "or server.token_env in the profile, or --token-file)")
        self.token = token
        self.store = Store.open(profile.storage.root)
        try:
            self.sock = bind_socket(self.host, port)
        except BaseException:
            self.store.close()
            raise
        self.port = self.sock.getsockname()[1]
        self.bundle = bundle
        self.service = Service(profile, self.store, bundle_path=bundle)
        self.start_session = start_session
        self.server = None
        self._web: threading.Thread | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "Daemon":
        import uvicorn

        from cyto_edge.runtime.daemon.web import create_app

        self.service.start()
        if self.start_session and self.service.session is None:
            self.service.start_session(self.start_session)
        app = create_app(self.service, self.token)
        cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3,
                             timeout_keep_alive=5, server_header=False)
        self.server = uvicorn.Server(cfg)
        self._web = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                     name="web", daemon=True)
        self._web.start()
        t0 = time.monotonic()
        while not self.server.started and self._web.is_alive() and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        if not self.server.started:
            self.stop()
            raise BadInput(f"the web server did not start on {self.url}")
        event(log, "listening", url=self.url, port=self.port, auth=self.token is not None,
              session=self.service.session["id"] if self.service.session else None)
        sdnotify.notify("READY=1")
        return self

    def run_forever(self) -> int:
        """Serve until SIGTERM or SIGINT; SIGHUP swaps in the profile's bundle again (re-verified)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        wd = sdnotify.watchdog_interval()
        last_wd = last_status = 0.0
        status = ""
        while not self._stop.is_set():
            self._stop.wait(min(1.0, wd or 1.0))
            if self._reload.is_set():
                self._reload.clear()
                threading.Thread(target=self._reload_bundle, name="reload", daemon=True).start()
            self.service.tick()
            now = time.monotonic()
            if wd and now - last_wd >= wd and self.service.healthy() and self._web.is_alive():
                sdnotify.notify("WATCHDOG=1")
                last_wd = now
            if now - last_status >= STATUS_EVERY_S:
                last_status, new = now, self._status_line()
                if new != status:
                    sdnotify.notify("STATUS=" + new)
                    status = new
            if not self._web.is_alive():
                event(log, "web server ended unexpectedly", level=40)
                break
        self.stop()
        return 0

    def _reload_bundle(self) -> None:
        from cyto_edge.runtime.daemon.service import BundleRefused

        path = self.bundle or self.profile.bundle          # the configured path, re-read (a new file copied there)
        event(log, "SIGHUP: reloading the bundle", path=str(path))
        try:
            self.service.swap_bundle(path)
        except BundleRefused:
            pass  # logged and recorded by the service; the running bundle stays

    def _status_line(self) -> str:
        s = self.service
        sess = f"session {s.session['id']}" if s.session else "no session"
        return (f"camera {s.camera_state}, engine {s.engine_state}, {s.fps():.1f} fps, {sess}, "
                f"{s.recorder.stored} FOVs stored" + (f", ALERT {s.recorder.alert.kind}" if s.recorder.alert else ""))

    def stop(self) -> None:
        """Graceful stop: FOVs in flight finish and are stored, then the web server, then the store."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        sdnotify.notify("STOPPING=1")
        event(log, "stopping")
        self.service.stop()
        if self.server is not None:
            self.server.should_exit = True
        if self._web is not None:
            self._web.join(10)
        try:
            self.sock.close()
        except OSError:
            pass
        self.store.close()
        event(log, "stopped")
