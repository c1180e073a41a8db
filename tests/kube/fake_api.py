"""An in-process Kubernetes API server for what the agent touches, over real HTTP, so the real
`kubernetes` client is what the tests drive.

Served as kube-apiserver serves them: nodes GET, LIST (label selectors, field selector on the
name) and WATCH; PATCH of nodes and nodes/status with each patch content type applied as the
API server applies it (merge patch: RFC 7386; strategic merge: lists merged on their patch
merge key, `$patch: delete`; JSON patch: RFC 6902 with `test`), the main resource ignoring
status and the status subresource ignoring everything else; `metadata.resourceVersion` in a
patch as a precondition (409 on mismatch); core/v1 events create and patch, validated as the
API server validates them; pods, evictions against PodDisruptionBudgets and leases
(tests/kube/fake_workloads.py); and, on demand per verb and path, 403/404/422/429 (with
Retry-After)/500 answers, slow responses (timeouts) and malformed bodies (`{}`, a `Status`).
Every request is recorded (method, path, content type, body) for tests to assert on.
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.httpbase import QuietHandler

MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}
PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    code: int | None = None  # what the server answered
    at: float = field(default_factory=time.monotonic)  # when it arrived
    done: float | None = None  # when the answer was sent


@dataclass
class Fault:
    """Answer `status` to requests matching `method` and `path` (a regex), `times` times;
    with `body`, answer that body instead of an error (`status` 0: 200), as a broken proxy or
    API server might; `status` 0 and no body: the real answer, after `delay`."""

    method: str
    path: str
    status: int
    times: int = 1
    retry_after: int | None = None
    delay: float = 0.0
    body: Any = None


@dataclass
class State:
    nodes: dict[str, dict] = field(default_factory=dict)
    events: dict[tuple[str, str], dict] = field(default_factory=dict)
    rv: int = 100
    history: list[tuple[int, str, dict]] = field(default_factory=list)  # (rv, type, node)
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    delay: float = 0.0  # added to every answer
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    pdbs: dict[tuple[str, str], dict] = field(default_factory=dict)
    evictions: list[tuple[str, str, int | None]] = field(default_factory=list)
    leases: dict[tuple[str, str], dict] = field(default_factory=dict)
    lease_writes: list[dict] = field(default_factory=list)
    mpijobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    deleted_mpijobs: list[str] = field(default_factory=list)
    most_mpijobs: int = 0  # the most that existed at once
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    deleted_jobs: list[str] = field(default_factory=list)
    configmaps: dict[tuple[str, str], dict] = field(default_factory=dict)


class FakeKubeAPI:
    """`with FakeKubeAPI() as api:` serves on `api.url`; `api.add_node(...)` seeds nodes."""

    def __init__(self) -> None:
        self.state = State()
        self.lock = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.stopped = False
        self.hold_deletion = False  # evicted pods stay terminating until `finish_deletion`

    def __enter__(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def use_tls(self, cert: Path, key: Path) -> None:
        """Serve HTTPS with `cert` (before `with`), as a cluster's API server does."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_port}"
        quiet, loud = ssl.SSLError, self._server.handle_error

        def handle_error(request: Any, address: Any) -> None:
            if not isinstance(sys.exc_info()[1], quiet):  # a client gone mid-handshake
                loud(request, address)

        self._server.handle_error = handle_error  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- test helpers -------------------------------------------------------------------

    def add_node(self, name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": f"uid-{name}",
                "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                "annotations": {},
                "creationTimestamp": "2026-11-01T00:00:00Z",
            },
            "spec": dict(spec),
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": "2026-11-01T00:00:00Z",
                        "lastTransitionTime": "2026-11-01T00:00:00Z",
                    }
                ]
            },
        }
        with self.lock:
            self._store(node, "ADDED")
        return node

    def node(self, name: str) -> dict:
        with self.lock:
            return copy.deepcopy(self.state.nodes[name])

    def edit(self, name: str, change: Any) -> dict:
        """Another writer changes the node (a callable that edits the dict in place)."""
        with self.lock:
            node = copy.deepcopy(self.state.nodes[name])
            change(node)
            self._store(node, "MODIFIED")
            return copy.deepcopy(node)

    def fail(self, method: str, path: str, status: int, times: int = 1, **kw: Any) -> None:
        with self.lock:
            self.state.faults.append(Fault(method, path, status, times, **kw))

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.state.requests
                if (method is None or r.method == method)
                and (path is None or re.fullmatch(path, r.path))
            ]

    def add_pod(self, namespace: str, name: str, node: str, **kw: Any) -> dict:
        from tests.kube.fake_workloads import pod

        with self.lock:
            self.state.rv += 1
            p = pod(namespace, name, node, **kw)
            p["metadata"]["resourceVersion"] = str(self.state.rv)
            self.state.pods[(namespace, name)] = p
            return copy.deepcopy(p)

    def pods_on(self, node: str) -> list[str]:
        """`namespace/name` of the pods bound to `node` (terminating ones too)."""
        with self.lock:
            return sorted(
                f"{ns}/{n}"
                for (ns, n), p in self.state.pods.items()
                if p["spec"]["nodeName"] == node
            )

    def add_pdb(self, namespace: str, name: str, selector: str, allowed: int) -> None:
        """A PodDisruptionBudget over the pods `selector` picks, allowing `allowed` more
        disruptions (its status.disruptionsAllowed)."""
        with self.lock:
            self.state.pdbs[(namespace, name)] = {
                "name": name,
                "selector": selector,
                "allowed": allowed,
                "min_available": 1,
            }

    def finish_deletion(self) -> None:
        """Terminating pods are gone (their containers stopped)."""
        with self.lock:
            for key, p in list(self.state.pods.items()):
                if p["metadata"].get("deletionTimestamp"):
                    del self.state.pods[key]

    def lease(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            found = self.state.leases.get((namespace, name))
            return copy.deepcopy(found) if found else None

    def events(self) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(e) for e in self.state.events.values()]

    # -- the API server's own logic -----------------------------------------------------

    def _store(self, node: dict, kind: str) -> None:
        self.state.rv += 1
        node["metadata"]["resourceVersion"] = str(self.state.rv)
        self.state.nodes[node["metadata"]["name"]] = node
        self.state.history.append((self.state.rv, kind, copy.deepcopy(node)))
        self.lock.notify_all()

    def patch_node(self, name: str, subresource: str, ctype: str, body: Any) -> dict:
        with self.lock:
            if name not in self.state.nodes:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            old = self.state.nodes[name]
            patched = apply_patch(copy.deepcopy(old), ctype, body)
            want_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if want_rv is not None and want_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on nodes "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                )
            if subresource == "status":  # the status subresource changes status only
                new = copy.deepcopy(old)
                new["status"] = patched.get("status", {})
            else:  # the main resource ignores status (NodeStrategy.PrepareForUpdate)
                new = patched
                new["status"] = copy.deepcopy(old["status"])
            for key in ("name", "uid", "creationTimestamp"):
                new["metadata"][key] = old["metadata"][key]
            _validate_node(new)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if new != old:
                self._store(new, "MODIFIED")
            return copy.deepcopy(self.state.nodes[name])


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details: dict | None = None

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
            **({"details": self.details} if self.details else {}),
        }


# -- patches, as the API server applies them ----------------------------------------------


def apply_patch(obj: dict, ctype: str, body: Any) -> dict:
    if ctype == "application/merge-patch+json":
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "merge patch body must be a JSON object")
        return merge_patch(obj, body)
    if ctype == "application/strategic-merge-patch+json":
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "strategic merge patch body must be an object")
        return strategic_merge(obj, body, ())
    if ctype == "application/json-patch+json":
        if not isinstance(body, list):  # what the client sends for a dict by default
            raise ApiError(
                400,
                "BadRequest",
                "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
            )
        return json_patch(obj, body)
    raise ApiError(
        415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge(target: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        here = (*path, key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and here in MERGE_KEYS:
            out[key] = _merge_list(out.get(key) or [], value, MERGE_KEYS[here])
        else:
            out[key] = strategic_merge(out.get(key), value, here)
    return out


def _merge_list(current: list[dict], patch: list[dict], key: str) -> list[dict]:
    out = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ApiError(400, "BadRequest", f"map: {item} does not contain declared merge key")
        at = next((i for i, have in enumerate(out) if have.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                out.pop(at)
            continue
        if at is None:
            out.append(copy.deepcopy(item))
        else:
            out[at] = strategic_merge(out[at], item, ())
    return out


def json_patch(obj: dict, ops: list[dict]) -> dict:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        if op["op"] == "test":
            have = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if have != op.get("value"):
                raise ApiError(
                    422, "Invalid", f"the server rejected our request: test failed at {op['path']}"
                )
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last)
        else:
            raise ApiError(422, "Invalid", f"unsupported op {op['op']}")
    return obj


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}
_CONDITION_STATUS = {"True", "False", "Unknown"}


def _validate_node(node: dict) -> None:
    """What the API server's validation refuses for the fields the agent writes."""
    for k, v in (node["metadata"].get("labels") or {}).items():
        if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
            raise ApiError(422, "Invalid", f"metadata.labels: Invalid value: {v!r} for {k}")
    for t in node.get("spec", {}).get("taints") or []:
        if t.get("effect") not in _EFFECTS or not t.get("key"):
            raise ApiError(422, "Invalid", f"spec.taints: Invalid value: {t}")
    seen = set()
    for t in node.get("spec", {}).get("taints") or []:
        if (t["key"], t["effect"]) in seen:
            raise ApiError(422, "Invalid", f"spec.taints: Duplicate value: {t}")
        seen.add((t["key"], t["effect"]))
    for c in node.get("status", {}).get("conditions") or []:
        if not c.get("type") or c.get("status") not in _CONDITION_STATUS:
            raise ApiError(422, "Invalid", f"status.conditions: Invalid value: {c}")


# -- label selectors ------------------------------------------------------------------------

_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def selects(selector: str, labels: dict[str, str]) -> bool:
    """kube label selector: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`, `!k`."""
    for term in _split(selector):
        if m := _SET.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = labels.get(key) in values
            if (op == "in" and not inside) or (op == "notin" and key in labels and inside):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term.strip() and term.strip() not in labels:
            return False
    return True


def _split(selector: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    return [*terms, cur] if cur else terms


# -- HTTP -----------------------------------------------------------------------------------

_NODE = re.compile(r"^/api/v1/nodes/([^/]+)(?:/(status))?$")
_EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events(?:/([^/]+))?$")


def _handler(api: FakeKubeAPI) -> type[BaseHTTPRequestHandler]:
    from tests.kube import fake_workloads as wl

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            ctype = (self.headers.get("Content-Type") or "").split(";")[0] or None
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            self.record = Request(method, url.path, query, ctype, body)
            with api.lock:
                api.state.requests.append(self.record)
                fault = next(
                    (
                        f
                        for f in api.state.faults
                        if f.times > 0 and f.method == method and re.fullmatch(f.path, url.path)
                    ),
                    None,
                )
                if fault is not None:
                    fault.times -= 1
                delay = api.state.delay + (fault.delay if fault else 0.0)
            if delay:
                time.sleep(delay)
            if fault is not None and fault.body is not None:
                return self._send(fault.status or 200, fault.body)
            if fault is not None and fault.status:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                err = ApiError(fault.status, _REASONS.get(fault.status, "InternalError"), "fault")
                return self._send(fault.status, err.status(), headers)
            try:
                if query.get("watch") in _TRUE:
                    return self._watch(url.path, query)
                code, answer = self._route(method, url.path, query, ctype, body)
            except ApiError as exc:
                code, answer = exc.code, exc.status()
            self._send(code, answer)

        def _route(
            self, method: str, path: str, query: dict[str, str], ctype: str | None, body: Any
        ) -> tuple[int, Any]:
            if path == "/api/v1/nodes" and method == "GET":
                return 200, self._list(query)
            if (m := _NODE.match(path)) and method == "GET":
                with api.lock:
                    if m.group(1) not in api.state.nodes:
                        raise ApiError(404, "NotFound", f'nodes "{m.group(1)}" not found')
                    return 200, copy.deepcopy(api.state.nodes[m.group(1)])
            if (m := _NODE.match(path)) and method == "PATCH":
                if ctype not in PATCH_TYPES:
                    raise ApiError(415, "UnsupportedMediaType", f"unknown format {ctype}")
                return 200, api.patch_node(m.group(1), m.group(2) or "", ctype, body)
            if (m := wl.MPIJOBS.match(path)) and m.group(2):
                if method == "GET":
                    return 200, wl.get_mpijob(api, m.group(1), m.group(2))
                if method == "DELETE":
                    return 200, wl.delete_mpijob(api, m.group(1), m.group(2))
            if (m := wl.MPIJOBS.match(path)) and method == "POST":
                return 201, wl.create_mpijob(api, m.group(1), body)
            if m := wl.JOBS.match(path):
                if method == "GET" and m.group(2):
                    return 200, wl.get_job(api, m.group(1), m.group(2))
                if method == "GET":
                    return 200, wl.list_jobs(api, m.group(1), query)
                if method == "DELETE" and m.group(2):
                    return 200, wl.delete_job(api, m.group(1), m.group(2))
                if method == "POST" and not m.group(2):
                    return 201, wl.create_job(api, m.group(1), body)
            if (m := wl.NS_PODS.match(path)) and method == "GET":
                return 200, wl.list_namespaced_pods(api, m.group(1), query)
            if (m := wl.POD_LOG.match(path)) and method == "GET":
                return 200, wl.pod_log(api, m.group(1), m.group(2))
            if wl.PODS.match(path) and method == "GET":
                return 200, wl.list_pods(api, query)
            if (m := wl.EVICTION.match(path)) and method == "POST":
                return 201, wl.evict(api, m.group(1), m.group(2), body)
            if m := wl.LEASES.match(path):
                if method == "GET" and m.group(2):
                    return 200, wl.get_lease(api, m.group(1), m.group(2))
                if method == "POST" and not m.group(2):
                    return 201, wl.create_lease(api, m.group(1), body)
                if method == "PUT" and m.group(2):
                    return 200, wl.replace_lease(api, m.group(1), m.group(2), body)
            if m := wl.CONFIGMAPS.match(path):
                if method == "GET" and m.group(2):
                    return 200, wl.get_configmap(api, m.group(1), m.group(2))
                if method == "POST" and not m.group(2):
                    return 201, wl.create_configmap(api, m.group(1), body)
                if method == "PUT" and m.group(2):
                    return 200, wl.replace_configmap(api, m.group(1), m.group(2), body)
            if (m := _EVENTS.match(path)) and method == "POST" and not m.group(2):
                return 201, self._create_event(m.group(1), body)
            if (m := _EVENTS.match(path)) and method == "PATCH" and m.group(2):
                return 200, self._patch_event(m.group(1), m.group(2), ctype, body)
            raise ApiError(404, "NotFound", f"the server could not find {method} {path}")

        def _list(self, query: dict[str, str]) -> dict:
            selector, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
            with api.lock:
                items = [
                    copy.deepcopy(n)
                    for n in api.state.nodes.values()
                    if selects(selector, n["metadata"].get("labels") or {}) and _fields(fields, n)
                ]
                rv = str(api.state.rv)
            return {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": rv},
                "items": items,
            }

        def _watch(self, path: str, query: dict[str, str]) -> None:
            if path != "/api/v1/nodes":
                raise ApiError(405, "MethodNotAllowed", "watch is served for nodes only")
            fields = query.get("fieldSelector", "")
            since = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 300)
            self.record.code = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = since
            try:
                while True:
                    with api.lock:
                        while (
                            not api.stopped
                            and time.monotonic() < deadline
                            and not any(rv > sent for rv, _, _ in api.state.history)
                        ):
                            api.lock.wait(max(0.0, min(0.2, deadline - time.monotonic())))
                        if api.stopped or time.monotonic() >= deadline:
                            break
                        batch = [(rv, t, n) for rv, t, n in api.state.history if rv > sent]
                    for rv, kind, node in batch:
                        sent = rv
                        if _fields(fields, node):
                            line = json.dumps({"type": kind, "object": node}).encode() + b"\n"
                            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                            self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass

        def _create_event(self, namespace: str, ev: Any) -> dict:
            if not isinstance(ev, dict):
                raise ApiError(400, "BadRequest", "event body must be an object")
            meta = ev.get("metadata") or {}
            name = meta.get("name") or (
                meta.get("generateName", "") + f"{len(api.state.events):05x}"
                if meta.get("generateName")
                else None
            )
            problems = []
            if not name:
                problems.append("metadata.name: Required value: name or generateName is required")
            if meta.get("namespace", namespace) != namespace:
                problems.append("metadata.namespace: does not match the namespace of the request")
            involved = ev.get("involvedObject") or {}
            if involved.get("kind") != "Node" or not involved.get("name"):
                problems.append("involvedObject: Required value")
            if ev.get("type") not in ("Normal", "Warning"):
                problems.append(f"type: Unsupported value: {ev.get('type')!r}")
            if not ev.get("reason") or len(ev.get("reason", "")) > 128:
                problems.append("reason: Required value, at most 128 characters")
            if len(ev.get("message") or "") > 1024:
                problems.append("message: Too long: must have at most 1024 bytes")
            if problems:
                raise ApiError(422, "Invalid", "; ".join(problems))
            with api.lock:
                if (namespace, name) in api.state.events:
                    raise ApiError(409, "AlreadyExists", f'events "{name}" already exists')
                api.state.rv += 1
                stored = copy.deepcopy(ev)
                stored["metadata"] = {
                    **meta,
                    "name": name,
                    "namespace": namespace,
                    "resourceVersion": str(api.state.rv),
                }
                api.state.events[(namespace, name)] = stored
                return copy.deepcopy(stored)

        def _patch_event(self, namespace: str, name: str, ctype: str | None, body: Any) -> dict:
            with api.lock:
                if (namespace, name) not in api.state.events:
                    raise ApiError(404, "NotFound", f'events "{name}" not found')
                if ctype not in PATCH_TYPES:
                    raise ApiError(415, "UnsupportedMediaType", f"unknown format {ctype}")
                ev = apply_patch(copy.deepcopy(api.state.events[(namespace, name)]), ctype, body)
                api.state.rv += 1
                ev["metadata"]["resourceVersion"] = str(api.state.rv)
                api.state.events[(namespace, name)] = ev
                return copy.deepcopy(ev)

        def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self.record.code = code
            text = isinstance(body, wl.Text)
            data = body.encode() if text else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.record.done = time.monotonic()

    return Handler


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool, as the server parses
_REASONS = {
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _fields(selector: str, node: dict) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and node["metadata"]["name"] != value.lstrip("="):
            return False
    return True
