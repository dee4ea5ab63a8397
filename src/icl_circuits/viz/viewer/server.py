"""The HTTP side of the viewer: routes, the Host check, file serving confined to RUN_DIR, every response's headers.

Only files inside RUN_DIR are ever served: paths with '..', '.', backslashes or NUL (also when
percent-encoded) are refused with 403, and the file server reads through `data.contained()` as the
data layer does. The server binds 127.0.0.1 by default and always checks the Host header (no DNS
rebinding), also on a wildcard bind, where only the machine's own names and `allow_hosts` are
added. Every response, errors and redirects included, carries the CSP.
"""

from __future__ import annotations

import json
import mimetypes
import os
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from icl_circuits.viz.report import esc
from icl_circuits.viz.viewer.data import RunData, contained
from icl_circuits.viz.viewer.feature import feature_page, features_page, sae_page
from icl_circuits.viz.viewer.layout import CSP, feature_url, page
from icl_circuits.viz.viewer.pages import circuit_list, circuit_page, index_page, plots_page, task_list, task_page


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
WILDCARD = ("0.0.0.0", "::", "")


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: RunData, host: str, port: int, allow_hosts: list[str] | None = None) -> None:
        self.data = data
        super().__init__((host, port), ViewerHandler)
        self.allowed_hosts = allowed_host_headers(host, self.server_address[1], allow_hosts)


def allowed_host_headers(host: str, port: int, allow_hosts: list[str] | None = None) -> set[str]:
    """Host headers the server answers (anything else is refused: no DNS rebinding). Always the
    loopback names; the bound address when it is a real one; for a wildcard bind (0.0.0.0, ::) the
    machine's own names; plus the names given in allow_hosts. Never any host at all."""
    import socket

    names = set(LOOPBACK) | {h.lower() for h in allow_hosts or []}
    if host in WILDCARD:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host.lower())
    return names | {f"{n}:{port}" for n in names}


def safe_path(root: Path, rel: str) -> Path | None:
    """root/rel if it is a file inside root; None for anything that could escape (or does not exist)."""
    if any(c in rel for c in ("\\", "\0")) or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("..", ".") for p in parts):
        return None
    return contained(root, root / rel)


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "icl-circuits-viewer"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def _headers(self) -> None:
        """The security headers every response carries (pages, files, errors, redirects)."""
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, page(f"{status} {HTTPStatus(status).phrase}", f"<p>{esc(message)}</p>").encode())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (400, 414, 431, 501, ...) as our pages, with the same headers."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        self.close_connection = True
        body = page(f"{code} {phrase}", f"<p>{esc(message or phrase)}</p>").encode()
        self.send_response(code, phrase)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(body)))
        self._headers()
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(303)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self._headers()
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host = self.headers.get("Host", "").lower()
        if host not in self.server.allowed_hosts:
            return self._error(403, "unexpected Host header")
        url = urlsplit(self.path)
        raw = url.path
        decoded = unquote(raw)
        # refuse traversal however it is spelled: '..' segments raw, percent-encoded, or with backslashes
        segments = decoded.replace("\\", "/").split("/")
        if any(s in ("..", ".") for s in segments) or "\0" in decoded:
            return self._error(403, "path outside the run directory")
        try:
            self._route(decoded, parse_qs(url.query))
        except (ValueError, KeyError) as e:
            self._error(404, f"not found: {e}")

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        data = self.server.data
        parts = [p for p in path.split("/") if p]
        html_out: str | None = None
        if not parts:
            html_out = index_page(data)
        elif parts[0] == "files" and len(parts) > 1:
            return self._file("/".join(parts[1:]))
        elif parts == ["tasks"]:
            html_out = page("Tasks", task_list(data) if data.tasks else "<p class='muted'>No cleaned task vectors in this run.</p>")
        elif parts[0] == "task" and len(parts) == 2:
            html_out = task_page(data, parts[1])
        elif parts == ["features"]:
            html_out = features_page(data)
        elif parts[0] == "sae" and len(parts) == 2:
            html_out = sae_page(data, parts[1], query)
        elif parts[0] == "feature" and len(parts) in (3, 4) and parts[1] in data.sae_names() + [t.sae for t in data.tasks.values()]:
            if len(parts) == 4 and parts[3] != "examples":
                raise ValueError(path)
            if not parts[2].isdigit():
                raise ValueError(f"latent {parts[2]!r} is not a number")
            html_out = feature_page(data, parts[1], int(parts[2]), all_examples=len(parts) == 4)
        elif parts == ["goto"]:
            sae, latent = query.get("sae", [""])[0], query.get("latent", [""])[0].strip().lstrip("#")
            if sae not in data.sae_names():
                return self._error(400, f"no SAE {sae!r} in this run")
            if not latent.isdigit():
                return self._error(400, f"feature id must be a whole number, got {latent!r}")
            return self._redirect(feature_url(sae, int(latent)))
        elif parts == ["circuits"]:
            html_out = page("Circuits", circuit_list(data))
        elif parts[0] == "circuit" and len(parts) == 2:
            html_out = circuit_page(data, int(parts[1]), query)
        elif parts == ["plots"]:
            html_out = plots_page(data)
        elif parts[0] == "api" and len(parts) == 4 and parts[1] == "examples":
            ex = data.feature(parts[2], int(parts[3]), limit=None)["examples"]
            return self._send(200, json.dumps([e.to_dict() for e in ex], ensure_ascii=True).encode(), "application/json")
        if html_out is None:
            return self._error(404, f"no page {path}")
        self._send(200, html_out.encode("utf-8"))

    def _file(self, rel: str) -> None:
        p = safe_path(self.server.data.root, rel)
        if p is None:
            return self._error(404 if ".." not in rel else 403, "no such file in the run directory")
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/json", "image/svg+xml"):
            ctype += "; charset=utf-8"
        self._send(200, p.read_bytes(), ctype)


def make_server(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                example_stores: list[str | os.PathLike] | None = None, allow_hosts: list[str] | None = None) -> ViewerServer:  # fmt: skip
    """A ready server (port 0 picks a free one: server.server_address[1]); call serve_forever().
    allow_hosts: extra Host names to answer (e.g. this machine's LAN name when binding 0.0.0.0)."""
    return ViewerServer(RunData(run_dir, example_stores), host, port, allow_hosts)


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          example_stores: list[str | os.PathLike] | None = None, allow_hosts: list[str] | None = None) -> None:  # fmt: skip
    server = make_server(run_dir, host, port, example_stores, allow_hosts)
    d = server.data
    print(f"serving {d.root}: {len(d.tasks)} tasks, {len(d.circuits)} circuits, {len(d.stores)} example stores, "
          f"{len(d.dashboards)} dashboard files, {len(d.figures)} figures\nopen http://{host}:{server.server_address[1]}/  (Ctrl-C stops)")  # fmt: skip
    if host not in ("127.0.0.1", "localhost", "::1"):
        names = sorted(h for h in server.allowed_hosts if ":" not in h.strip("[]").split("]")[-1] or h.startswith("["))
        print(f"warning: listening on {host}: anyone who can reach this machine can read the run; "
              f"answering only Host headers {', '.join(names)} (add names with allow_hosts / --allow-host)")  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
