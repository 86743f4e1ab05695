"""Run inside the engine-parsers environment (scripts/engine-parsers.sh): parse argvs with the engine's own parser.

stdin: {"engine": "vllm" | "sglang", "argvs": [[...], ...]} (each argv as the runner's ``command`` returns it:
``python -m vllm.entrypoints.openai.api_server ...`` or ``sglang serve ...``);
stdout: one JSON object per argv: the parsed namespace, or {"error": message} when the parser refuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Any


def parser(engine: str) -> argparse.ArgumentParser:
    if engine == "vllm":
        from vllm.entrypoints.common.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        return make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-any-return]
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def main() -> None:
    request = json.load(sys.stdin)
    engine = request["engine"]
    p = parser(engine)
    p.exit_on_error = False
    out: list[dict[str, Any]] = []
    for argv in request["argvs"]:
        args = argv[3:] if argv[1:2] == ["-m"] else argv[2:]  # "python -m MODULE" / "sglang serve"
        if engine == "sglang" and args[:2] == ["--model-type", "llm"]:
            args = args[2:]  # `sglang serve` takes --model-type itself and hands the rest to ServerArgs
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = p.parse_args(args)
        except (argparse.ArgumentError, SystemExit) as exc:
            out.append({"error": f"{exc} {err.getvalue()}".strip()})
            continue
        out.append({k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, list, type(None)))})
    print("\n" + json.dumps(out))


if __name__ == "__main__":
    main()
