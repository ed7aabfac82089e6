#!/usr/bin/env python3
"""Evaluates a ValidatingAdmissionPolicy's CEL (variables, then the first
validation and its messageExpression) with cel-python, for bulkhead's tests.

    admission.py POLICY.yaml < cases.json

Each case is {"object": ..., "oldObject": ... or null, "request": ...}, as
the API server binds them; prints one JSON line per case:
{"allowed": bool, "message": str}.
"""

import json
import sys

import celpy
import yaml


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        policy = next(d for d in yaml.safe_load_all(f) if d["kind"] == "ValidatingAdmissionPolicy")
    spec = policy["spec"]
    env = celpy.Environment()

    def evaluate(expr, activation):
        return env.program(env.compile(expr)).evaluate(activation)

    for case in json.load(sys.stdin):
        activation = {k: celpy.json_to_cel(v) for k, v in case.items()}
        variables = {}
        for v in spec.get("variables", []):
            activation["variables"] = celpy.json_to_cel(variables)
            variables[v["name"]] = evaluate(v["expression"], activation)
        activation["variables"] = celpy.json_to_cel(variables)
        rule = spec["validations"][0]
        allowed = bool(evaluate(rule["expression"], activation))
        message = "" if allowed else str(evaluate(rule["messageExpression"], activation))
        print(json.dumps({"allowed": allowed, "message": message}))


if __name__ == "__main__":
    sys.exit(main())
