"""The ``--precision`` option shared by the quality and tasks benchmarks."""

import napari_ngr
from napari_ngr.solver import resolve_precision


def add_argument(ap):
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the network's arithmetic for every row (default: the library's default, auto)")


def apply(args):
    """Set ``args.precision`` as every task's default solver option."""
    for d in napari_ngr.DEFAULTS.values():
        d["options"]["precision"] = args.precision


def describe(args) -> str:
    """For the table's header: what the option means on this device."""
    return (f"precision {args.precision} (single images {resolve_precision(args.precision, args.device)}, "
            f"stacks {resolve_precision(args.precision, args.device, False)})")
