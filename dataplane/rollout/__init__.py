"""Release gate for canary and shadow rollouts: baseline vs candidate observations in, promote / hold / rollback out.

``observations`` holds the typed input (one served request, the gate policy), ``gate`` the pure
decision function, ``mirror_logs`` the reader for vLLM- and SGLang-style streaming request logs,
``commands`` the file-level entry points behind ``modelfleet gate`` and ``modelfleet mirror-gate``.
See ``docs/rollouts.md``.
"""
