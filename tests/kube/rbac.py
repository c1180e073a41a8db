"""RBAC as the API server's authorizer applies it, for the requests the fake API server
recorded: each request becomes the attributes the authorizer sees (API group, resource with its
subresource, verb, namespace, name) and is allowed only if a rule of a (Cluster)Role grants
them. So a test proves the manifests in deploy/ allow exactly what the code does."""

from __future__ import annotations

import re
from typing import Any

from tests.kube.fake_api import Request

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def attributes(req: Request) -> tuple[str, str, str, str | None, str | None]:
    """(group, resource[/subresource], verb, namespace, name) of one request."""
    m = _PATH.match(req.path)
    if m is None:
        raise ValueError(f"not a resource path: {req.path}")
    group = m["group"] or ""
    resource = m["resource"] + (f"/{m['sub']}" if m["sub"] else "")
    if req.method == "GET":
        verb = "get" if m["name"] else ("watch" if req.query.get("watch") else "list")
    else:
        verb = _VERBS[req.method]
    return group, resource, verb, m["ns"], m["name"]


def denied(requests: list[Request], roles: list[dict[str, Any]], namespace: str) -> list[str]:
    """The requests no rule allows. `roles`: the manifests of one service account; its
    ClusterRoles grant anywhere, its Roles only in `namespace` (where the RoleBinding is)."""
    roles = [r for r in roles if r.get("kind") in ("ClusterRole", "Role")]
    out = []
    for req in requests:
        group, resource, verb, ns, name = attributes(req)
        if not any(
            _grants(rule, group, resource, verb, name)
            for role in roles
            if role["kind"] == "ClusterRole" or ns == namespace
            for rule in role["rules"]
        ):
            out.append(f"{req.method} {req.path} ({verb} {group or 'core'}/{resource})")
    return out


def _grants(rule: dict[str, Any], group: str, resource: str, verb: str, name: str | None) -> bool:
    names = rule.get("resourceNames")
    return (
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        # resourceNames never match a create or a list (the name is not in the request)
        and (not names or (name is not None and name in names and verb not in ("create", "list")))
    )
