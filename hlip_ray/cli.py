"""``hlip-ray``: the command line. Each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from hlip_ray import __version__
from hlip_ray.config import Config, ConfigError, dump_config, load_config, with_values
from hlip_ray.config_reference import config_reference

# Arguments that name local files or folders (or URIs): made absolute once, as the command line is read.
# Ray's workers do not share the driver's working directory, so a relative path handed on would be
# read or written somewhere else (a relative `preprocess --out` wrote its shards where the index never
# looked).
PATH_ARGUMENTS = ("config", "out", "root", "manifest", "data_root", "checkpoint", "init_from", "interpret", "space",
                  "study")
LATEST = "latest"   # --checkpoint latest: a word, not a path
# Config keys that name local files or folders (or URIs): made absolute as the config is loaded.
PATH_KEYS = ("data.manifest", "data.shards", "train.storage_path", "train.log_dir", "tune.storage_path",
             "eval.checkpoint", "eval.vocabulary")


# Exit codes, as `hlip-ray --help` and the command-line reference list them.
EXIT_FAILED = 1        # a failure while running: storage that failed after its retries, a drain refused
EXIT_USAGE = 2         # argparse's: an unknown flag, a missing argument
EXIT_BAD_INPUT = 3     # a bad config or input: one line naming the key, file or field, before any work
EXIT_INTERRUPTED = 130
EXIT_CODES = (f"Exit codes: 0 done, {EXIT_FAILED} a failure while running (storage that failed after its "
              f"retries: one line naming the URI and the cause), {EXIT_USAGE} a usage error, {EXIT_BAD_INPUT} a "
              f"bad config or input (one line naming the key, file or field), {EXIT_INTERRUPTED} interrupted.")


def absolute(path: str) -> str:
    """A local path (``~`` expanded, ``file://`` kept) as an absolute one, from the current folder;
    ``s3://`` and other URIs unchanged."""
    if path.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(path[len("file://"):]))
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_arguments(args: argparse.Namespace) -> None:
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value and not (name == "checkpoint" and value == LATEST):
            setattr(args, name, absolute(value))


def _absolute_config(config: Config, source: str = "command line") -> Config:
    """``config`` with the local paths of ``PATH_KEYS`` absolute, and the text tower's too where it is a
    local folder (not a hub name or a packaged model)."""
    values = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if isinstance(value, str) and value and not (key == "eval.checkpoint" and value == LATEST):
            values[key] = absolute(value)
    text = config.model.text.name_or_path
    if not text.startswith("pkg:") and os.path.isdir(os.path.expanduser(text)):
        values["model.text.name_or_path"] = absolute(text)
    return with_values(config, values, source)


def _load(args: argparse.Namespace, overrides: list[str] | None = None) -> Config:
    """The command's config (``--config`` and the overrides), its local paths absolute."""
    return _absolute_config(load_config(args.config, args.overrides if overrides is None else overrides))


def _say(args: argparse.Namespace, lines: list[str], result: dict) -> None:
    """A command's result: ``lines`` for a person; with ``--json`` also ``result`` as one line of JSON, the one
    thing on stdout (``main`` sends everything else to stderr then)."""
    import json

    print("\n".join(lines))
    if args.json:
        print(json.dumps(result, default=str), file=args.stdout, flush=True)


def _config_command(args: argparse.Namespace) -> int:
    if args.reference:
        print(config_reference(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _storage(config):
    from hlip_ray.storage import Storage

    return Storage.from_config(config.storage)


def _synth_command(args: argparse.Namespace) -> int:
    from hlip_ray.demo.synth import write_corpus

    config = _load(args)
    storage = _storage(config)
    out = args.out.rstrip("/")
    with storage.parallel_writer(out) as write:
        summary = write_corpus(write, studies=args.studies, seed=args.seed, size=args.size,
                               transfer_syntax=args.transfer_syntax, slices=args.slices, modality=args.modality)
    syntaxes = ", ".join(f"{count} {name}" for name, count in summary.syntaxes.items() if count)
    print(f"wrote {summary.studies} studies, {summary.scans} scans, {summary.files} files to {out} "
          f"({summary.bytes / 2**20:.0f} MiB; DICOM series: {syntaxes or 'none'})")
    return 0


def _manifest_command(args: argparse.Namespace) -> int:
    """``--archive folders``: a folder per study, hash split. ``--archive ct-rate``: CT-RATE's published layout,
    its own split and labels, and its 18-label vocabulary written beside the manifest."""
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.storage import is_s3, join

    config = _load(args)
    storage = _storage(config)
    vocabulary = None
    if args.archive == "ct-rate":
        from hlip_ray.data.ct_rate import build_ct_rate_manifest, vocabulary_json

        rows = build_ct_rate_manifest(args.root, storage, log=lambda line: print(line, file=sys.stderr, flush=True))
        folder = args.out.rsplit("/", 1)[0] if is_s3(args.out) else os.path.dirname(os.path.abspath(args.out))
        vocabulary = join(folder, "vocabulary.json")
    else:
        rows = build_manifest(args.root, storage, salt=config.data.split_salt, val_fraction=config.data.val_fraction)
    write_manifest(rows, args.out, storage)
    splits: dict[str, int] = {}
    for row in rows:
        splits[row.split] = splits.get(row.split, 0) + 1
    lines = [f"wrote {len(rows)} studies to {args.out}: {splits}"]
    if vocabulary:
        storage.write_bytes(vocabulary, vocabulary_json())
        lines.append(f"wrote the 18-label vocabulary to {vocabulary} (eval.vocabulary)")
    _say(args, lines, {"manifest": args.out, "studies": len(rows), "splits": splits, "vocabulary": vocabulary})
    return 0


def _preprocess_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.data.preprocess import summary_lines, write_shards
    from hlip_ray.data.quarantine import create_quarantine_log

    config = _load(args)
    storage = _storage(config)
    rows = read_manifest(args.manifest, storage, data_root=args.data_root)
    ray_runtime.connect()
    summary = write_shards(rows, config, storage, args.out, create_quarantine_log())
    _say(args, summary_lines(summary, args.out), summary)
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.sources import check_studies
    from hlip_ray.train.run import check_storage, fit, train_summary_lines

    config = _load(args)
    check_studies(config, _storage(config), "train")
    check_storage(config)   # train.storage_path reachable and writable, before Ray starts
    ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers))
    summary = fit(config, init_checkpoint=args.init_from)
    _say(args, train_summary_lines(summary), summary)
    return 0


def _tune_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.sources import check_studies
    from hlip_ray.tune.results import results_summary, summary_lines, write_results
    from hlip_ray.tune.space import load_space
    from hlip_ray.tune.sweep import run_sweep, sweep_config, sweep_dir

    config = _load(args)
    space = load_space(args.space)
    sweep_config(config, space)   # every point of the space checked before Ray starts
    check_studies(config, _storage(config), "train")
    # The trials' own output (Ray Train, Ray Data, DeepSpeed) stays in Ray's session logs: the console
    # gets one line per trial event.
    ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers), log_to_driver=False)
    grid, base = run_sweep(config, space, resume=args.resume)
    found = write_results(grid, base, space.keys, sweep_dir(base), _storage(config))
    _say(args, summary_lines(found, base, space.keys), results_summary(found, base))
    return 0


def _trained_model_config(args: argparse.Namespace, overrides: list[str]):
    """``(checkpoint, config, storage)`` of a command that uses a trained model: ``--checkpoint`` (else
    ``eval.checkpoint``); a run checkpoint brings its config (model, preprocessing, data, vocabulary) and
    ``overrides`` apply on top; studies are decoded at ``eval.grid`` where one is set."""
    from hlip_ray.config import apply_overrides
    from hlip_ray.inference.trained_model import inference_config
    from hlip_ray.run_checkpoint import is_run_checkpoint, read_config

    config = _load(args, overrides)
    checkpoint = args.checkpoint or config.eval.checkpoint
    if not checkpoint:
        raise ValueError("name a model: --checkpoint (a run checkpoint folder or URI, a run folder, latest, or an "
                         "HLIP model file)")
    storage = _storage(config)
    checkpoint = _latest_in(checkpoint, config, storage)
    if is_run_checkpoint(checkpoint, storage):
        config = _absolute_config(apply_overrides(read_config(checkpoint, storage), overrides, checkpoint))
    return checkpoint, inference_config(config), storage


def _latest_in(checkpoint: str, config: Config, storage) -> str:
    """``checkpoint`` as a command takes it: a run folder stands for its latest complete checkpoint, and
    ``latest`` for that of ``train.storage_path/train.run_name``; a checkpoint or a model file is itself."""
    from hlip_ray.run_checkpoint import is_run_checkpoint, latest_checkpoint
    from hlip_ray.storage import join

    run = join(config.train.storage_path, config.train.run_name) if checkpoint == LATEST else checkpoint
    if checkpoint != LATEST and is_run_checkpoint(checkpoint, storage):
        return checkpoint
    found = latest_checkpoint(run, storage)
    if found is None:
        if checkpoint == LATEST:
            raise FileNotFoundError(f"--checkpoint latest: no complete checkpoint under {run} "
                                    "(train.storage_path/train.run_name)")
        return checkpoint   # a model file, or nothing there: the model load says which
    print(f"--checkpoint {checkpoint}: the latest complete checkpoint, {found[0]} (step {found[1].step})",
          file=sys.stderr)
    return found[0]


def _manifest_overrides(manifest: str | None) -> list[str]:
    """``--manifest`` as overrides: the studies it lists, and not the shard cache a checkpoint's config names
    (what the command line says wins over what the checkpoint's config says)."""
    return [f"data.manifest={manifest}", "data.shards=null"] if manifest else []


def _eval_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.sources import check_studies
    from hlip_ray.eval.evaluate import evaluate_split
    from hlip_ray.eval.placement import actor_placement
    from hlip_ray.eval.report import markdown
    from hlip_ray.inference.trained_model import load_model

    checkpoint, config, storage = _trained_model_config(args, [*args.overrides, *_manifest_overrides(args.manifest)])
    check_studies(config, storage, args.split)
    ray_runtime.connect()
    actor_placement(config)   # eval.device=cuda on a cluster without a GPU fails before the model loads
    model, _ = load_model(checkpoint, storage, config)   # here on the CPU: the encoder actor runs it
    report = evaluate_split(model, config, split=args.split, checkpoint=checkpoint, out=args.out,
                            interpret=args.interpret)
    written = [f"wrote report.json, report.md and the ROC curves to {args.out}"] if args.out else []
    _say(args, [markdown(report), *written], report)
    return 0


def _embed_command(args: argparse.Namespace) -> int:
    from hlip_ray import ray_runtime
    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.inference.embed import embed_archive, summary_lines

    checkpoint, config, storage = _trained_model_config(args, [*args.overrides, *_manifest_overrides(args.manifest)])
    read_manifest(args.manifest, storage, data_root=args.data_root)   # an empty or broken one fails before Ray starts
    ray_runtime.connect()
    summary = embed_archive(args.manifest, checkpoint, config, storage, args.out, data_root=args.data_root)
    _say(args, summary_lines(summary), summary)
    return 0


def _predict_command(args: argparse.Namespace) -> int:
    """One local study, no Ray: decoded at eval.grid (else data.grid), scored for --labels on eval.device."""
    from hlip_ray.inference.predict import predict_lines, predict_study

    checkpoint, config, storage = _trained_model_config(args, args.overrides)
    result = predict_study(args.study, checkpoint, config, storage, args.labels, args.interpret)
    _say(args, predict_lines(result), result)
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from hlip_ray.inference.export import check_target, export_model
    from hlip_ray.inference.trained_model import load_model

    checkpoint, config, storage = _trained_model_config(args, args.overrides)
    check_target(args.format, args.out, storage, args.force)   # before the model load (seconds)
    model, _ = load_model(checkpoint, storage, config)   # on the CPU whatever eval.device: weights copied only
    for uri in export_model(model, config, args.format, args.out, storage, force=args.force):
        print(f"wrote {uri}")
    return 0


def _spot_watch_command(args: argparse.Namespace) -> int:
    """The Ray address is checked first (a wrong one: one line, exit 1, before any polling or drain); then
    ``--now`` drains at once, or the watcher polls until a reclaim notice and drains."""
    from hlip_ray import spot

    config = load_config(args.config, args.overrides).spot
    try:
        address = spot.check_ray_address(args.address)
        if args.now:
            spot.drain_node(config.now_deadline_s, "termination signal (preStop)", address=address,
                            node_id=args.node_id)
            print(f"spot-watch: node drained, {config.now_deadline_s} s announced", flush=True)
            return 0
        print(f"spot-watch: polling {config.imds_endpoint} every {config.poll_interval_s:g} s; a notice drains "
              f"through the Ray cluster at {address}", flush=True)
        spot.watch(config.imds_endpoint, config.poll_interval_s, address=address, node_id=args.node_id)
    except RuntimeError as error:   # no Ray cluster at the address, or the drain failed, timed out or was refused
        print(f"hlip-ray spot-watch: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from hlip_ray.demo import job

    try:
        job.main(args.rest)
    except ImportError as error:   # an extra not installed (moto: `pip install 'hlip-ray[demo]'`)
        print(f"hlip-ray demo: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


CHECKPOINT_HELP = ("the model: a run checkpoint (folder or URI), a run folder (its latest complete checkpoint), "
                   "latest (that of train.storage_path/train.run_name) or an HLIP model file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlip-ray", description="HLIP-style 3D medical CLIP on Ray.",
                                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"hlip-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="validate a config and print it with overrides applied")
    config.add_argument("--config", help="YAML config (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4")
    config.add_argument("--reference", action="store_true",
                        help="print the configuration reference (every key, type, default, description) as Markdown")
    config.set_defaults(run=_config_command)

    _add_data_commands(commands)
    _add_training_commands(commands)
    _add_model_commands(commands)

    watch = _with_config(commands.add_parser(
        "spot-watch", help="on a spot instance's reclaim notice, drain this Ray node (training checkpoints at once)"))
    watch.add_argument("--now", action="store_true",
                       help="drain at once (a Kubernetes preStop hook), announcing spot.now_deadline_s")
    watch.add_argument("--address", help="the Ray cluster's GCS address, HOST:PORT (default: RAY_ADDRESS, else the "
                                         "cluster `ray start` started on this machine); checked at start")
    watch.add_argument("--node-id", help="the Ray node to drain (default: this machine's)")
    watch.set_defaults(run=_spot_watch_command)

    demo = commands.add_parser("demo", help="run the embedded CPU demo (hlip-ray demo --help: its options)")
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="the demo's options and overrides")
    demo.set_defaults(run=_demo_command)
    return parser


def _with_config(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_argument("--config", help="YAML config (default: built-in defaults)")
    command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. storage.endpoint_url=...")
    return command


def _with_json(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_argument("--json", action="store_true",
                         help="print the result as one line of JSON on stdout, the only thing there: the summary a "
                              "person reads, progress and notes go to stderr")
    return command


def _add_data_commands(commands) -> None:
    """synth, manifest, preprocess: an archive (or a synthetic one) into a manifest and a shard cache."""
    synth = _with_config(commands.add_parser("synth", help="write a synthetic DICOM/NIfTI corpus"))
    synth.add_argument("--out", required=True, help="folder or s3://bucket/prefix the corpus is written to (a "
                                                    "folder per study: scans, report.txt, labels.json; "
                                                    "vocabulary.json at the top)")
    synth.add_argument("--studies", type=int, default=24, help="studies written (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of every random choice: the same seed writes the same corpus "
                            "(default: %(default)s)")
    synth.add_argument("--size", choices=["small", "medium", "real"], default="small",
                       help="(default: %(default)s) small, medium: toy grids (16-80 slices of 48-192 pixels); "
                            "real: as archives hold studies, CT one series of 300-600 slices at 512x512, "
                            "MR 4-10 series of 176-256 slices "
                            "at 256-512 pixels, DICOM in a mix of transfer syntaxes (0.1-1.3 GB a study uncompressed)")
    synth.add_argument("--transfer-syntax", choices=["explicit", "rle", "jpeg2000", "jpegls"],
                       help="every DICOM series in this one (all lossless; explicit: uncompressed), rather than "
                            "the size's mix")
    synth.add_argument("--slices", type=int, help="every scan's slice count, rather than the size's range")
    synth.add_argument("--modality", choices=["CT", "MR"], help="every study's modality, rather than half of each")
    synth.set_defaults(run=_synth_command)

    manifest = _with_config(commands.add_parser("manifest", help="build a manifest from a folder listing"))
    manifest.add_argument("--root", required=True, help="root/<study>/<scan>/... folder or s3:// prefix "
                                                        "(--archive ct-rate: the folder holding CT-RATE's dataset/)")
    manifest.add_argument("--archive", choices=["folders", "ct-rate"], default="folders",
                          help="how the archive under --root is organised (default: %(default)s). folders: a "
                               "folder per study, split by a salted hash of the patient; ct-rate: the public "
                               "CT-RATE benchmark's folders and tables, its split and 18 labels, and "
                               "vocabulary.json written beside --out")
    manifest.add_argument("--out", required=True, help="manifest .parquet or .jsonl (local or s3://)")
    manifest.set_defaults(run=_manifest_command)

    preprocess = _with_config(commands.add_parser("preprocess", help="decode a manifest into Parquet shards"))
    preprocess.add_argument("--manifest", required=True,
                            help="the studies to decode and preprocess (a manifest .parquet, .jsonl or HLIP "
                                 ".json; local or s3://)")
    preprocess.add_argument("--out", required=True,
                            help="folder or s3:// prefix for shards. Into a folder that holds shards already, "
                                 "preprocess resumes: studies written there are not decoded again, the others "
                                 "are added (an interrupted run is taken up); the preprocessing settings must "
                                 "match the folder's")
    preprocess.add_argument("--data-root", help="data root of an HLIP JSON manifest")
    preprocess.set_defaults(run=_preprocess_command)
    for command in (manifest, preprocess):
        _with_json(command)


def _add_training_commands(commands) -> None:
    """train, tune: a run, a sweep of runs."""
    train = _with_config(commands.add_parser("train", help="train (or resume) a run on Ray Train + DeepSpeed"))
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="initial weights (the run starts at step 0): a run checkpoint (folder or URI) or an HLIP "
                            "model file. A run resumes from its own checkpoints by itself (train.run_name)")
    train.set_defaults(run=_train_command)

    tune = _with_config(commands.add_parser("tune", help="sweep a space of configs with Ray Tune (ASHA)"))
    tune.add_argument("--space", required=True, help="a space YAML (tune_spaces/*.yaml)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted sweep named tune.name under tune.storage_path")
    tune.set_defaults(run=_tune_command)
    for command in (train, tune):
        _with_json(command)


def _add_model_commands(commands) -> None:
    """eval, embed, predict, export: what is done with a trained model."""
    evaluate = _with_config(commands.add_parser(
        "eval", help="a trained model on a split: zero-shot AUC with CIs, thresholds, linear probe, retrieval"))
    evaluate.add_argument("--checkpoint", help=CHECKPOINT_HELP + " (default: eval.checkpoint)")
    evaluate.add_argument("--split", default="val",
                          help="the manifest's split to evaluate, train, val or another the manifest names "
                               "(default: %(default)s)")
    evaluate.add_argument("--manifest", help="the studies' manifest (local or s3://): short for data.manifest=...")
    evaluate.add_argument("--out", help="folder or s3:// prefix for report.json, report.md and ROC curves (PNG)")
    evaluate.add_argument("--interpret", metavar="DIR",
                          help="also draw each study's relevance maps (PNG overlays on its most relevant slices), one "
                               "figure per study and label it is positive for, into DIR, a folder or s3:// prefix")
    evaluate.set_defaults(run=_eval_command)

    embed = _with_config(commands.add_parser(
        "embed", help="embed every study of a manifest with a trained model into Parquet files (resumable)"))
    embed.add_argument("--checkpoint", help=CHECKPOINT_HELP + " (default: eval.checkpoint)")
    embed.add_argument("--manifest", required=True, help="the studies to embed, every split (local or s3://)")
    embed.add_argument("--out", required=True,
                       help="folder or s3:// prefix for the embeddings (OUT/embeddings/*.parquet), the quarantine "
                            "and the summary. Into a folder that holds embeddings of the same checkpoint, embed "
                            "resumes: studies written there are not decoded again")
    embed.add_argument("--data-root", help="data root of an HLIP JSON manifest")
    embed.set_defaults(run=_embed_command)

    predict = commands.add_parser(
        "predict", help="zero-shot scores of one local study (a folder of DICOM series and/or NIfTI files)",
        description="hlip-ray predict --checkpoint C --labels 'mass,hemorrhage' STUDY_DIR eval.grid=[96,224,224]")
    predict.add_argument("study", metavar="STUDY_DIR", help="the study folder (local)")
    _with_config(predict)
    predict.add_argument("--checkpoint", help=CHECKPOINT_HELP + " (default: eval.checkpoint)")
    predict.add_argument("--labels", help="comma-separated labels to score (default: every label of eval.vocabulary)")
    predict.add_argument("--interpret", metavar="DIR",
                         help="also draw the study's relevance map for each label (PNG) into DIR, a folder or "
                              "s3:// prefix")
    predict.set_defaults(run=_predict_command)

    export = _with_config(commands.add_parser(
        "export", help="write a trained model in HLIP's released layout (open_clip), as .pt or safetensors"))
    export.add_argument("--checkpoint", help=CHECKPOINT_HELP + " (default: eval.checkpoint)")
    export.add_argument("--format", choices=["hlip", "safetensors"], required=True,
                        help="hlip: one torch file {'state_dict': ...} (--out FILE.pt); safetensors: a folder of "
                             "model.safetensors, config.yaml and open_clip_config.json (--out DIR)")
    export.add_argument("--out", required=True, help="the file or folder to write (local or s3://); never inside "
                                                     "a run checkpoint")
    export.add_argument("--force", action="store_true",
                        help="overwrite an existing --out file (or the exported files in an --out folder)")
    export.set_defaults(run=_export_command)
    for command in (evaluate, embed, predict):
        _with_json(command)


def _commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands


def cli_reference() -> str:
    """The command-line reference as Markdown, generated from the parser: one section per command, its usage
    and one table row per argument (its help, defaults filled in)."""
    parser = build_parser()
    commands = _commands(parser)
    summaries = {action.dest: action.help for action in commands._choices_actions}
    lines = ["# Command-line reference", "",
             "Generated from `hlip_ray/cli.py` when the guide is built: every command of `hlip-ray`, its arguments",
             "and what they mean, as `hlip-ray COMMAND --help` prints them. Options and `key.path=value` overrides",
             "may come in any order; [Configuration](../configuration.md) says what overrides do.", "",
             EXIT_CODES]
    for name, command in commands.choices.items():
        lines += ["", f"## `hlip-ray {name}`", "", summaries.get(name) or "", "", "```text",
                  command.format_usage().removeprefix("usage: ").strip(), "```", "",
                  "| argument | meaning |", "| --- | --- |"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(action.option_strings) or (action.metavar or action.dest)
            parts = [(action.help or "") % {**vars(action), "prog": command.prog}]
            if action.choices:
                parts.append(f"One of: {', '.join(map(str, action.choices))}")
            if action.required and action.option_strings:
                parts.append("Required")
            meaning = ". ".join(part.rstrip(".") for part in parts) + "."
            meaning = meaning.replace("|", "\\|").replace("<", "&lt;")   # a Markdown table cell
            lines.append(f"| `{names}` | {meaning} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, a command's options and overrides in any order (argparse's intermixed parsing:
    ``train --config C a=b --checkpoint X c=d``). ``demo`` passes what follows it to the demo as it is."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands(parser).choices
    if argv and argv[0] == "demo":   # the demo's own parser reads the rest (its --help too)
        return argparse.Namespace(command="demo", rest=argv[1:], run=_demo_command)
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)   # --version, --help or a usage error
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _absolute_arguments(args)
    args.stdout = sys.stdout   # with --json, the result's one line; all else goes to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr if getattr(args, "json", False) else sys.stdout):
            return args.run(args)
    except KeyboardInterrupt:
        print(f"hlip-ray {args.command}: stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"hlip-ray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:   # storage that failed after its retries: Storage's errors name the URI
        print(f"hlip-ray {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
