"""A stand-in for the W&B server on loopback, for rehearsing the server going away mid-run.

The real W&B server is a container image (wandb/local) that cannot run here, so this answers just enough of
what wandb-core (0.31) asks during an online run for `wandb.init(mode="online")` to succeed: the GraphQL
operations it sends (Viewer, UpsertBucket, CreateRunFiles, ServerFeaturesQuery, ...), the run's file stream
(history, summary, console) and the uploads of its files. It records what it received, and `stop()` takes it
away (the listening socket closed: connections are refused, as when the network or the server is gone).

It is not W&B: it shows what the SDK and our trainer do when a server that answered stops answering, not
what W&B's server does. HTTP/1.0, so no connection outlives a request and `stop()` leaves none open.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENTITY = "standin"


def _answer(op: str | None, variables: dict, base: str) -> dict:
    """The `data` of a GraphQL answer: the fields wandb-core reads, with plausible values."""
    if op == "Viewer":
        return {
            "viewer": {
                "id": "VXNlcjox",
                "entity": ENTITY,
                "username": ENTITY,
                "email": "",
                "flags": "{}",
                "teams": {"edges": []},
            }
        }
    if op == "UpsertBucket":
        name = variables.get("name") or "run"
        project = variables.get("project") or "uncategorized"
        return {
            "upsertBucket": {
                "bucket": {
                    "id": f"UnVuOnt7{name}",
                    "name": name,
                    "displayName": variables.get("displayName") or name,
                    "description": "",
                    "config": "{}",
                    "sweepName": None,
                    "project": {
                        "id": "UHJvamVjdDox",
                        "name": project,
                        "entity": {"id": "RW50aXR5OjE=", "name": ENTITY},
                    },
                    "historyLineCount": 0,
                },
                "inserted": True,
            }
        }
    if op == "CreateRunFiles":
        files = variables.get("files") or []
        return {
            "createRunFiles": {
                "runID": variables.get("run") or "run",
                "uploadHeaders": [],
                "files": [{"name": f, "uploadUrl": f"{base}/upload/{f}"} for f in files],
            }
        }
    if op == "ServerFeaturesQuery":
        return {"serverInfo": {"features": []}}
    if op == "OrganizationCoreWeaveOrganizationID":
        return {"entity": {"organization": None}}
    return {}


class WandbStandIn:
    """`with WandbStandIn() as server:` ... `server.url` for WANDB_BASE_URL; `server.stop()` mid-run."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, GraphQL operation)
        self.history: list[tuple[str, int, dict]] = []  # (run path, line offset, row) the file streams delivered
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stand_in._record("GET", self.path, None)
                self._send({})

            def do_PUT(self) -> None:
                self._body()
                stand_in._record("PUT", self.path, None)
                self._send({})

            def do_POST(self) -> None:
                body = self._body()
                if self.path == "/graphql":
                    req = json.loads(body or b"{}")
                    op = req.get("operationName")
                    stand_in._record("POST", self.path, op)
                    self._send({"data": _answer(op, req.get("variables") or {}, stand_in.url)})
                    return
                stand_in._record("POST", self.path, None)
                if self.path.endswith("/file_stream"):
                    part = json.loads(body or b"{}").get("files", {}).get("wandb-history.jsonl", {})
                    run = self.path[len("/files/") : -len("/file_stream")]
                    with stand_in.lock:
                        for i, line in enumerate(part.get("content", [])):
                            stand_in.history.append((run, part.get("offset", 0) + i, json.loads(line)))
                self._send({})

            def log_message(self, *args) -> None:  # quiet: pytest shows the test's own output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="wandb-standin", daemon=True)
        self.thread.start()
        self.stopped = False

    def _record(self, method: str, path: str, op: str | None) -> None:
        with self.lock:
            self.requests.append((method, path, op))

    def stop(self) -> None:
        """The server goes away: stop serving and close the listening socket (later connects are refused)."""
        if self.stopped:
            return
        self.stopped = True
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WandbStandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
