"""`mfiba`: one subcommand per pipeline stage.

Every stage takes --preset and --set field.path=value overrides; the configuration is
validated before any work starts. When PREFECT_API_URL is not set, one local Prefect
server (127.0.0.1, embedded SQLite under .state/) serves the run and every Dask worker,
and is stopped afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mfiba.config import ConfigError, list_presets, load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help=f"named preset ({', '.join(list_presets())}) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a configuration field, e.g. --set data.test_count=50 (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override `device`")
    p.add_argument("--scheduler-address", help="external Dask scheduler (else a LocalCluster)")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (dask.n_workers)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="torchvision models without COCO weights: random init, for smoke tests only")
    p.add_argument("--smoke", action="store_true",
                   help="smoke test on the COCO val2017 sample beside the project: 2 calibration + 2 test images, "
                        "m = 2, two rate points, uniform and MFIBA, AVIF; labelled in every report")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mfiba", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("config", help="print the resolved configuration of a preset")
    _common(p)

    p = sub.add_parser("data", help="render the synthetic splits (COCO format) or check the COCO paths")
    _common(p)

    p = sub.add_parser("features", help="feature-dataset stage: images -> FPN features -> zarr store")
    _common(p)
    p.add_argument("--store", help="store path or fsspec URL (features.store)")
    p.add_argument("--splits", nargs="+", choices=["train", "calib", "test"], help="features.splits")
    p.add_argument("--images", nargs="+", type=int, metavar="ID",
                   help="explicit image ids (applied to every selected split)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store made with other weights or data")

    p = sub.add_parser("train-task-model", help="train (or resume) the demo multi-task model, then evaluate it")
    _common(p)
    p.add_argument("--iterations", type=int, help="train_task_model.iterations")
    p.add_argument("--time-budget-s", type=float, help="stop after this long (resumable)")
    p.add_argument("--init-from", help="start from an earlier checkpoint's weights with a fresh schedule")
    p.add_argument("--evaluate-only", metavar="CHECKPOINT",
                   help="skip training: write metrics and sensitivity for this checkpoint")
    p.add_argument("--out", help="folder for metrics.json and sensitivity.csv (default: the work dir)")
    p.add_argument("--sensitivity-images", type=int, default=400, help="test images for the sensitivity table")

    p = sub.add_parser("train-codec", help="train (or resume) the configured learned codecs on feature mosaics")
    _common(p)
    p.add_argument("--time-budget-s", type=float, help="stop after this long (resumable)")
    p.add_argument("--only", action="append", metavar="LABEL",
                   help="train only this codec label ('main' or a key of codecs.others); repeatable")

    p = sub.add_parser("codec-report", help="code stored test features with every configured codec and measure")
    _common(p)
    p.add_argument("--images", type=int, default=8, help="test images to code")
    p = sub.add_parser("precode", help="multi-pass precoding of stored features (MFIP input), on Dask")
    _common(p)
    p.add_argument("--splits", nargs="+", choices=["train", "calib", "test"], help="precode.splits")
    p.add_argument("--images", nargs="+", type=int, metavar="ID", help="explicit image ids (one split)")
    p.add_argument("--overwrite", action="store_true", help="recompute a table made with another codec or settings")

    p = sub.add_parser("fit", help="fit the loss-rate and rate-phi models on the calibration split; fit report")
    _common(p)

    p = sub.add_parser("tune", help="calibration-split searches: finetuned MFIBA, SABA, lambda' grid")
    _common(p)

    p = sub.add_parser("run", help="the whole method: features, precode, fit, tune (when needed), evaluate, report")
    _common(p)

    p = sub.add_parser("status", help="per stage: done, partial, stale or missing for this configuration")
    _common(p)

    p = sub.add_parser("serve", help="local Prefect server, the mfiba-local work pool with a worker, every "
                                     "deployment registered (until Ctrl-C)")
    p = sub.add_parser("trigger", help="run a served deployment (e.g. pipeline/demo) and wait for it")
    p.add_argument("deployment", help="flow/deployment, e.g. pipeline/demo, evaluate/demo-nightly")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="configuration overrides passed to the run (repeatable)")
    p.add_argument("--timeout-s", type=float, default=3600)

    p = sub.add_parser("evaluate", help="online evaluation on test images: allocation, real bitstreams, COCO mAP, "
                                        "BD-rate report")
    _common(p)
    p.add_argument("--methods", nargs="+", help="evaluate.methods (uniform, mfiba, mfiba-finetuned, static, saba, oracle)")
    p.add_argument("--images", type=int, help="evaluate.images: the first N test images (0: all)")
    p.add_argument("--rates", nargs="+", type=int, metavar="INDEX",
                   help="rate points as indices into codecs.main.phis (tune.rate_points)")
    return ap


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    if args.device:
        out.append(f"device={args.device}")
    if args.scheduler_address:
        out.append(f"dask.scheduler_address={args.scheduler_address}")
    if args.workers:
        out.append(f"dask.n_workers={args.workers}")
    if getattr(args, "store", None):
        out.append(f"features.store={args.store}")
    if getattr(args, "splits", None):
        section = "precode" if args.command == "precode" else "features"
        out.append(f"{section}.splits={json.dumps(args.splits)}")
    if getattr(args, "allow_random_weights", False):
        out.append("task_model.allow_random_weights=true")
    if getattr(args, "methods", None):
        out.append(f"evaluate.methods={json.dumps(args.methods)}")
    if getattr(args, "rates", None):
        out.append(f"tune.rate_points={json.dumps(args.rates)}")
    if args.command == "evaluate" and args.images is not None:
        out.append(f"evaluate.images={args.images}")
    if getattr(args, "iterations", None):
        out.append(f"train_task_model.iterations={args.iterations}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # stdout piped into a reader that stopped early (`mfiba config | head`): no traceback,
        # and no second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so the local Prefect server, the
    # worker and the Dask cluster this run started are stopped instead of orphaned.
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command in ("serve", "trigger"):
        from mfiba.runtime import setup_local_state

        setup_local_state()
        from deployments.serve import NoServedServerError, serve, trigger

        if args.command == "serve":
            return serve()
        try:
            result = trigger(args.deployment, {"overrides": args.overrides} if args.overrides else None,
                             timeout_s=args.timeout_s)
        except NoServedServerError as e:
            print(f"mfiba: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2))
        return 0 if result["state"] == "COMPLETED" else 1
    try:
        # config and status show every stage, so every stage's cross-references are checked
        stages = None if args.command in ("config", "status") else [args.command]
        cfg = load_config(args.preset, _overrides(args), smoke=args.smoke, stages=stages)
        if args.command in ("features", "precode") and args.images:
            splits = cfg.features.splits if args.command == "features" else cfg.precode.splits
            if len(splits) != 1:
                raise ConfigError(f"--images needs exactly one split (--splits), got {splits}: "
                                  "image ids differ per split")
            cfg.data.image_ids = {splits[0]: list(args.images)}
    except ConfigError as e:
        print(f"mfiba: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    # Local state before anything imports prefect (it fixes PREFECT_HOME at import).
    from mfiba.runtime import LocalPrefectServer, setup_local_state

    setup_local_state()
    from storage.feature_store import InsufficientDiskError
    from tasks.datasets.coco import DatasetError
    from tasks.models.registry import WeightsNotFoundError

    try:
        if args.command == "status":  # reads only: no server, no cluster
            from flows.status import stage_status

            rows = stage_status(cfg)
            width = max(len(r["stage"]) for r in rows)
            for r in rows:
                print(f"{r['stage']:<{width}}  {r['state']:<10}  {r['detail']}")
            return 0
        if args.command == "data":
            from tasks.datasets.sources import image_refs

            refs = image_refs(cfg, ["train", "calib", "test"])
            print(json.dumps({k: len(v) for k, v in refs.items()}))
            return 0
        if args.command in ("run", "features", "precode", "evaluate"):
            # Fail at once, before any server or cluster starts, when the task model's weights
            # are missing (the message names the file and where to put it).
            from tasks.models.registry import build_task_model

            ckpt = cfg.task_model.checkpoint
            build_task_model(cfg.task_model.name, str(cfg.resolve_path(ckpt)) if ckpt else None,
                             cfg.task_model.allow_random_weights)
        from flows.common import hold_output_locks

        # The stage's output locks before the server starts, so that a run refused because
        # another holds them is refused at once (the stage takes them again: locks nest).
        with hold_output_locks(cfg, args.command), LocalPrefectServer() as server:
            print(f"Prefect UI for this run: {server.ui_url}", file=sys.stderr)
            if args.command == "features":
                from flows.features import run_features

                summary = run_features(cfg, overwrite=args.overwrite)
                print(json.dumps({k: v for k, v in summary.items() if k != "skipped_reasons"}))
            elif args.command == "train-task-model":
                from flows.train_task_model import run_train_task_model

                result = run_train_task_model(cfg, time_budget_s=args.time_budget_s, init_from=args.init_from,
                                              evaluate_only=args.evaluate_only, out=args.out,
                                              sensitivity_images=args.sensitivity_images)
                print(json.dumps(result, indent=2))
            elif args.command == "train-codec":
                from flows.train_codec import run_train_codec

                result = run_train_codec(cfg, time_budget_s=args.time_budget_s, only=args.only)
                print(json.dumps(result, indent=2, default=str))
            elif args.command == "precode":
                from flows.precode import run_precode

                print(json.dumps(run_precode(cfg, overwrite=args.overwrite), indent=2))
            elif args.command == "fit":
                from flows.fit import run_fit

                print(json.dumps(run_fit(cfg), indent=2, default=str))
            elif args.command == "tune":
                from flows.tune import run_tune

                print(json.dumps(run_tune(cfg), indent=2, default=str))
            elif args.command == "run":
                from flows.pipeline import run_pipeline

                result = run_pipeline(cfg)
                print(json.dumps(result["evaluate"], indent=2, default=str))
            elif args.command == "evaluate":
                from flows.evaluate import run_evaluate

                print(json.dumps(run_evaluate(cfg), indent=2, default=str))
            elif args.command == "codec-report":
                from flows.codec_report import run_codec_report

                print(run_codec_report(cfg, images=args.images))
        return 0
    except (DatasetError, WeightsNotFoundError, InsufficientDiskError, ConfigError) as e:
        print(f"mfiba: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # flows re-raise task failures; name the stage and keep it short
        from flows.features import StaleStoreError
        from flows.train_codec import TrainCodecError
        from flows.fit import FitStageError
        from storage.locks import OutputLockedError
        from storage.results import StaleTableError
        from storage.urls import WriteFailedError

        if isinstance(e, (StaleStoreError, TrainCodecError, StaleTableError, FitStageError, OutputLockedError)):
            print(f"mfiba: {e}", file=sys.stderr)
            return 2
        if isinstance(e, WriteFailedError):  # a full disk: what was being written, and where
            print(f"mfiba: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
