"""The `modelfleet` command: `up`, and one subcommand per process role."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from modelfleet.dataplane import tracing
from modelfleet.dataplane.manifest import ManifestError
from modelfleet.dataplane.runners.registry import MissingExtraError
from modelfleet.dataplane.sidecar.routing import RoutingPolicyName, policy_choices

DEFAULT_MANIFEST = Path("examples/smollm2-local.yaml")


def _logging(role: str, level: str, fmt: str | None = None) -> None:
    """Text lines, or JSON lines with the request id (``--log-format json``, MODELFLEET_LOG_FORMAT)."""
    from modelfleet.dataplane.logs import configure, log_format

    configure(role, level, log_format(fmt))


def _server_flags(p: argparse.ArgumentParser, port: int | None = None) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, required=port is None, help="port to listen on")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text, or one JSON object per line with the request id (default: MODELFLEET_LOG_FORMAT, else text)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfleet", description="Serve LLMs behind one OpenAI-compatible gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a manifest on this machine (engines, sidecars, gateway)")
    up.add_argument("-f", "--file", type=Path, default=DEFAULT_MANIFEST, help=f"manifest (default {DEFAULT_MANIFEST})")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every replica")
    up.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="require API keys from this file (docs/security.md); without it the gateway runs open",
    )
    up.add_argument("--admin-token", type=Path, metavar="FILE", help="file holding the token /metrics requires")
    up.add_argument(
        "--restart",
        choices=["on-failure", "never"],
        default="on-failure",
        help="a child that exits once the stack is up: start it again with backoff (default), or stop the stack",
    )
    up.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="delay before restarting a child; doubles with each failure in a row, up to 30 s (default 1)",
    )

    engine = sub.add_parser("engine", help="run one engine replica")
    engine.add_argument("-f", "--file", type=Path, required=True, help="manifest (or the operator's ConfigMap file)")
    engine.add_argument("--deployment", help="deployment name when the manifest holds several")
    engine.add_argument("--replica", type=int, default=0)
    engine.add_argument("--tier", help="serve this spill-over tier of the deployment (its hosted API) instead")
    _server_flags(engine)

    sidecar = sub.add_parser("sidecar", help="run a coordinator sidecar")
    sidecar.add_argument("-f", "--file", type=Path, help="manifest: the routing policy comes from its spec.routing")
    sidecar.add_argument("--deployment", required=True)
    sidecar.add_argument("--peer", action="append", default=[], help="engine URL (repeat)")
    sidecar.add_argument(
        "--local-peer", metavar="URL", help="the engine in this sidecar's pod, one of the peers (prefix placement)"
    )
    sidecar.add_argument(
        "--tier", action="append", default=[], metavar="NAME=URL", help="spill-over tier engine (see spec.spillover)"
    )
    sidecar.add_argument(
        "--rollout-file",
        type=Path,
        metavar="PATH",
        help="rollout plan written by the launcher or the operator (canary/shadow traffic); absent: no rollout",
    )
    sidecar.add_argument(
        "--policy",
        choices=policy_choices(),
        metavar="POLICY",
        help=f"replica choice, one of {', '.join(policy_choices())} "
        "(default: the manifest's spec.routing.policy with -f, else MODELFLEET_POLICY, else LeastOutstanding)",
    )
    cluster = sidecar.add_argument_group(
        "cluster mode", "peers: the ready endpoints of a headless Service's EndpointSlices (the --peer URLs until then)"
    )
    cluster.add_argument("--kubernetes", action="store_true", help="discover peers through the Kubernetes API")
    cluster.add_argument("--service", help="the deployment's headless Service (required with --kubernetes)")
    cluster.add_argument("--namespace", help="its namespace (default: MODELFLEET_NAMESPACE, else the pod's own)")
    cluster.add_argument(
        "--engine-port-name", help="the EndpointSlice port that is the engine's (default: engine)", metavar="NAME"
    )
    cluster.add_argument("--engine-port", type=int, help="engine port for slices without that port name")
    cluster.add_argument(
        "--discovery-interval", type=float, metavar="SECONDS", help="seconds between two lists (default 5)"
    )
    _server_flags(sidecar)

    operator = sub.add_parser("operator", help="run the Kubernetes operator (settings: MODELFLEET_OPERATOR_* env vars)")
    operator.add_argument("--verbose", action="store_true")

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    source = gateway.add_mutually_exclusive_group(required=True)
    source.add_argument("--routes", type=Path, help="routing table file (JSON; what `modelfleet up` writes)")
    source.add_argument("--kubernetes", action="store_true", help="route to the InferenceDeployments of the cluster")
    security = gateway.add_argument_group("auth and CORS", "see docs/security.md")
    security.add_argument("--api-keys", type=Path, metavar="FILE", help="API keys file (YAML or JSON); absent: open")
    security.add_argument("--admin-token", type=Path, metavar="FILE", help="file holding the token /metrics requires")
    security.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN", help="browser origin allowed to call the gateway (repeat)"
    )
    _server_flags(gateway)

    replay = sub.add_parser("replay", help="run a workload through the scheduler on a simulated clock (no model)")
    replay.add_argument("--input", type=Path, required=True, help="workload (JSON)")
    replay.add_argument("--output", type=Path, required=True, help="where to write the report (JSON)")

    # release gate (docs/rollouts.md); exit 0 promote, 3 hold, 4 rollback, 2 malformed input
    gate = sub.add_parser("gate", help="judge candidate vs baseline observations: promote, hold or rollback")
    gate.add_argument("--input", type=Path, required=True, help="observations and policy (JSON)")
    gate.add_argument("--output", type=Path, required=True, help="where to write the report (JSON)")
    mirror_gate = sub.add_parser("mirror-gate", help="run the release gate on mirrored vLLM/SGLang-style request logs")
    mirror_gate.add_argument("--baseline", type=Path, required=True, help="baseline request log (JSONL or JSON)")
    mirror_gate.add_argument("--candidate", type=Path, required=True, help="candidate request log (JSONL or JSON)")
    mirror_gate.add_argument("--policy", type=Path, help="gate policy (JSON; default: the built-in policy)")
    mirror_gate.add_argument("--output", type=Path, required=True, help="where to write the report (JSON)")
    return parser


def _replay(input_path: Path, output_path: Path) -> int:
    # imported here: the other roles never need it, and it needs nothing but the scheduler
    from modelfleet.dataplane.engine.replay import WorkloadError, replay_file

    try:
        report = replay_file(input_path, output_path)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {output_path}: {exc.strerror}", file=sys.stderr)
        return 1
    totals = report["totals"]
    print(f"{totals['completed']} requests in {totals['ticks']} ticks; fingerprint {totals['fingerprint']}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from modelfleet.dataplane.rollout.commands import EXIT_CODES, gate_file, mirror_gate_files
    from modelfleet.dataplane.rollout.observations import RolloutInputError

    try:
        if args.command == "gate":
            report = gate_file(args.input, args.output)
        else:
            report = mirror_gate_files(args.baseline, args.candidate, args.policy, args.output)
    except RolloutInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{report['decision']}: {report['metrics']['matched']} matched requests; report in {args.output}")
    for reason in report["reasons"]:
        print(f"  {reason}")
    return EXIT_CODES[report["decision"]]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            from modelfleet.dataplane.launcher import LaunchError, up

            try:
                return up(
                    args.file,
                    args.host,
                    args.port,
                    ready_timeout=args.ready_timeout,
                    restart=args.restart,
                    restart_backoff_s=args.restart_backoff,
                    api_keys=args.api_keys,
                    admin_token=args.admin_token,
                )
            except LaunchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        if args.command == "operator":
            # the CLI is the composition root; the data plane itself never imports the operator
            operator_main = importlib.import_module("modelfleet.operator.main")
            operator_main.run(verbose=args.verbose)
            return 0
        if args.command == "replay":
            return _replay(args.input, args.output)
        if args.command in ("gate", "mirror-gate"):
            return _gate(args)
        _logging(
            args.command if args.command != "engine" else f"engine-{args.replica}", args.log_level, args.log_format
        )
        if tracing.setup(args.command):  # MODELFLEET_OTEL_ENDPOINT: spans to an OTLP/HTTP collector
            logging.getLogger(__name__).info("OpenTelemetry tracing on: %s", os.environ[tracing.ENDPOINT_ENV])
        if args.command == "engine":
            from modelfleet.dataplane.engine.main import run as run_engine
            from modelfleet.dataplane.settings import EngineSettings

            run_engine(
                EngineSettings(
                    manifest=args.file,
                    deployment=args.deployment,
                    replica=args.replica,
                    tier=args.tier,
                    host=args.host,
                    port=args.port,
                )
            )
        elif args.command == "sidecar":
            from modelfleet.dataplane.settings import SidecarSettings
            from modelfleet.dataplane.sidecar.main import manifest_routing, manifest_spillover
            from modelfleet.dataplane.sidecar.main import run as run_sidecar

            cluster = {
                "kubernetes": args.kubernetes or None,
                "service": args.service,
                "namespace": args.namespace,
                "engine_port_name": args.engine_port_name,
                "engine_port": args.engine_port,
                "discovery_interval_s": args.discovery_interval,
            }
            settings = SidecarSettings(
                deployment=args.deployment,
                peers=args.peer,
                local_peer=args.local_peer,
                tiers=args.tier,
                rollout_file=args.rollout_file,
                host=args.host,
                port=args.port,
                **{k: v for k, v in cluster.items() if v is not None},  # unset flags leave MODELFLEET_* env in force
            )
            if settings.kubernetes and not settings.service:
                print(
                    "error: sidecar --kubernetes needs --service (the deployment's headless Service)", file=sys.stderr
                )
                return 2
            if not settings.kubernetes and not settings.peers:
                print("error: sidecar needs --peer URLs, or --kubernetes to discover them", file=sys.stderr)
                return 2
            routing = manifest_routing(args.file, args.deployment) if args.file else None
            spillover = manifest_spillover(args.file, args.deployment) if args.file else None
            if settings.tiers and spillover is None:
                print("error: sidecar --tier needs -f with the deployment's spec.spillover", file=sys.stderr)
                return 2
            # the policy: the flag, then the manifest's spec.routing, then MODELFLEET_POLICY, then the default
            if args.policy is not None:
                settings.policy = RoutingPolicyName(args.policy)
            elif routing is not None:
                settings.policy = routing.policy
            run_sidecar(settings, routing, spillover)
        elif args.command == "gateway":
            from modelfleet.dataplane.gateway.auth import KeyFileError
            from modelfleet.dataplane.gateway.cors import CorsConfigError
            from modelfleet.dataplane.gateway.main import run as run_gateway
            from modelfleet.dataplane.settings import GatewaySettings

            auth = {
                "api_keys": args.api_keys,
                "admin_token": args.admin_token,
                "cors_allowed_origins": args.cors_origin,
            }
            try:  # unset flags leave MODELFLEET_* env in force
                run_gateway(
                    GatewaySettings(
                        routes=args.routes,
                        host=args.host,
                        port=args.port,
                        **{k: v for k, v in auth.items() if v is not None},
                    )
                )
            except (KeyFileError, CorsConfigError) as exc:  # a bad keys file or CORS setting: no gateway
                print(f"error: {exc}", file=sys.stderr)
                return 2
    except (ManifestError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
