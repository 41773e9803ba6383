#!/usr/bin/env python3
"""Validate attribution-graph JSON files against Neuronpedia's graph-schema.json (draft-07).

Usage: python3 scripts/validate-graph-json.py SCHEMA.json GRAPH.json...

Prints one line per graph ("GRAPH: valid", or "GRAPH: invalid: PATH: MESSAGE" for each error,
at most 20) and exits 0 when every graph is valid, 1 when one is not, 2 on unreadable input
and 3 when the jsonschema module is missing (Debian: python3-jsonschema), so a caller can
tell "cannot check" from "invalid". Offline: the schema has no remote references.
"""
import json
import sys


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        import jsonschema
    except ImportError:
        print("validate-graph-json: the jsonschema module is missing (Debian: python3-jsonschema)", file=sys.stderr)
        return 3
    try:
        with open(argv[1], encoding="utf-8") as f:
            schema = json.load(f)
        jsonschema.Draft7Validator.check_schema(schema)
    except (OSError, ValueError, jsonschema.SchemaError) as e:
        print(f"{argv[1]}: {e}".splitlines()[0], file=sys.stderr)
        return 2
    validator = jsonschema.Draft7Validator(schema)
    bad = False
    for path in argv[2:]:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: {e}".splitlines()[0], file=sys.stderr)
            return 2
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if not errors:
            print(f"{path}: valid")
            continue
        bad = True
        for e in errors[:20]:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            print(f"{path}: invalid: {where}: {e.message}".splitlines()[0])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
