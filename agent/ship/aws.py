"""The CloudWatch Logs client of the daemon: botocore, with only the data the sink needs.

botocore's client for `logs` parses the whole `endpoints.json` (every service in every
region) and the whole `logs` model (118 operations and their documentation): about 10 MiB of
resident memory for a sink that calls three operations (benchmarks/footprint.py). Beside this
module, `botocore_data/` holds the same files cut down: every partition's regions and
defaults, the endpoints of `logs` and of `sts` (credentials: a web identity, an assumed role),
and the three operations' shapes, without documentation. botocore finds them through its own
search path, before its built-in copies; every other file (partitions, endpoint rule sets,
retry rules) is botocore's own. They are cut from the botocore version they name, and used only
with that version (another one gets botocore's whole data, as before):
`python -m agent.ship.aws` writes them again from the installed botocore.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent import heap

DATA = Path(__file__).with_name("botocore_data")
VERSION = DATA / "botocore_version"
SERVICES = ("logs", "sts")
OPERATIONS = ("CreateLogGroup", "CreateLogStream", "PutLogEvents")


def logs_client(region: str | None, config: Any) -> Any:
    """A botocore `logs` client (boto3's layer above it adds nothing the sink uses); made once
    a process, so what making it left free is given back."""
    import botocore
    import botocore.session

    session = botocore.session.Session()
    if _version() == botocore.__version__:
        session.register_component("data_loader", _loader(session))
    client = session.create_client("logs", region_name=region, config=config)
    heap.settle()
    return client


def _version() -> str | None:
    try:
        return VERSION.read_text().strip()
    except OSError:
        return None


def _loader(session: Any) -> Any:
    """botocore's loader with `botocore_data/` after the user's own paths (AWS_DATA_PATH)."""
    from botocore.loaders import Loader

    class CutLoader(Loader):
        def is_builtin_path(self, path: str) -> bool:
            # botocore's data, cut: keeps the endpoint rule sets in charge, as with its own
            return path.startswith(str(DATA)) or super().is_builtin_path(path)

    given = (session.get_config_variable("data_path") or "").split(os.pathsep)
    user = [os.path.expanduser(os.path.expandvars(p)) for p in given if p]  # as botocore's own
    return CutLoader(extra_search_paths=[*user, str(DATA)])


def cut_endpoints(endpoints: dict[str, Any]) -> dict[str, Any]:
    """Every partition as it is, with only SERVICES' endpoints."""
    return {
        **endpoints,
        "partitions": [
            {**p, "services": {k: v for k, v in p["services"].items() if k in SERVICES}}
            for p in endpoints["partitions"]
        ],
    }


def cut_model(model: dict[str, Any]) -> dict[str, Any]:
    """OPERATIONS and the shapes they reach (input, output, errors), without documentation."""
    operations = {name: model["operations"][name] for name in OPERATIONS}
    shapes: dict[str, Any] = {}
    todo = [
        ref["shape"]
        for op in operations.values()
        for ref in (op.get("input"), op.get("output"), *op.get("errors", ()))
        if ref
    ]
    while todo:
        name = todo.pop()
        if name not in shapes:
            shape = shapes[name] = model["shapes"][name]
            todo += [shape[k]["shape"] for k in ("member", "key", "value") if k in shape]
            todo += [m["shape"] for m in shape.get("members", {}).values()]
    cut = {**model, "operations": operations, "shapes": dict(sorted(shapes.items()))}
    return _undocumented(cut)


def _undocumented(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _undocumented(v) for k, v in value.items() if k != "documentation"}
    if isinstance(value, list):
        return [_undocumented(v) for v in value]
    return value


def files() -> dict[Path, str]:
    """What `botocore_data/` holds, cut from the installed botocore."""
    import botocore
    from botocore.loaders import Loader

    loader = Loader()
    api = loader.determine_latest_version("logs", "service-2")
    model = cut_model(loader.load_service_model("logs", "service-2", api))
    return {
        DATA / "endpoints.json": _json(cut_endpoints(loader.load_data("endpoints"))),
        DATA / "logs" / api / "service-2.json": _json(model),
        VERSION: botocore.__version__ + "\n",
    }


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False) + "\n"


def main() -> None:
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
