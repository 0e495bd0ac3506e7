"""`hmlstm health`: ask a server's health service; one line saying why when it does not answer."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from hmlstm.capture import capture_fds
from hmlstm.cli.common import check_root_certificate, check_server, connection_reason
from hmlstm.errors import UserError


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 if a server answers SERVING (for container health checks)",
                       description="Ask a server's gRPC health service. TLS follows the server's own setting in a "
                       "container: with $HMLSTM_TLS_CERT set (what `hmlstm serve` reads), the check uses TLS and "
                       "trusts $HMLSTM_TLS_CA, or that certificate itself when no CA is given.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", "--target", dest="target", default="127.0.0.1:50051",
                   help="host:port of the server (--server, as in `segment`; --target also works)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-ca or $HMLSTM_TLS_CERT)")
    p.add_argument("--tls-ca", default=os.environ.get("HMLSTM_TLS_CA") or None,
                   help="PEM root certificate(s) to verify the server with (default $HMLSTM_TLS_CA, else the "
                        "server's own $HMLSTM_TLS_CERT, else the system's roots)")
    p.add_argument("--server-name", default=os.environ.get("HMLSTM_TLS_SERVER_NAME") or None,
                   help="the name the certificate must carry, when it is not the target's host (default "
                        "$HMLSTM_TLS_SERVER_NAME)")
    p.set_defaults(func=cmd_health)


def _health_reason(error, tls: bool) -> str:
    """Why a health check failed, in words; the TLS hint only where TLS may be the reason."""
    details = (error.details() or "").replace("\n", " ")
    reason = connection_reason(details, tls)
    if reason:
        return reason
    reason = details[:160] or "no answer"
    return reason if tls else f"{reason} (if the server uses TLS: --tls-ca, or $HMLSTM_TLS_CERT as in its container)"


def cmd_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        raise UserError(f"--timeout must be a number of seconds more than 0, at most 3600, got {args.timeout}")
    check_server(args.target, "--server")
    own_cert = os.environ.get("HMLSTM_TLS_CERT") or None
    ca = args.tls_ca or own_cert
    tls = args.tls or bool(ca)
    if args.server_name and not tls:
        raise UserError("--server-name is the name the server's TLS certificate must carry, and this check does "
                        "not use TLS; add --tls (or --tls-ca), or drop --server-name")
    if ca:
        check_root_certificate(ca, "--tls-ca" if args.tls_ca else "$HMLSTM_TLS_CERT")
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None)
        channel = grpc.secure_channel(args.target, creds, options)
    else:
        channel = grpc.insecure_channel(args.target, options)
    def check():
        with channel as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)

    try:
        r, _ = capture_fds(check)  # gRPC's C core logs TLS handshake failures on stderr: boiled down below
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {_health_reason(e, tls)}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(f"{args.target}: {status}")
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1
