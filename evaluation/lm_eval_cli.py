"""moe-lm-eval: lm-evaluation-harness's own CLI, with the "understudy" model registered.

  moe-lm-eval --model understudy --model_args model=DIR,plan=PLAN_DIR --tasks wikitext [--device cuda] ...
  moe-lm-eval run|ls|validate ...          (every lm-eval command and flag, unchanged)

lm-eval 0.4.13 looks models up in its registry, which only imports fill (it reads no entry points), so plain
`lm_eval --model understudy` cannot find the model; this command imports evaluation.lm_eval_adapter, which
registers it, and then runs lm-eval's CLI on the same arguments. A user mistake in the understudy model_args is
one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

from artifacts.errors import run_cli

PROG = "moe-lm-eval"


def main(argv: list[str] | None = None) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print(f"{PROG}: error: lm-evaluation-harness is not installed; pip install \"understudy[lm-eval]\" "
              "(or pip install lm_eval)", file=sys.stderr)
        return 2
    import evaluation.lm_eval_adapter  # noqa: F401  (registers --model understudy)

    if argv is not None:                 # lm-eval's CLI parses sys.argv itself
        sys.argv = [PROG, *argv]

    def body() -> int:
        cli_evaluate()
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
