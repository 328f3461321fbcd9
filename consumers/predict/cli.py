"""`trainbus serve`, `trainbus predict` and `trainbus export`: thin entry points over the predictor.

trainbus serve --run RUN [--alias A] [--step S | --checkpoint PATH] [--force]
trainbus predict --alias A "some text" …           # or - to read lines from stdin; --json
trainbus export --run RUN [--step S] --merge OUT   # merged model for plain transformers

torch and the model code are imported inside the commands, so `trainbus --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import nats.js.errors
from pydantic import ValidationError

from consumers.predict.client import NoService, ServedAlias, predict, served_aliases
from consumers.predict.config import PredictSettings, ServeConfig, default_config
from runtime.bus.connect import BusTarget, bus_target, connect
from runtime.cli.args import add_settings_args, run_id_arg
from runtime.cli.render import table
from runtime.errors import BusUnavailable, ConfigError, TrainbusError
from runtime.logs import setup_logging
from runtime.settings import describe_validation_error, load_config, packaged, parse_override
from schemas.predict import Answer, MetadataValue


def _settings(args: argparse.Namespace) -> PredictSettings:
    settings = load_config(PredictSettings, args.config, args.overrides)
    setup_logging(settings.log.level, settings.log.format)
    return settings


# ---- serve -------------------------------------------------------------------------------


def register_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a run's audit-approved checkpoint on trainbus.predict.<alias>")
    p.add_argument("--run", type=run_id_arg, help="run to serve (default: serve.run of --config)")
    p.add_argument("--alias", type=run_id_arg, help="name on the bus (default: the run id)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="serve this step's checkpoint instead of following the best one")
    which.add_argument("--checkpoint", metavar="PATH", help="serve this checkpoint folder instead of the best one")
    p.add_argument("--force", action="store_true", help="serve a checkpoint the audit gate rejected or has not judged")
    p.add_argument("--labels", metavar="YAML", type=packaged, help="label set (default: the run's data.labels_file)")
    p.add_argument("--max-batch", type=int, help="most texts per model call (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="longest a request waits for others to join its batch")
    p.add_argument("--threads", type=int, help="torch threads for the model")
    add_settings_args(p, "predictor settings YAML (serve section, bus, log), e.g. configs/predict.yaml")
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace, settings: PredictSettings) -> ServeConfig:
    """The config's ``serve`` section with the command line's flags on top."""
    flags = {
        "run": args.run,
        "alias": args.alias,
        "labels_file": args.labels,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
    }
    merged = {**settings.serve.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "serve (flags over --config)")) from None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    config = serve_config(args, settings)
    run = config.run
    if run is None:
        raise ConfigError("--run: which run to serve? (or set serve.run in --config)")
    from consumers.predict.checkpoints import choose

    alias = config.alias or run

    async def go(where: BusTarget) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        nc = await connect(where, settings, name=f"trainbus-serve-{alias}")
        try:
            chosen = None
            if args.step is not None or args.checkpoint is not None:  # refused before the model code loads
                chosen = await choose(nc.jetstream(), run, step=args.step, path=args.checkpoint, force=args.force)
            import torch

            from consumers.predict.quiet import quiet_loading
            from consumers.predict.service import Target, serve

            quiet_loading()

            if config.threads:
                torch.set_num_threads(config.threads)
            target = Target(run, alias, args.force)
            predictor = await serve(nc, target, config, stop=stop, chosen=chosen)
        finally:
            if not nc.is_closed:
                await nc.drain()
        s = predictor.batcher.stats
        print(
            f"trainbus serve: stopped; {s.items} texts in {s.batches} batches (largest {s.largest}), "
            f"{predictor.failed} failed, {predictor.loads} loads",
            flush=True,
        )
        return 0

    with bus_target(settings) as where:
        return asyncio.run(go(where))


def service() -> list[str]:
    """`trainbus up` runs the predictor when configs/predict.yaml names a run (else nothing)."""
    path = default_config()
    if path is None:
        return []
    try:
        named = load_config(PredictSettings, path).serve.run is not None
    except TrainbusError:
        named = True  # let `trainbus serve` say what is wrong with the file
    return [sys.executable, "-m", "runtime.cli", "serve", "--config", str(path.resolve())] if named else []


# ---- predict -----------------------------------------------------------------------------


def register_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="ask the predictor serving an alias (trainbus serve) to classify texts")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify; - reads one text per line from stdin")
    p.add_argument("--alias", type=run_id_arg, help="which served model (see --list)")
    p.add_argument("--list", action="store_true", help="list the aliases being served and their replicas")
    p.add_argument("--json", action="store_true", help="one JSON answer per line")
    p.add_argument("--no-rationale", action="store_true", help="skip the rationale (faster)")
    p.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="prompt metadata, e.g. channel=chat"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")
    add_settings_args(p)
    p.set_defaults(func=cmd_predict)


def _texts(args: argparse.Namespace) -> list[str]:
    texts: list[str] = []
    for item in args.texts:
        texts += [line for line in sys.stdin.read().splitlines() if line.strip()] if item == "-" else [item]
    if not texts:
        raise ConfigError("no text to classify (give TEXT arguments, or - to read lines from stdin)")
    return texts


def _metadata(items: list[str]) -> dict[str, MetadataValue]:
    out: dict[str, MetadataValue] = {}
    for item in items:
        path, value = parse_override(item)
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"--metadata {item!r}: the value must be a string, number or boolean")
        out[".".join(path)] = value
    return out


def answer_row(text: str, answer: Answer) -> dict[str, Any]:
    """One table row: the text, the decision (or abstain), its probability, the checkpoint step, the rationale."""
    top = max((p, name) for name, p in answer.probabilities.items() if name != "null")
    return {
        "text": text if len(text) <= 40 else text[:39] + "…",
        "decision": answer.decision or "abstain",
        "p": top[0],
        "step": answer.checkpoint.step,
        "rationale": answer.rationale or "",
    }


def cmd_predict(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not args.list and args.alias is None:
        raise ConfigError("--alias: which served model? (trainbus predict --list shows them)")
    texts = [] if args.list else _texts(args)
    metadata = _metadata(args.metadata)
    denied: list[str] = []

    async def go(where: BusTarget) -> list[ServedAlias] | list[Answer]:
        nc = await connect(where, settings, name="trainbus-predict", on_permission_error=denied.append)
        try:
            if args.list:
                return await served_aliases(nc, wait=min(args.timeout, 2.0))
            return await predict(
                nc, args.alias, texts, metadata=metadata, rationale=not args.no_rationale, timeout=args.timeout
            )
        except NoService:
            if denied:
                raise BusUnavailable(f"the server denied this user: {denied[0].strip(chr(39))}") from None
            raise
        finally:
            await nc.close()

    with bus_target(settings) as where:
        result = asyncio.run(go(where))
    if args.list:
        return _print_aliases([r for r in result if isinstance(r, ServedAlias)], args.json)
    answers = [r for r in result if isinstance(r, Answer)]
    if args.json:
        for text, answer in zip(texts, answers, strict=True):
            print(json.dumps({"text": text, **answer.model_dump(mode="json")}))
    else:
        print(
            table(
                [answer_row(t, a) for t, a in zip(texts, answers, strict=True)],
                ["text", "decision", "p", "step", "rationale"],
            )
        )
    return 0


def _print_aliases(aliases: list[ServedAlias], as_json: bool) -> int:
    if as_json:
        for a in aliases:
            print(json.dumps(a.__dict__))
    elif not aliases:
        print("no predictor is serving (start one with `trainbus serve --run RUN`)")
    else:
        rows = [
            {
                "alias": a.alias,
                "run": a.run_id,
                "replicas": len(a.replicas),
                "steps": ",".join(map(str, sorted(set(a.steps)))),
                "subject": a.subject,
            }
            for a in aliases
        ]
        print(table(rows, ["alias", "run", "replicas", "steps", "subject"]))
    return 0


# ---- export ------------------------------------------------------------------------------


def register_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write a checkpoint merged into its base model, for plain transformers")
    p.add_argument("--run", required=True, type=run_id_arg, help="run id")
    p.add_argument("--step", type=int, help="checkpoint step (default: the run's best approved checkpoint)")
    p.add_argument("--merge", required=True, type=Path, metavar="OUT", help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="export a checkpoint the audit gate rejected or has not judged")
    p.add_argument("--labels", metavar="YAML", type=packaged, help="label set (default: the run's data.labels_file)")
    add_settings_args(p)
    p.set_defaults(func=cmd_export)


def check_output(out: Path) -> None:
    """Refuse an output folder that already holds something (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--merge {out}: already exists and is not an empty folder")


def cmd_export(args: argparse.Namespace) -> int:
    settings = _settings(args)
    check_output(args.merge)
    from consumers.predict.checkpoints import Chosen, best_key, choose, localize, open_bucket, parse_best, verify

    async def pick(where: BusTarget) -> Chosen:
        nc = await connect(where, settings, name="trainbus-export")
        try:
            js = nc.jetstream()
            if args.step is not None:
                return await localize(js, await choose(js, args.run, step=args.step, force=args.force))
            bucket = await open_bucket(js)
            best = None
            if bucket is not None:
                try:
                    best = parse_best((await bucket.get(best_key(args.run))).value)
                except nats.js.errors.NotFoundError:  # no such key: nothing of the run was approved
                    best = None
            if best is None:
                raise ConfigError(f"run {args.run} has no best approved checkpoint; name one with --step")
            return await localize(js, await choose(js, args.run, best=best, force=args.force))
        finally:
            await nc.close()

    with bus_target(settings) as where:
        chosen = asyncio.run(pick(where))  # refused before the model code loads
    verify(chosen)
    from consumers.predict.export import export_merged
    from consumers.predict.quiet import quiet_loading, say_loading
    from consumers.predict.serving import load_served

    quiet_loading()
    say_loading("export", chosen)
    export_merged(load_served(chosen, labels_file=args.labels), args.merge)
    print(f"trainbus export: run {chosen.run_id} step {chosen.step} ({chosen.verdict}) merged into {args.merge}")
    return 0
