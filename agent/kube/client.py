"""The few API calls the agent makes, through the `kubernetes` client, with dicts in and out.

Raw JSON (`_preload_content=False`) rather than the client's models: less memory and time, and
patches keep exactly the shape we send. The requests go through the client's ApiClient (its
configuration, authentication, TLS and transport) by path, as its generated API classes send
them, without loading those classes (CoreV1Api alone is a 2.7 MB module: 1.3 MiB of the daemon's
memory; benchmarks/footprint.py). Each call has a timeout; none retries by itself (the callers
back off, honouring Retry-After). Synchronous: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

CORE = "/api/v1"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
CUSTOM = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class KubeError(Exception):
    """An API answer other than success, or no answer at all (`status` None)."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after

    @property
    def retryable(self) -> bool:
        """Worth trying again later: no answer, throttled, a conflict or a server error."""
        return self.status is None or self.status in (409, 429) or self.status >= 500


class KubeClient:
    def __init__(
        self, kubeconfig: str | None = None, timeout: float = 10.0, operator: bool = False
    ) -> None:
        """`kubeconfig`, else in-cluster; for an `operator` (a person's command) without one,
        $KUBECONFIG or ~/.kube/config, as kubectl."""
        from agent.kube.lean import api

        k = api()
        cfg = k.Configuration()
        if kubeconfig or operator:
            k.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            k.load_incluster_config(client_configuration=cfg)
        cfg.retries = False  # ours back off and honour Retry-After; urllib3's would not
        self.api = k.ApiClient(cfg)
        self.timeout = timeout
        self._watching: Any = None

    def close(self) -> None:
        self.api.close()

    def get_node(self, name: str) -> dict[str, Any]:
        return _node(self._call("GET", CORE + "/nodes/{name}", {"name": name}))

    def patch_node(self, name: str, body: Any, content_type: str, status: bool = False) -> dict:
        path = CORE + "/nodes/{name}" + ("/status" if status else "")
        return _node(self._call("PATCH", path, {"name": name}, body=body, content=content_type))

    def list_nodes(self, label_selector: str) -> list[dict[str, Any]]:
        # resourceVersion=0: served from the API server's cache, not from etcd
        query = {"labelSelector": label_selector, "resourceVersion": "0"}
        answer = self._call("GET", CORE + "/nodes", query=query)
        return list(answer.get("items") or [])

    def list_pods_on(self, node: str) -> list[dict[str, Any]]:
        """Every pod bound to `node`, in all namespaces (fresh: not from the cache)."""
        answer = self._call("GET", CORE + "/pods", query={"fieldSelector": f"spec.nodeName={node}"})
        return list(answer.get("items") or [])

    def evict(self, namespace: str, name: str, grace: int | None = None) -> None:
        """The Eviction API: the API server refuses (429) what a PodDisruptionBudget forbids."""
        body: dict[str, Any] = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        if grace is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace}
        pod = {"namespace": namespace, "name": name}
        self._call("POST", CORE + "/namespaces/{namespace}/pods/{name}/eviction", pod, body=body)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        path, where = CORE + "/namespaces/{namespace}/pods", {"namespace": namespace}
        answer = self._call("GET", path, where, query={"labelSelector": label_selector})
        return list(answer.get("items") or [])

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """A pod's log (of `container`), as text."""
        path = CORE + "/namespaces/{namespace}/pods/{name}/log"
        query = {"container": container} if container else {}
        try:
            resp = self._send("GET", path, {"namespace": namespace, "name": name}, query)
            return resp.data.decode(errors="replace")
        except Exception as exc:
            raise _error(exc) from exc

    def create_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict
    ) -> dict:
        where = _kind(group, version, namespace, plural)
        return self._call("POST", CUSTOM, where, body=body)

    def get_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> dict:
        where = _kind(group, version, namespace, plural)
        return self._call("GET", CUSTOM + "/{name}", where | {"name": name})

    def list_objects(
        self, group: str, version: str, namespace: str, plural: str, label_selector: str
    ) -> list[dict[str, Any]]:
        where = _kind(group, version, namespace, plural)
        answer = self._call("GET", CUSTOM, where, query={"labelSelector": label_selector})
        return list(answer.get("items") or [])

    def delete_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> None:
        """Deleted with its pods (propagation Background)."""
        where = _kind(group, version, namespace, plural)
        query = {"propagationPolicy": "Background"}
        self._call("DELETE", CUSTOM + "/{name}", where | {"name": name}, query=query)

    def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call("GET", LEASES + "/{name}", {"namespace": namespace, "name": name})

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", LEASES, {"namespace": namespace}, body=body)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: the body's resourceVersion is the precondition (409 when someone wrote first)."""
        where = {"namespace": namespace, "name": name}
        return self._call("PUT", LEASES + "/{name}", where, body=body)

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any]:
        where = {"namespace": namespace, "name": name}
        return self._call("GET", CORE + "/namespaces/{namespace}/configmaps/{name}", where)

    def create_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        path = CORE + "/namespaces/{namespace}/configmaps"
        return self._call("POST", path, {"namespace": namespace}, body=body)

    def replace_config_map(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: the body's resourceVersion is the precondition (409 when someone wrote first)."""
        path, where = CORE + "/namespaces/{namespace}/configmaps/{name}", {"namespace": namespace}
        return self._call("PUT", path, where | {"name": name}, body=body)

    def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        path = CORE + "/namespaces/{namespace}/events"
        return self._call("POST", path, {"namespace": namespace}, body=body)

    def patch_event(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        path, where = CORE + "/namespaces/{namespace}/events/{name}", {"namespace": namespace}
        return self._call("PATCH", path, where | {"name": name}, body=body, content=STRATEGIC)

    def watch_node(self, name: str, resource_version: str, seconds: int) -> Iterator[dict]:
        """The node's changes after `resource_version`, as {type, object}, for `seconds`."""
        query = {
            "fieldSelector": f"metadata.name={name}",
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": seconds,
            "allowWatchBookmarks": "false",
        }
        try:
            timeout = (self.timeout, seconds + self.timeout)
            resp = self._send("GET", CORE + "/nodes", {}, query, timeout=timeout)
        except Exception as exc:
            raise _error(exc) from exc
        self._watching = resp
        buf = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        if event.get("type") == "ERROR":  # e.g. 410: our version is too old
                            obj = event.get("object") or {}
                            raise KubeError(obj.get("code"), str(obj.get("message")))
                        yield event
        except KubeError:
            raise
        except Exception as exc:
            raise _error(exc) from exc
        finally:
            self._watching = None
            resp.release_conn()

    def stop_watch(self) -> None:
        """End a watch blocked on its connection (from another thread)."""
        resp = self._watching
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _call(
        self,
        method: str,
        path: str,
        where: dict[str, str] | None = None,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content: str = "application/json",
    ) -> dict[str, Any]:
        """The answer to `method path` (its {names} from `where`), as JSON."""
        try:
            resp = self._send(method, path, where or {}, query or {}, body, content)
            return json.loads(resp.data or b"{}")
        except Exception as exc:
            raise _error(exc) from exc

    def _send(
        self,
        method: str,
        path: str,
        where: dict[str, str],
        query: dict[str, Any],
        body: Any = None,
        content: str = "application/json",
        timeout: Any = None,
    ) -> Any:
        """The raw answer (urllib3's), as the generated API classes ask: the service account's
        token (BearerToken), JSON accepted, path parameters quoted by the ApiClient."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content
        return self.api.call_api(
            path,
            method,
            path_params=where,
            query_params=list(query.items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=False,
            _request_timeout=timeout or self.timeout,
        )


def is_node(obj: Any) -> bool:
    """A Node as the API serves it (a `{}` or a `Status` in its place is not one)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return isinstance(meta, dict) and bool(meta.get("name")) and obj.get("kind", "Node") == "Node"


def _node(obj: Any) -> dict[str, Any]:
    if not is_node(obj):
        kind = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
        raise KubeError(None, f"malformed answer: a Node was expected, got {kind or str(obj)[:80]}")
    return obj


def _error(exc: Exception) -> KubeError:
    from agent.kube.lean import api

    if isinstance(exc, api().ApiException):
        retry = (exc.headers or {}).get("Retry-After")
        try:
            message = json.loads(exc.body).get("message") or exc.reason
        except (TypeError, ValueError, AttributeError):
            message = exc.reason
        return KubeError(exc.status, f"{exc.status} {message}", _seconds(retry))
    return KubeError(None, f"API server unreachable: {exc}")


def _seconds(value: Any) -> float | None:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _kind(group: str, version: str, namespace: str, plural: str) -> dict[str, str]:
    """The path parameters of CUSTOM."""
    return {"group": group, "version": version, "namespace": namespace, "plural": plural}
