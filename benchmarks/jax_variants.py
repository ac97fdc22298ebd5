"""her2jax training throughput of one model under several variants, side by side.

    python benchmarks/jax_variants.py --model vit_base16 --json out.json \\
        --variant "xla" \\
        --variant "cudnn=--vit_attention cudnn" \\
        --variant "xla, no Triton GEMM=|--xla_gpu_enable_triton_gemm=false" \\
        -- --device gpu --dtype bfloat16 --image_size 224 --batch 64 --steps 10 --repeats 3

A variant is NAME[=ARGUMENTS[|XLA_FLAGS]]: ARGUMENTS go to benchmarks/torch_compare.py (its
her2jax options: --vit_attention, --cudnn_token_multiple, ...), XLA_FLAGS to the environment.
Each variant runs in its own process (XLA reads its flags once) through `torch_compare.py
--her2jax_only --no_flops`, with the arguments after `--` common to all, and its own time limit
(--timeout, seconds): a variant that fails or runs out of time is reported as such and the rest
go on. The table gives each variant's median images/s (min-max), its ratio to the first
variant, the compile time and the first loss (the same function gives the same loss up to
rounding); --json keeps every figure. Exit status 1 when a variant failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_variant(text: str) -> dict[str, Any]:
    name, _, rest = text.partition("=")
    arguments, _, flags = rest.partition("|")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r} has no name (NAME[=ARGS[|XLA_FLAGS]])")
    return {"name": name.strip(), "arguments": shlex.split(arguments), "xla_flags": flags.strip()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, common = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a torch_compare.py model name")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="NAME[=ARGS[|XLA_FLAGS]]; the first is the baseline of the ratios")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = [v["name"] for v in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"variant names repeat: {names}")
    args.common = common
    return args


def run_variant(variant: dict[str, Any], args, folder: str) -> dict[str, Any]:
    out = os.path.join(folder, f"{len(os.listdir(folder))}.json")
    command = [sys.executable, os.path.join(HERE, "torch_compare.py"), "--models", args.model,
               "--her2jax_only", "--no_flops", *args.common, *variant["arguments"],
               "--json", out]
    env = dict(os.environ)
    if variant["xla_flags"]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + variant["xla_flags"]).strip()
    record = {**variant, "command": shlex.join(command[1:])}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return record | {"error": f"no result within {args.timeout:.0f} s"}
    if not os.path.exists(out):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return record | {"error": f"exit {done.returncode}: {' / '.join(tail)}"}
    result = json.load(open(out))["results"][0]["her2jax"]
    if "error" in result:
        return record | {"error": result["error"]}
    return record | {"result": result}


def table(records: list[dict[str, Any]], args) -> str:
    lines = [f"her2jax {args.model}, {' '.join(args.common) or 'torch_compare defaults'}",
             "| variant | images/s (min-max) | vs first | compile s | first loss |",
             "|---|---|---|---|---|"]
    base = records[0].get("result", {}).get("images_per_s") if records else None
    for record in records:
        if "error" in record:
            lines.append(f"| {record['name']} | failed: {record['error']} | n/a | n/a | n/a |")
            continue
        result = record["result"]
        ratio = f"{result['images_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {record['name']} | {result['images_per_s']:.2f} "
                     f"({result['min']:.2f}-{result['max']:.2f}) | {ratio} | "
                     f"{result['compile_s']:.1f} | {result['first_loss']:.6f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variant:
            records.append(run_variant(variant, args, folder))
            status = (f"{records[-1]['result']['images_per_s']:.2f} images/s"
                      if "result" in records[-1] else f"FAILED {records[-1]['error']}")
            print(f"  {variant['name']}: {status}", file=sys.stderr, flush=True)
            if args.json:   # rewritten after every variant
                with open(args.json, "w") as handle:
                    json.dump({"model": args.model, "common": args.common,
                               "variants": records}, handle, indent=1)
    text = table(records, args)
    print(text, flush=True)
    return {"model": args.model, "common": args.common, "variants": records, "table": text}


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["variants"]) else 0)
