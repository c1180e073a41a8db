"""The few API calls the agent makes, through the `kubernetes` client, with dicts in and out.

Raw JSON (`_preload_content=False`) rather than the client's models: less memory and time, and
patches keep exactly the shape we send. Each call has a timeout; none retries by itself (the
callers back off, honouring Retry-After). Synchronous: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

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
        self.v1 = k.CoreV1Api(self.api)
        self.leases = k.CoordinationV1Api(self.api)
        self.custom = k.CustomObjectsApi(self.api)
        self.timeout = timeout
        self._watching: Any = None

    def close(self) -> None:
        self.api.close()

    def get_node(self, name: str) -> dict[str, Any]:
        return _node(self._call(self.v1.read_node, name))

    def patch_node(self, name: str, body: Any, content_type: str, status: bool = False) -> dict:
        call = self.v1.patch_node_status if status else self.v1.patch_node
        return _node(self._call(call, name, body, _content_type=content_type))

    def list_nodes(self, label_selector: str) -> list[dict[str, Any]]:
        # resourceVersion=0: served from the API server's cache, not from etcd
        answer = self._call(self.v1.list_node, label_selector=label_selector, resource_version="0")
        return list(answer.get("items") or [])

    def list_pods_on(self, node: str) -> list[dict[str, Any]]:
        """Every pod bound to `node`, in all namespaces (fresh: not from the cache)."""
        answer = self._call(
            self.v1.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}"
        )
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
        self._call(self.v1.create_namespaced_pod_eviction, name, namespace, body)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        answer = self._call(self.v1.list_namespaced_pod, namespace, label_selector=label_selector)
        return list(answer.get("items") or [])

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """A pod's log (of `container`), as text."""
        kw = {"container": container} if container else {}
        try:
            resp = self.v1.read_namespaced_pod_log(
                name, namespace, _preload_content=False, _request_timeout=self.timeout, **kw
            )
            return resp.data.decode(errors="replace")
        except Exception as exc:
            raise _error(exc) from exc

    def create_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict
    ) -> dict:
        return self._call(
            self.custom.create_namespaced_custom_object, group, version, namespace, plural, body
        )

    def get_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> dict:
        return self._call(
            self.custom.get_namespaced_custom_object, group, version, namespace, plural, name
        )

    def list_objects(
        self, group: str, version: str, namespace: str, plural: str, label_selector: str
    ) -> list[dict[str, Any]]:
        answer = self._call(
            self.custom.list_namespaced_custom_object,
            group,
            version,
            namespace,
            plural,
            label_selector=label_selector,
        )
        return list(answer.get("items") or [])

    def delete_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> None:
        """Deleted with its pods (propagation Background)."""
        self._call(
            self.custom.delete_namespaced_custom_object,
            group,
            version,
            namespace,
            plural,
            name,
            propagation_policy="Background",
        )

    def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self.leases.read_namespaced_lease, name, namespace)

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.leases.create_namespaced_lease, namespace, body)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: the body's resourceVersion is the precondition (409 when someone wrote first)."""
        return self._call(self.leases.replace_namespaced_lease, name, namespace, body)

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self.v1.read_namespaced_config_map, name, namespace)

    def create_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.v1.create_namespaced_config_map, namespace, body)

    def replace_config_map(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: the body's resourceVersion is the precondition (409 when someone wrote first)."""
        return self._call(self.v1.replace_namespaced_config_map, name, namespace, body)

    def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.v1.create_namespaced_event, namespace, body)

    def patch_event(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            self.v1.patch_namespaced_event, name, namespace, body, _content_type=STRATEGIC
        )

    def watch_node(self, name: str, resource_version: str, seconds: int) -> Iterator[dict]:
        """The node's changes after `resource_version`, as {type, object}, for `seconds`."""
        try:
            resp = self.v1.list_node(
                field_selector=f"metadata.name={name}",
                watch=True,
                resource_version=resource_version,
                timeout_seconds=seconds,
                allow_watch_bookmarks=False,
                _preload_content=False,
                _request_timeout=(self.timeout, seconds + self.timeout),
            )
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

    def _call(self, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kw)
            return json.loads(resp.data or b"{}")
        except Exception as exc:
            raise _error(exc) from exc


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
