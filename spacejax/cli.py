"""Command line: `spacejax convert | ...`. The only module that knows about argv."""

from __future__ import annotations

import argparse
import sys

from spacejax import checkpoint, hf


def convert(args: argparse.Namespace) -> None:
    """Hugging Face directory <-> spacejax params checkpoint."""
    if args.from_hf:
        overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
        cfg, params = hf.load(args.from_hf, **overrides)
        checkpoint.save_params(args.out, cfg, params)
    else:
        cfg, params = checkpoint.load_params(args.to_hf)
        hf.save(cfg, params, args.out, max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spacejax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="Hugging Face checkpoint <-> spacejax params checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a local Hugging Face model directory")
    source.add_argument("--to-hf", metavar="CKPT_DIR", help="a spacejax params checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"],
                   help="with --from-hf: dtype of the stored params (default float32)")
    p.add_argument("--max-shard-gib", type=float, default=5.0,
                   help="with --to-hf: split safetensors files above this size (GiB)")
    p.set_defaults(run=convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"spacejax {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
