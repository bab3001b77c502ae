"""Regenerate rayservice.v1.schema.json from a KubeRay CRD file.

    python deploy/schema/extract_schema.py path/to/ray.io_rayservices.yaml

Takes the served ``v1`` version's ``openAPIV3Schema`` of the RayService CRD, drops every
``description`` (prose, not structure) and writes the rest, sorted, next to this script. The
schema is KubeRay's (Apache-2.0); see PROVENANCE.md for the release it was taken from.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("rayservice.v1.schema.json")


def structure(node):
    if isinstance(node, dict):
        return {k: structure(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [structure(v) for v in node]
    return node


def main(crd_path: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayService":
        raise SystemExit(f"{crd_path}: not the RayService CRD")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    OUT.write_text(json.dumps(structure(version["schema"]["openAPIV3Schema"]), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
