#!/usr/bin/env python3
"""An OTLP logs receiver for bulkhead's tests: decodes what it is sent with
the OpenTelemetry project's own protobuf definitions (opentelemetry-proto)
and writes every log record it accepts as one JSON line to --out.

It serves OTLP/gRPC and OTLP/HTTP (protobuf) on loopback, plain or TLS, and
prints {"grpc": PORT, "http": PORT} once both listen (port 0 picks one).
"""

import argparse
import json
import os
import signal
import ssl
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


STALL = {"until": None}


def record(out, via, request, headers):
    # A collector that stalls once (--stall-until): the first export is
    # answered only once the file exists (60 s at most).
    with LOCK:
        until, STALL["until"] = STALL["until"], None
    deadline = time.monotonic() + 60
    while until and not os.path.exists(until) and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = []
    for rl in request.resource_logs:
        resource = {kv.key: value(kv.value) for kv in rl.resource.attributes}
        for sl in rl.scope_logs:
            for r in sl.log_records:
                lines.append(json.dumps({
                    "via": via,
                    "resource": resource,
                    "scope": sl.scope.name,
                    "severity": r.severity_text,
                    "severity_number": r.severity_number,
                    "time_unix_nano": r.time_unix_nano,
                    "event_name": r.event_name,
                    "body": value(r.body),
                    "attributes": {kv.key: value(kv.value) for kv in r.attributes},
                    "headers": headers,
                }))
    with LOCK:
        out.write("".join(line + "\n" for line in lines))
        out.flush()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if k == "authorization"}
        record(self.out, "grpc", request, headers)
        return logs_service_pb2.ExportLogsServiceResponse()


def http_handler(out):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/logs" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_response(404 if self.path != "/v1/logs" else 415)
                self.end_headers()
                return
            request = logs_service_pb2.ExportLogsServiceRequest()
            request.ParseFromString(body)
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() == "authorization"}
            record(out, "http", request, headers)
            reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--stall-until", help="answer the first export only once this file exists")
    a = p.parse_args()
    STALL["until"] = a.stall_until
    out = open(a.out, "a", encoding="utf-8")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(out), server)
    if a.tls_cert:
        with open(a.tls_key, "rb") as k, open(a.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        grpc_port = server.add_secure_port(f"127.0.0.1:{a.grpc_port}", creds)
    else:
        grpc_port = server.add_insecure_port(f"127.0.0.1:{a.grpc_port}")
    server.start()

    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer(("127.0.0.1", a.http_port), http_handler(out))
    if a.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    print(json.dumps({"grpc": grpc_port, "http": httpd.server_address[1]}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    httpd.shutdown()
    out.close()


if __name__ == "__main__":
    sys.exit(main())
