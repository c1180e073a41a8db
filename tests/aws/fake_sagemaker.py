"""SageMaker HyperPod's BatchRebootClusterNodes and BatchReplaceClusterNodes over real HTTP,
built from their documented shapes (the API reference and botocore's service model), for a
controller process to call through boto3 (`AWS_ENDPOINT_URL`).

The AWS JSON 1.1 protocol: `POST /`, `X-Amz-Target: SageMaker.<Operation>`. Requests are
validated as the service does: `ClusterName` a name or a cluster ARN, `NodeIds` 1 to 25 ids of
the form `i-` and 8 or 17 hex digits (else 400 `ValidationException`); an unknown cluster is a
400 `ResourceNotFound`. Each id answers `Successful`, or `Failed` with one of the documented
codes: `InstanceIdNotFound` (not in the cluster), `InstanceIdInUse` (a recovery of it is
already running: the second ask for the same node), `InvalidInstanceStatus`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from tests.httpbase import QuietHandler

_CLUSTER = re.compile(
    r"^((arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:cluster/[a-z0-9]{12})"
    r"|([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}))$"
)
_NODE = re.compile(r"^i-[a-f0-9]{8}(?:[a-f0-9]{9})?$")
OPERATIONS = {"BatchRebootClusterNodes": "reboot", "BatchReplaceClusterNodes": "replace"}


@dataclass
class Call:
    operation: str
    body: dict


@dataclass
class Cluster:
    name: str
    nodes: set[str]
    busy: set[str] = field(default_factory=set)  # under recovery
    bad_status: set[str] = field(default_factory=set)


class FakeSageMaker:
    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeSageMaker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_cluster(self, name: str, nodes: list[str]) -> Cluster:
        self.clusters[name] = Cluster(name, set(nodes))
        return self.clusters[name]

    def recovered(self, cluster: str, node: str) -> None:
        """The recovery of `node` has finished."""
        with self.lock:
            self.clusters[cluster].busy.discard(node)

    def answer(self, operation: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.calls.append(Call(operation, body))
            name, ids = body.get("ClusterName"), body.get("NodeIds")
            if not isinstance(name, str) or not _CLUSTER.match(name):
                return 400, _error("ValidationException", f"ClusterName {name!r} is invalid")
            if not isinstance(ids, list) or not 1 <= len(ids) <= 25:
                return 400, _error(
                    "ValidationException", "NodeIds must contain between 1 and 25 items"
                )
            if bad := [i for i in ids if not isinstance(i, str) or not _NODE.match(i)]:
                return 400, _error("ValidationException", f"NodeIds {bad} are invalid")
            cluster = self.clusters.get(name.rsplit("/", 1)[-1])
            if cluster is None:
                return 400, _error("ResourceNotFound", f"Cluster {name} not found")
            ok, failed = [], []
            for i in ids:
                if i not in cluster.nodes:
                    failed.append(_failed(i, "InstanceIdNotFound", "not in this cluster"))
                elif i in cluster.bad_status:
                    failed.append(_failed(i, "InvalidInstanceStatus", "instance is not running"))
                elif i in cluster.busy:
                    failed.append(_failed(i, "InstanceIdInUse", "a recovery is in progress"))
                else:
                    cluster.busy.add(i)
                    ok.append(i)
            return 200, {"Successful": ok, "Failed": failed}


def _failed(node: str, code: str, message: str) -> dict:
    return {"NodeId": node, "ErrorCode": code, "Message": message}


def _error(kind: str, message: str) -> dict:
    return {"__type": kind, "message": message}


def _handler(fake: FakeSageMaker) -> type[QuietHandler]:
    class Handler(QuietHandler):
        def do_POST(self) -> None:
            target = self.headers.get("X-Amz-Target") or ""
            service, _, operation = target.partition(".")
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if service != "SageMaker" or operation not in OPERATIONS:
                code, answer = 400, _error("UnknownOperationException", target)
            else:
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    code, answer = 400, _error("SerializationException", "not JSON")
                else:
                    code, answer = fake.answer(operation, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
