"""`deepstack-operator` / `python -m deepstack_operator`: run the operator."""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import uuid

import kopf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="deepstack-operator", description="Reconcile DeepStackDisaggregation resources."
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--peering", default=os.environ.get("DEEPSTACK_PEERING", "deepstack-operator")
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(os.environ["DEEPSTACK_PRIORITY"])
        if os.environ.get("DEEPSTACK_PRIORITY")
        else None,
        help="peering priority; default: random, so that replicas never tie (a tie freezes all)",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (a single instance)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every handled watch event at INFO; ours say what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from deepstack_operator import handlers  # registers the handlers

    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)
    # Our record in the peering object (in a pod, the hostname is the pod's name). The
    # handlers' peering gate needs to know which record is ours.
    identity = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        identity=identity,  # type: ignore[arg-type]  # kopf's Identity: a str NewType it does not export
        memo=kopf.Memo({handlers.IDENTITY_MEMO: identity}),
    )


if __name__ == "__main__":
    main()
