"""Trim the vendor OpenAPI specs to the operations mergetag calls.

The full specs are megabytes and live outside the repo; CI needs a small,
committed copy that validates requests exactly as the original would.
Re-run after a vendor spec changes:

    python tests/specs/trim.py /work/shared/specs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# name of the trimmed copy -> (original file name, {path: methods kept})
SPECS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "klaviyo": (
        "klaviyo_openapi_stable_2026-07-15.json",
        {
            "/api/profile-import": ("post",),
            "/api/profile-bulk-import-jobs": ("post",),
            "/api/profile-bulk-import-jobs/{job_id}": ("get",),
            "/api/profile-bulk-import-jobs/{id}/import-errors": ("get",),
            "/api/profile-subscription-bulk-delete-jobs": ("post",),
            "/api/profile-subscription-bulk-create-jobs": ("post",),
            "/api/data-privacy-deletion-jobs": ("post",),
            "/api/profiles": ("get",),
        },
    ),
    "sendgrid": (
        "sendgrid_tsg_mc_contacts_v3.json",
        {
            "/v3/marketing/contacts": ("put", "delete"),
            "/v3/marketing/contacts/imports/{id}": ("get",),
            "/v3/marketing/contacts/search/emails": ("post",),
        },
    ),
}


def output_path(name: str, out_dir: Path = HERE) -> Path:
    """Where the trimmed copy of spec `name` lives."""
    return out_dir / f"{name}.json"


def _pointer_parts(ref: str) -> list[str]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")]


def _refs(node: Any):
    """Yield every $ref string inside `node`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _security_names(node: Any):
    """Yield the security scheme names used by a list of security requirements."""
    for requirement in node or ():
        yield from requirement


def trim(spec: dict[str, Any], keep: dict[str, tuple[str, ...]], source_name: str, source_sha256: str) -> dict[str, Any]:
    """Return `spec` reduced to the `keep` operations and the components they reach."""
    paths: dict[str, Any] = {}
    for path, methods in keep.items():
        item = spec["paths"].get(path)
        if item is None:
            raise KeyError(f"{source_name}: path {path} not in spec")
        missing = [m for m in methods if m not in item]
        if missing:
            raise KeyError(f"{source_name}: {path} has no {missing}")
        paths[path] = {k: v for k, v in item.items() if k not in HTTP_METHODS or k in methods}

    components = spec.get("components", {})
    needed: set[tuple[str, str]] = set()
    pending = list(_refs(paths))
    while pending:
        parts = _pointer_parts(pending.pop())
        if len(parts) < 3 or parts[0] != "components":
            raise ValueError(f"{source_name}: $ref outside components: {'/'.join(parts)}")
        key = (parts[1], parts[2])
        if key in needed:
            continue
        needed.add(key)
        pending.extend(_refs(components[parts[1]][parts[2]]))

    schemes = set(_security_names(spec.get("security")))
    for item in paths.values():
        for method in HTTP_METHODS:
            if method in item:
                schemes.update(_security_names(item[method].get("security")))
    needed.update(("securitySchemes", name) for name in schemes)

    kept_components: dict[str, Any] = {}
    for section, entries in components.items():
        chosen = {name: body for name, body in entries.items() if (section, name) in needed}
        if chosen:
            kept_components[section] = chosen

    used_tags = {t for item in paths.values() for m in HTTP_METHODS if m in item for t in item[m].get("tags", ())}

    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "paths":
            out[key] = paths
        elif key == "components":
            out[key] = kept_components
        elif key == "tags":
            out[key] = [t for t in value if t.get("name") in used_tags]
        elif key == "info":
            out[key] = {
                **value,
                "x-trimmed-from": f"{source_name}, trimmed by tests/specs/trim.py to the operations mergetag calls",
                "x-trimmed-from-sha256": source_sha256,
            }
        else:
            out[key] = value
    return out


def render(source_dir: Path, name: str) -> str:
    """The exact text of the trimmed copy of spec `name` built from `source_dir`."""
    source_name, keep = SPECS[name]
    raw = (source_dir / source_name).read_bytes()
    trimmed = trim(json.loads(raw), keep, source_name, hashlib.sha256(raw).hexdigest())
    return json.dumps(trimmed, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="directory holding the original vendor specs")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write the trimmed copies (default: next to this script)")
    args = parser.parse_args(argv)
    for name in SPECS:
        text = render(args.source_dir, name)
        target = output_path(name, args.out_dir)
        target.write_text(text, encoding="utf-8")
        print(f"{target}: {len(text.encode()):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
