"""``hlip-ray``: the command line. Each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import sys

from hlip_ray.config import ConfigError, dump_config, load_config


def _config_command(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from hlip_ray import demo

    demo.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlip-ray", description="HLIP-style 3D medical CLIP on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="validate a config and print it with overrides applied")
    config.add_argument("--config", help="YAML config (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4")
    config.set_defaults(run=_config_command)

    demo = commands.add_parser("demo", help="run the embedded CPU demo")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"hlip-ray: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
