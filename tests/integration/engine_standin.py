"""Stands in for vLLM's server / ``sglang serve`` in the engine-server runner tests.

SGLang needs a GPU and cannot be installed on these machines, and a real vLLM
(its CPU build) takes minutes to start, so for the supervision and proxying
tests the child the runners start is ModelFleet's own engine, a real
OpenAI-compatible server: it takes the flags the runner passes (the model,
``--served-model-name``,
``--uds`` or ``--host``/``--port``; the rest are accepted and ignored), serves
the model with a remote runner that forwards to ``FakeProvider`` (its URL in
``STANDIN_PROVIDER_URL``), and listens on the Unix socket or port the runner
chose. ``GET /health`` answers 200 once it is ready, as vLLM's and SGLang's do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.runners.remote import RemoteRunner
from modelfleet.dataplane.spec import InferenceDeploymentSpec


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="module")  # vLLM: python -m vllm.entrypoints.openai.api_server
    p.add_argument("subcommand", nargs="?")  # SGLang: serve
    p.add_argument("--model")
    p.add_argument("--model-path")
    p.add_argument("--served-model-name", nargs="+", required=True)
    p.add_argument("--uds")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    args, _ = p.parse_known_args(argv)
    return args


async def main(args: argparse.Namespace) -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": args.served_model_name[0], "source": {"runtimeManaged": True}},
            "runtime": {
                "kind": "remote",
                "remote": {"baseUrl": os.environ["STANDIN_PROVIDER_URL"], "apiKey": {"env": "STANDIN_KEY"}},
            },
        }
    )
    runner = RemoteRunner(spec)
    app = build_app(EngineState(spec, runner, EngineMetrics()))
    site_runner = web.AppRunner(app)
    await site_runner.setup()
    site: web.BaseSite = (
        web.UnixSite(site_runner, args.uds) if args.uds else web.TCPSite(site_runner, args.host, args.port)
    )
    await site.start()
    print(f"stand-in serving {args.served_model_name[0]} on {args.uds or args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await site_runner.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    asyncio.run(main(parse(sys.argv[1:])))
