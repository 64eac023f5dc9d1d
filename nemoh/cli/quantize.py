"""`nemoh quantize SRC DST`: a BF16/FP32 checkpoint -> a ModelOpt NVFP4 or FP8 one (nemoh.quant.quantize)."""
from __future__ import annotations

import argparse
from typing import Any

from nemoh.cli.common import CLIError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from nemoh.quant import quantize

    p = sub.add_parser("quantize", help="quantize a checkpoint to NVFP4/FP8 (ModelOpt layout)",
                       description=quantize.__doc__.splitlines()[0])
    quantize.add_arguments(p)
    p.set_defaults(handler=run_quantize)
    return p


def run_quantize(args: argparse.Namespace) -> int:
    from nemoh.quant import quantize

    try:
        return quantize.run_cli(args)
    except (ValueError, OSError) as e:  # every check on SRC, DST and the flags is made before anything is written
        raise CLIError(str(e)) from None
