"""``hlip-ray``: the command line. Each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import sys

from hlip_ray.config import ConfigError, config_reference, dump_config, load_config


def _config_command(args: argparse.Namespace) -> int:
    if args.reference:
        print(config_reference(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _storage(config):
    from hlip_ray.data.storage import Storage

    return Storage.from_config(config.storage)


def _synth_command(args: argparse.Namespace) -> int:
    from hlip_ray.demo.synth import write_corpus

    config = load_config(args.config, args.overrides)
    storage = _storage(config)
    out = args.out.rstrip("/")
    with storage.parallel_writer(out) as write:
        summary = write_corpus(write, studies=args.studies, seed=args.seed, size=args.size)
    print(f"wrote {summary.studies} studies, {summary.scans} scans, {summary.files} files to {out}")
    return 0


def _manifest_command(args: argparse.Namespace) -> int:
    from hlip_ray.data.manifest import build_manifest, write_manifest

    config = load_config(args.config, args.overrides)
    storage = _storage(config)
    rows = build_manifest(args.root, storage, salt=config.data.split_salt, val_fraction=config.data.val_fraction)
    write_manifest(rows, args.out, storage)
    splits: dict[str, int] = {}
    for row in rows:
        splits[row.split] = splits.get(row.split, 0) + 1
    print(f"wrote {len(rows)} studies to {args.out}: {splits}")
    return 0


def _preprocess_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.data.preprocess import summary_lines, write_shards
    from hlip_ray.data.quarantine import create_quarantine_log

    config = load_config(args.config, args.overrides)
    storage = _storage(config)
    rows = read_manifest(args.manifest, storage, data_root=args.data_root)
    ray_runtime.connect()
    summary = write_shards(rows, config, storage, args.out, create_quarantine_log())
    print("\n".join(summary_lines(summary, args.out)))
    return 0


def _train_command(args: argparse.Namespace) -> int:
    import json

    from hlip_ray import ray_runtime
    from hlip_ray.train.run import fit

    config = load_config(args.config, args.overrides)
    ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers))
    summary = fit(config, init_checkpoint=args.checkpoint)
    print(json.dumps(summary, default=str))
    return 0


def _tune_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.tune.results import summary_lines, write_results
    from hlip_ray.tune.space import load_space
    from hlip_ray.tune.sweep import run_sweep, sweep_config, sweep_dir

    config = load_config(args.config, args.overrides)
    space = load_space(args.space)
    sweep_config(config, space)   # every point of the space checked before Ray starts
    # The trials' own output (Ray Train, Ray Data, DeepSpeed) stays in Ray's session logs: the console
    # gets one line per trial event.
    ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers), log_to_driver=False)
    grid, base = run_sweep(config, space, resume=args.resume)
    found = write_results(grid, base, space.keys, sweep_dir(base), _storage(config))
    print("\n".join(summary_lines(found, base, space.keys)))
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    """A run checkpoint brings its config (model, preprocessing, data, vocabulary); overrides apply on top."""
    import json

    from hlip_ray import ray_runtime
    from hlip_ray.config import apply_overrides
    from hlip_ray.eval.run import evaluate_split
    from hlip_ray.eval.trained_model import is_run_checkpoint, load_model, read_config

    config = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or config.eval.checkpoint
    if not checkpoint:
        raise ValueError("name a model: --checkpoint (a run checkpoint folder or URI, or an HLIP model file)")
    storage = _storage(config)
    if is_run_checkpoint(checkpoint, storage):
        config = apply_overrides(read_config(checkpoint, storage), args.overrides, checkpoint)
    model, _ = load_model(checkpoint, storage, config)
    ray_runtime.connect()
    report = evaluate_split(model, config, split=args.split)
    print(json.dumps({"checkpoint": checkpoint, **report}))
    return 0


def _spot_watch_command(args: argparse.Namespace) -> int:
    from hlip_ray import spot

    config = load_config(args.config, args.overrides).spot
    try:
        if args.now:
            spot.drain_node(config.now_deadline_s, "termination signal (preStop)", address=args.address,
                            node_id=args.node_id)
            print(f"spot-watch: node drained, {config.now_deadline_s} s announced", flush=True)
            return 0
        print(f"spot-watch: polling {config.imds_endpoint} every {config.poll_interval_s:g} s", flush=True)
        spot.watch(config.imds_endpoint, config.poll_interval_s, address=args.address, node_id=args.node_id)
    except RuntimeError as error:   # the drain failed: no Ray node here, or the cluster refused it
        print(f"hlip-ray spot-watch: {error}", file=sys.stderr)
        return 1
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from hlip_ray.demo import job

    job.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlip-ray", description="HLIP-style 3D medical CLIP on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="validate a config and print it with overrides applied")
    config.add_argument("--config", help="YAML config (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4")
    config.add_argument("--reference", action="store_true",
                        help="print the configuration reference (every key, type, default, description) as Markdown")
    config.set_defaults(run=_config_command)

    def with_config(command):
        command.add_argument("--config", help="YAML config (default: built-in defaults)")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. storage.endpoint_url=...")
        return command

    synth = with_config(commands.add_parser("synth", help="write a synthetic DICOM/NIfTI corpus"))
    synth.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    synth.add_argument("--studies", type=int, default=24)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=["small", "medium"], default="small")
    synth.set_defaults(run=_synth_command)

    manifest = with_config(commands.add_parser("manifest", help="build a manifest from a folder listing"))
    manifest.add_argument("--root", required=True, help="root/<study>/<scan>/... folder or s3:// prefix")
    manifest.add_argument("--out", required=True, help="manifest .parquet or .jsonl (local or s3://)")
    manifest.set_defaults(run=_manifest_command)

    preprocess = with_config(commands.add_parser("preprocess", help="decode a manifest into Parquet shards"))
    preprocess.add_argument("--manifest", required=True)
    preprocess.add_argument("--out", required=True,
                            help="folder or s3:// prefix for shards. Into a folder that holds shards already, "
                                 "preprocess resumes: studies written there are not decoded again, the others "
                                 "are added (an interrupted run is taken up); the preprocessing settings must "
                                 "match the folder's")
    preprocess.add_argument("--data-root", help="data root of an HLIP JSON manifest")
    preprocess.set_defaults(run=_preprocess_command)

    train = with_config(commands.add_parser("train", help="train (or resume) a run on Ray Train + DeepSpeed"))
    train.add_argument("--checkpoint", help="initial weights: a run checkpoint (folder or URI) or an HLIP model file")
    train.set_defaults(run=_train_command)

    tune = with_config(commands.add_parser("tune", help="sweep a space of configs with Ray Tune (ASHA)"))
    tune.add_argument("--space", required=True, help="a space YAML (tune_spaces/*.yaml)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted sweep named tune.name under tune.storage_path")
    tune.set_defaults(run=_tune_command)

    evaluate = with_config(commands.add_parser("eval", help="zero-shot AUC of a trained model on a split"))
    evaluate.add_argument("--checkpoint", help="a run checkpoint (folder or URI) or an HLIP model file")
    evaluate.add_argument("--split", default="val")
    evaluate.set_defaults(run=_eval_command)

    watch = with_config(commands.add_parser(
        "spot-watch", help="on a spot instance's reclaim notice, drain this Ray node (training checkpoints at once)"))
    watch.add_argument("--now", action="store_true",
                       help="drain at once (a Kubernetes preStop hook), announcing spot.now_deadline_s")
    watch.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, or the one on this machine)")
    watch.add_argument("--node-id", help="the Ray node to drain (default: this machine's)")
    watch.set_defaults(run=_spot_watch_command)

    demo = commands.add_parser("demo", help="run the embedded CPU demo")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"hlip-ray {args.command}: stopped", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"hlip-ray: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
