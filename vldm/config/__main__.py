"""Inspect configs: `python -m vldm.config --reference` prints every key with its type, default and help;
`python -m vldm.config CONFIG.yaml key=value ...` validates and prints the resolved config."""

from __future__ import annotations

import argparse
import sys

from vldm.config import Config, ConfigError, build_config, dump_yaml, reference


def markdown_reference() -> str:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, tp, default, help_ in reference(Config):
        cells = [f"`{key}`", tp, f"`{default}`", help_]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vldm.config", description=__doc__)
    ap.add_argument("--reference", action="store_true", help="print the config reference as a markdown table")
    ap.add_argument("args", nargs="*", help="YAML files and key=value overrides, in order")
    a = ap.parse_args(argv)
    if a.reference:
        print(markdown_reference())
        return 0
    yamls = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    try:
        cfg = build_config(Config, yamls, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(dump_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
