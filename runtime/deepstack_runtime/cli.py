"""`deepstack-runtime`: the runtime servers and tools.

    deepstack-runtime make-tiny-model DIR
    deepstack-runtime encode   --config FILE
    deepstack-runtime language --config FILE
    deepstack-runtime router   --config FILE [--encode-url URL ...] [--language-url URL ...]

The configuration file is the one the operator renders (a ConfigMap); the pod's identity
comes from the environment (POD_IP). Flags override ports for running several servers on
one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from deepstack_runtime.config import ROUTER_LIMIT_TABLE, ConfigError, RuntimeConfig

if TYPE_CHECKING:  # the servers import aiohttp; make-tiny-model does not need them
    from deepstack_runtime.servers.common import Listen


def _listen(args: argparse.Namespace, config: RuntimeConfig) -> Listen:
    from deepstack_runtime.servers.common import Listen

    advertise = args.advertise_host or os.environ.get("POD_IP") or "127.0.0.1"
    return Listen(
        host=args.host,
        port=args.port if args.port is not None else config.http_port,
        metrics_port=args.metrics_port if args.metrics_port is not None else config.metrics_port,
        bootstrap_port=args.bootstrap_port
        if args.bootstrap_port is not None
        else config.transfer.bootstrap_port,
        advertise_host=advertise,
        drain_timeout=args.drain_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepstack-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny-model", help="write a small random Qwen3-VL-MoE checkpoint")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    for role in ("encode", "language", "router"):
        p = sub.add_parser(role, help=f"run the {role} server")
        p.add_argument("--config", required=True, help="runtime configuration (JSON)")
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="address to listen on (a pod: 0.0.0.0, which the operator sets)",
        )
        p.add_argument(
            "--port", type=int, default=None, help="HTTP port (default: from the config)"
        )
        p.add_argument(
            "--metrics-port", type=int, default=None, help="0: /metrics on the HTTP port only"
        )
        p.add_argument(
            "--bootstrap-port", type=int, default=None, help="encode: 0 picks a free port"
        )
        p.add_argument(
            "--advertise-host", default=None, help="address peers use (default: $POD_IP)"
        )
        p.add_argument("--drain-timeout", type=float, default=60.0)
        if role == "router":
            p.add_argument(
                "--encode-url", action="append", default=[], help="static encode instances"
            )
            p.add_argument(
                "--language-url", action="append", default=[], help="static language instances"
            )
            # The router's limits (RouterOptions'), from the one table of them.
            for limit in ROUTER_LIMIT_TABLE:
                p.add_argument(
                    limit.flag,
                    type=limit.type,
                    default=limit.default,
                    help=f"{limit.help} (default: %(default)s)",
                )
            p.add_argument(
                "--health-interval",
                type=float,
                default=1.0,
                help="seconds between discovering instances and probing their /health",
            )
            p.add_argument(
                "--allow-local-files", action="store_true", help="accept file: image URLs"
            )
            p.add_argument(
                "--image-url-domain",
                "--media-url-domain",
                dest="image_url_domain",
                action="append",
                default=[],
                help="a host, *.domain, address or network image and video URLs may name "
                "(repeatable)",
            )
            p.add_argument(
                "--api-keys-file",
                default="",
                help="keys clients must send (one per line), re-read when it changes; "
                "missing or blank: the router does not start",
            )
            p.add_argument(
                "--instances-file",
                default="",
                help='JSON {"encode": [urls], "language": [urls]}, re-read every second',
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Extra arguments (the resource's language.extraArgs) go to SGLang's engine on the
    # sglang backend; nothing else takes any.
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "make-tiny-model":
        from deepstack_runtime.models.tiny import make_tiny_model

        print(make_tiny_model(args.directory, seed=args.seed))
        return
    try:
        config = RuntimeConfig.from_file(args.config)
    except ConfigError as e:
        sys.exit(f"deepstack-runtime: {e}")
    listen = _listen(args, config)
    if extra and not (args.command == "language" and config.backend == "sglang"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "encode":
        from deepstack_runtime.servers.encode import run_encode

        asyncio.run(run_encode(config, listen))
    elif args.command == "language":
        from deepstack_runtime.servers.language import run_language

        failure = asyncio.run(run_language(config, listen, extra))
        if failure:  # the pod restarts with a fresh engine
            sys.exit(f"deepstack-runtime language: {failure}")
    else:
        from deepstack_runtime.servers.auth import ApiKeyError, ApiKeys
        from deepstack_runtime.servers.images import Allowlist
        from deepstack_runtime.servers.router import RouterOptions, run_router

        try:
            image_urls = Allowlist.parse(args.image_url_domain)
            api_keys = ApiKeys.load(args.api_keys_file)
        except (ValueError, ApiKeyError) as e:
            sys.exit(f"deepstack-runtime router: {e}")
        options = RouterOptions(
            encode_urls=args.encode_url,
            language_urls=args.language_url,
            allow_local_files=args.allow_local_files,
            image_urls=image_urls,
            instances_file=args.instances_file,
            health_interval=args.health_interval,
            **{limit.option: getattr(args, limit.option) for limit in ROUTER_LIMIT_TABLE},
            api_keys=api_keys,
        )
        asyncio.run(run_router(config, listen, options))
