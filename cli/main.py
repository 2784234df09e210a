"""`tf-emnist`: parse, dispatch, and turn expected failures into one-line errors."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import numpy as np

from tf_emnist.config import BACKENDS, FIELDS, TrainConfig, coerce
from tf_emnist.tasks import resolve_config

# Exit codes: 1 some inputs were skipped (the rest answered), 2 bad input or settings, 3 bad data,
# 4 the file system refused (permissions, a full disk), 130 interrupted (rerun to resume).
EXIT_PARTIAL, EXIT_ERROR, EXIT_DATA, EXIT_IO, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(name: str):
    def parse(text: str):
        try:
            return coerce(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = FIELDS[name].type.split(" |")[0]
    return parse


def _in_range(kind, low, high):
    """An argparse type: a number of `kind` (int or float) from low to high; NaN and infinities refused."""
    words = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected {words} from {low} to {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_path(text: str) -> str:
    """A model path; a folder of numbered versions (saved_models/merged) means its newest."""
    from tf_emnist.sources import newest_version

    return newest_version(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`hidden_dim` -> `--hidden-dim`), unset unless given."""
    from tf_emnist.tasks import PRESETS, TASKS

    parser.add_argument("--task", choices=list(TASKS), default=argparse.SUPPRESS,
                        help="what to classify (default: the --config file's, else merged)")
    parser.add_argument("--preset", choices=list(PRESETS), default="study",
                        help="the settings to start from: the study's, or the best measured here (default: study)")
    group = parser.add_argument_group("settings (each defaults to the task's preset)")
    for name, field in FIELDS.items():
        if name == "task":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata["help"]
        if field.type.startswith("bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=_typed(name), default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


TUNE_EPOCHS, TUNE_PATIENCE = 3, 2  # tune's short trials, unless --epochs / --patience say otherwise


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings from the parsed flags (see tf_emnist.tasks.resolve_config); the backend is the
    one this process runs (`choose_backend`)."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if getattr(args, "chosen_backend", None):
        given["backend"] = args.chosen_backend
    config = resolve_config(given, getattr(args, "config", None), args.preset)
    if config.teacher:  # recorded as the versions it names now
        config = config.replace(teacher=",".join(_model_path(p) for p in config.teacher.split(",")))
    return config


def cmd_train(args) -> int:
    from tf_emnist.backend import Cluster
    from tf_emnist.runs import default_run_dir
    from tf_emnist.training import train, train_and_evaluate

    config = config_from_args(args)
    cluster = Cluster.from_settings(args.coordinator, args.num_processes, args.process_id)
    run_dir = args.output or default_run_dir(config)
    if not args.evaluate:  # choosing settings: validation only, the test split stays unseen
        state = train(config, run_dir, cluster=cluster)
        if state["best_val_accuracy"] is None:  # a refit: no validation images
            print(f"{config.task}: trained {state['best_epoch']} epochs on all {state['train_examples']} train images, "
                  f"{state['train_seconds'] / 60:.1f} min; evaluate later with `tf-emnist evaluate {run_dir}`")
        else:
            print(f"{config.task}: best validation accuracy {state['best_val_accuracy']:.4%} (epoch "
                  f"{state['best_epoch']}), {state['train_seconds'] / 60:.1f} min; evaluate later with "
                  f"`tf-emnist evaluate {run_dir}`")
        return 0
    metrics = train_and_evaluate(config, run_dir, cluster=cluster)
    _print_summary(metrics, run_dir)
    return 0


def cmd_evaluate(args) -> int:
    from tf_emnist.evaluate import evaluate_runs

    metrics = evaluate_runs(args.run_dirs, split=args.split, output=args.output,
                            limit_test=args.limit_test, data_dir=args.data_dir,
                            tta=args.tta, tta_strength=args.tta_strength, allow_unfinished=args.allow_unfinished)
    out_dir = args.output or args.run_dirs[0]
    if args.split == "validation":
        print(f"{metrics['task']}: validation accuracy {metrics['validation_accuracy']:.4%} "
              f"({metrics['validation_examples'] - metrics['validation_errors']}/{metrics['validation_examples']})"
              f"; written to {os.path.join(out_dir, 'validation_metrics.json')}")
        return 0
    _print_summary(metrics, out_dir)
    return 0


def _print_summary(metrics: dict, run_dir: str) -> None:
    print(f"{metrics['task']}: test accuracy {metrics['test_accuracy']:.4%} "
          f"({metrics['test_examples'] - metrics['test_errors']}/{metrics['test_examples']}), "
          f"test loss {metrics['test_loss']:.4f}")
    if "digit_letter_accuracy" in metrics:
        print(f"  collapsed to digit/letter: {metrics['digit_letter_accuracy']:.4%}")
    if metrics.get("train_seconds") and metrics.get("best_val_accuracy") is not None:
        print(f"  training time {metrics['train_seconds'] / 60:.1f} min, best validation accuracy "
              f"{metrics['best_val_accuracy']:.4%} (epoch {metrics['best_epoch']})")
    elif metrics.get("train_seconds"):
        print(f"  training time {metrics['train_seconds'] / 60:.1f} min, {metrics['best_epoch']} epochs on all train images")
    print("  top confusions (true -> predicted: count): " +
          ", ".join(f"{t}->{p}: {n}" for t, p, n in metrics["top_confusions"][:5]))
    print(f"  outputs in {run_dir}")


def cmd_tune(args) -> int:
    from tf_emnist.config import HYPERPARAMETERS
    from tf_emnist.tuning.search import run_search, set_distributed_env
    from tf_emnist.tuning.space import parse_override, read_space_file, resolve_space

    overrides = read_space_file(args.space_file) if args.space_file else {}
    overrides.update(parse_override(text) for text in args.space)
    base = config_from_args(args)
    # A hyperparameter given as a flag (e.g. --hidden-dim 128) is pinned, not searched.
    fixed = {name: getattr(base, name) for name in HYPERPARAMETERS if hasattr(args, name)}
    space = resolve_space(overrides, fixed)
    set_distributed_env(args.distributed, args.oracle_host, args.oracle_port, args.worker_id, args.connect_timeout)
    output = args.output or os.path.join("runs", f"tune-{base.task}-{args.tuner}")
    # The run's own names: --epochs bounds a trial (default 3 here, short trials), --patience
    # stops it early (default 2 here).
    epochs = base.epochs if hasattr(args, "epochs") else TUNE_EPOCHS
    patience = base.patience if hasattr(args, "patience") else TUNE_PATIENCE
    best = run_search(base, space, tuner_kind=args.tuner, max_trials=args.max_trials, max_epochs=epochs,
                      output=output, overwrite=args.overwrite, patience=patience)
    if best is not None:
        print(f"best configuration: {os.path.join(output, 'best_config.json')}\n"
              f"train it: tf-emnist train --config {os.path.join(output, 'best_config.json')}")
    return 0


def cmd_export(args) -> int:
    from tf_emnist.export import export_model

    path = export_model(args.sources, args.output, version=args.version, force=args.force, require_xla=args.require_xla,
                        format=args.format, quantize=args.quantize)
    print(path)
    return 0


def cmd_predict(args) -> int:
    from tf_emnist.predict import ImageError, Predictor, describe, read_inputs

    predictor = Predictor(args.model)
    results, failed = [], 0
    for path in args.inputs:
        try:
            characters = read_inputs(path, segment=args.segment)
        except ImageError as e:
            print(f"{args.prog}: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        top = predictor.top_k(np.stack([c.image for c in characters]), args.top_k)
        if path.endswith(".npy"):  # one answer per array
            answers = [describe(f"{path}[{i}]" if len(top) > 1 else path, [c], [t], False)
                       for i, (c, t) in enumerate(zip(characters, top))]
        else:
            answers = [describe(path, characters, top, args.segment)]
        results += answers
        if not args.json:
            for answer in answers:
                print(_predict_line(answer))
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_PARTIAL if failed else 0


def _predict_line(answer: dict) -> str:
    def ranked(top):
        return "  ".join(f"{t['character']} {t['probability']:.1%}" for t in top)

    if "text" in answer:
        return f"{answer['input']}: {answer['text']!r}  (" + " | ".join(ranked(c["top"]) for c in answer["characters"]) + ")"
    return f"{answer['input']}: {ranked(answer['top'])}"


def cmd_serve(args) -> int:
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"serving needs the serve extra ({', '.join(missing)} missing); pip install 'tf-emnist[serve]'")
    from tf_emnist.serve import serve

    serve(args.model, host=args.host, port=args.port, model_name=args.model_name,
          max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms, xla=args.xla)
    return 0


def cmd_bench(args) -> int:
    from tf_emnist.bench import format_table, run_benchmark
    from tf_emnist.files import write_json

    results = run_benchmark(args.tasks, steps=args.steps, rounds=args.rounds, baseline=args.baseline,
                            memory=args.memory, jit_compile=args.jit_compile, bf16_gradients=args.bf16_gradients,
                            lstm_kernel=args.lstm_kernel, backends=tuple(dict.fromkeys(["tensorflow", *args.backend])))
    print(format_table(results))
    if args.output:
        write_json(args.output, results)
        print(f"figures written to {args.output}")
    return 0


def cmd_tasks(args) -> int:
    from tf_emnist.tasks import TASKS

    def describe(p) -> str:
        levers = [f"{name} {getattr(p, name)}" for name in ("augment", "label_smoothing", "ema", "fine_labels", "patience")
                  if getattr(p, name)] + ([f"{p.lr_schedule} lr"] if p.lr_schedule != "constant" else [])
        kind = "BiLSTM" if p.bidirectional else "LSTM"
        return ", ".join([f"{p.num_layers} x {p.hidden_dim} {kind}", f"{p.epochs} epochs", *levers])

    for task in TASKS.values():
        head = f"{task.name:13} {task.tfds_name:16} {task.num_classes:3} classes  "
        print(f"{head}study: {describe(task.preset)}")
        if task.best is not None:
            print(f"{'':{len(head)}}best:  {describe(task.best)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tf_emnist.version import __version__

    parser = Parser(prog="tf-emnist", description="Stacked-LSTM handwritten character recognition on EMNIST.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results (--log-level warning)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="the detail of tf-emnist's own log lines (default info)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    _add_train(sub)
    _add_evaluate(sub)
    _add_tune(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_tasks(sub)
    return parser


def _add_train(sub) -> None:
    """train: one flag per TrainConfig field, and where the run goes."""
    train = sub.add_parser("train", help="train a task, then evaluate it on the test split",
                           description="Train, validate each epoch, evaluate the best model on the test split. "
                                       "Rerunning the same command resumes an interrupted run.")
    train.add_argument("--config", metavar="JSON", help="settings file (e.g. a tune run's best_config.json); flags override it")
    train.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                       help="evaluate on the test split after training (--no-evaluate: validation only)")
    train.add_argument("--output", metavar="DIR", help="run directory (default: runs/<task>-<timestamp>, "
                                                       "or the unfinished run of the same settings)")
    cluster = train.add_argument_group(
        "several processes or machines (JAX; each flag defaults to Keras's KERAS_DISTRIBUTION_* variable)")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    cluster.add_argument("--num-processes", type=_in_range(int, 1, 100_000), metavar="N",
                         help="how many processes train the run")
    cluster.add_argument("--process-id", type=_in_range(int, 0, 99_999), metavar="I",
                         help="this process's number, 0 to N-1 (0 writes the run)")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    """evaluate: runs, exports, ensembles, splits."""
    from tf_emnist.evaluate import TTA_STRENGTH

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a run's model, an export, or an ensemble of them on the test split",
        description="One run directory: its model. Several: their ensemble, the average of their probabilities. "
                    "Choose an ensemble on --split validation first, then evaluate it on the test split once.")
    evaluate.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=_model_path,
                          help="run directories or exports (SavedModel or TFLite) from `tf-emnist export`; several: their ensemble")
    evaluate.add_argument("--split", choices=["test", "validation"], default="test",
                          help="test (default), or the validation images the runs held out of train")
    evaluate.add_argument("--output", help="where the metrics go (required for several runs, an export or --tta)")
    evaluate.add_argument("--tta", type=_in_range(int, 1, 64), default=1, metavar="VIEWS",
                          help="test-time augmentation: average the image and VIEWS-1 randomly transformed copies "
                               "(default 1: off; choose it on --split validation)")
    evaluate.add_argument("--tta-strength", type=_in_range(float, 0, 5), default=TTA_STRENGTH,
                          help="strength of the copies' random affine transform, as train's --augment (default %(default)s)")
    evaluate.add_argument("--data-dir", help="read the test split from this NIST folder instead of the run's source")
    evaluate.add_argument("--limit-test", type=_typed("limit_test"), help="evaluate on the first N test images")
    evaluate.add_argument("--allow-unfinished", action="store_true",
                          help="evaluate a run whose training was interrupted (its best epoch so far; needs --output)")
    evaluate.add_argument("--backend", choices=BACKENDS,
                          help="Keras backend that runs run directories' models (default: KERAS_BACKEND, else "
                               "tensorflow; exports need tensorflow)")
    evaluate.set_defaults(func=cmd_evaluate)


def _add_tune(sub) -> None:
    """tune: the search, its space and distributed roles."""
    tune = sub.add_parser("tune", help="search hyperparameters with keras-tuner (validation split only)",
                          description="Rerunning the same command resumes the search; --overwrite starts over. "
                                      "Flags for hyperparameters pin them; --space narrows the rest. "
                                      f"--epochs is a trial's maximum (default {TUNE_EPOCHS} here) and --patience "
                                      f"stops a trial early (default {TUNE_PATIENCE} here).")
    tune.add_argument("--tuner", default="random", help="random, bayesian or hyperband (default random)")
    tune.add_argument("--max-trials", type=_positive_int, default=10, help="trials for random/bayesian (default 10)")
    tune.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                      help="narrow the space: name=value (fixed), name=min:max, name=a,b,c; repeatable")
    tune.add_argument("--space-file", metavar="JSON", help="search space overrides as a JSON object")
    tune.add_argument("--config", metavar="JSON", help="base settings file; flags override it")
    tune.add_argument("--output", metavar="DIR", help="search directory (default runs/tune-<task>-<tuner>)")
    tune.add_argument("--overwrite", action="store_true", help="discard the finished trials and start over")
    tune.add_argument("--distributed", choices=["chief", "worker"],
                      help="keras-tuner distributed mode: the chief oracle, or a worker running trials")
    tune.add_argument("--oracle-host", default="127.0.0.1", help="chief address (default 127.0.0.1)")
    tune.add_argument("--oracle-port", type=_in_range(int, 1, 65535), default=8000, help="chief port (default 8000)")
    tune.add_argument("--worker-id", type=_in_range(int, 0, 100_000), default=0, help="this worker's number (tuner<N>)")
    tune.add_argument("--connect-timeout", type=_in_range(float, 0, 86_400), default=60,
                      help="seconds a worker waits for the chief (default 60)")
    add_config_flags(tune)
    tune.set_defaults(func=cmd_tune)


def _add_export(sub) -> None:
    """export: SavedModel or TFLite, version, quantization."""
    from tf_emnist.export import FORMATS, QUANTIZATIONS

    export = sub.add_parser("export", help="export a run's model, or an ensemble, as a TensorFlow SavedModel "
                                           "(TF Serving layout)",
                            description="Writes OUTPUT/<task>/<version>/ with signatures serving_default "
                                        "(uint8 [N,28,28] upright images) and serve_stored (NIST/tfds orientation). "
                                        "Several sources (run directories or earlier exports) make one SavedModel "
                                        "that averages their probabilities, each model counted once.")
    export.add_argument("sources", nargs="+", metavar="SOURCE", type=_model_path,
                        help="a run directory; several run directories or exports: their ensemble")
    export.add_argument("--output", default="saved_models", help="export root (default: saved_models)")
    export.add_argument("--version", type=_in_range(int, 1, 2**31 - 1),
                        help="version number (default: the next free one)")
    export.add_argument("--force", action="store_true", help="replace an existing version")
    export.add_argument("--require-xla", action=argparse.BooleanOptionalAction, default=False,
                        help="mark the exported graph as XLA-compiled, which then needs XLA to run (default off: the "
                             "export loads anywhere, TensorFlow Serving included; `tf-emnist serve --xla` compiles "
                             "with XLA in its own process anyway)")
    export.add_argument("--format", choices=FORMATS, default="savedmodel",
                        help="savedmodel (default), or tflite: OUTPUT/<task>-tflite/<version>/model.tflite, "
                             "built-in ops only, any batch size; from run directories")
    export.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="TFLite only: dynamic (int8 weights and matmuls: smaller, and faster where the CPU has "
                             "int8 units, docs/export.md; check its accuracy with `tf-emnist evaluate --split "
                             "validation`), or float16 (half the size, float32's speed)")
    export.set_defaults(func=cmd_export)


def _add_predict(sub) -> None:
    """predict: images to characters."""
    predict = sub.add_parser("predict", help="classify character images (PNG/JPEG, or .npy of uint8 [N,28,28])",
                             description="MODEL is an export (SavedModel or TFLite) or a run directory. Each image holds one "
                                         "character, any size, dark on light or light on dark.")
    predict.add_argument("model", type=_model_path,
                         help="an export (SavedModel or TFLite; a folder of versions means the newest) or a run directory")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE",
                         help="image files (PNG, JPEG, any mode Pillow reads) of one character each, or .npy files "
                              "of uint8 [N, 28, 28] upright arrays")
    predict.add_argument("--top-k", type=_positive_int, help="characters to show per image (default 3, or every "
                                                            "class of a task with fewer)")
    predict.add_argument("--segment", action="store_true",
                         help="each image holds a line of characters written apart: answer the string, left to right")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.set_defaults(func=cmd_predict, prog="tf-emnist predict")


def _add_serve(sub) -> None:
    """serve: the HTTP server."""
    serve = sub.add_parser("serve", help="serve a model over HTTP: TensorFlow Serving's REST API and a drawing pad",
                           description="GET / is a page to draw characters on; POST /predict takes image files "
                                       "(field 'files'; segment, top_k); /v1/models/NAME[:predict|/metadata] "
                                       "speak TensorFlow Serving's REST API. Ctrl-C stops it.")
    serve.add_argument("model", type=_model_path,
                       help="an export (SavedModel or TFLite; a folder of versions means the newest) or a run directory")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=_in_range(int, 1, 65535), default=8501,
                       help="port (default 8501, as TensorFlow Serving's REST)")
    serve.add_argument("--model-name", help="the NAME in /v1/models/NAME (default: the task, e.g. merged)")
    serve.add_argument("--max-batch-size", type=_in_range(int, 1, 4096), default=64,
                       help="images of concurrent requests run as one batch, at most (default 64; 1: no batching)")
    serve.add_argument("--batch-timeout-ms", type=_in_range(float, 0, 10_000), default=2.0,
                       help="how long a batch waits for more requests after its first (default 2 ms)")
    serve.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                       help="compile the model with XLA in the server's process (default on; the export on disk "
                            "stays portable)")
    serve.set_defaults(func=cmd_serve)


def _add_bench(sub) -> None:
    """bench: the benchmark against the PyTorch yardstick."""
    from tf_emnist.bench import DEFAULT_BASELINE

    bench = sub.add_parser("bench", help="throughput, latency and memory beside the PyTorch yardstick",
                           description="Synthetic data of EMNIST shape. PyTorch figures appear when torch is installed.")
    bench.add_argument("--tasks", nargs="+", default=["digit-letter", "merged"], help="presets to measure")
    bench.add_argument("--steps", type=_in_range(int, 1, 100_000), default=30,
                       help="timed training steps per round (default 30)")
    bench.add_argument("--rounds", type=_in_range(int, 1, 1000), default=2,
                       help="Keras/PyTorch alternations; medians kept (default 2)")
    bench.add_argument("--baseline", default=DEFAULT_BASELINE,
                       help="the PyTorch yardstick script (default: benchmarks/seed_torch_lstm.py, the study's model; "
                            "PyTorch figures appear when torch is installed)")
    bench.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                       help="also measure peak RSS training on a full-size train split (default on)")
    bench.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                       help="force XLA on or off for training (default: as training does)")
    bench.add_argument("--bf16-gradients", action=argparse.BooleanOptionalAction, default=None,
                       help="force the LSTM kernel's large matmuls into bfloat16 or float32 "
                            "(default: as training does)")
    bench.add_argument("--lstm-kernel", action=argparse.BooleanOptionalAction, default=None,
                       help="force the LSTM kernel on or off (off: Keras's LSTM, all in XLA; "
                            "default: as training does)")
    bench.add_argument("--backend", nargs="+", choices=BACKENDS, default=[],
                       help="also time training on these Keras backends, each in a process of its own, beside "
                            "TensorFlow's (e.g. --backend jax)")
    bench.add_argument("--output", metavar="JSON", help="write the figures here")
    bench.set_defaults(func=cmd_bench)


def _add_tasks(sub) -> None:
    """tasks: the task table."""
    tasks = sub.add_parser("tasks", help="list the tasks and their presets")
    tasks.set_defaults(func=cmd_tasks)

def cli_reference() -> str:
    """docs/cli.md: every command and flag, from the parser itself (a test keeps the file in step)."""
    os.environ["COLUMNS"] = "100"  # the usage blocks wrap alike on every terminal
    parser = build_parser()
    lines = ["# Command reference", "",
             "Generated from the parser by `python scripts/write_cli_docs.py`; `tf-emnist COMMAND --help` says the same.",
             "", "| command | what it does |", "|---|---|"]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    lines += [f"| [`{name}`](#{name}) | {helps[name]} |" for name in subparsers.choices]
    lines += ["", "Global flags: " + ", ".join(f"`{', '.join(a.option_strings)}`" for a in parser._actions
                                             if a.option_strings and a.dest != "help") + "."]
    for name, sub in subparsers.choices.items():
        lines += ["", f"## {name}", "", "```text", sub.format_usage().strip().replace("usage: ", ""), "```", ""]
        if sub.description:
            lines += [sub.description, ""]
        lines += ["| flag | meaning |", "|---|---|"]
        for action in sub._actions:
            if action.dest == "help":
                continue
            flag = ", ".join(action.option_strings) or action.metavar or action.dest
            text = (action.help or "").replace("|", "\\|") % {"default": action.default, "prog": sub.prog}
            lines.append(f"| `{flag}` | {text} |")
    return "\n".join(lines) + "\n"


TENSORFLOW_ONLY = ("export", "predict", "serve", "bench")  # commands that read or write TensorFlow's formats


def choose_backend(args: argparse.Namespace) -> str:
    """The Keras backend of this command, set before anything imports Keras: the flag, else a resumed
    run's own (train --output), else KERAS_BACKEND, else tensorflow."""
    from tf_emnist.backend import select_backend

    if args.command in TENSORFLOW_ONLY:
        return select_backend("tensorflow")
    name = getattr(args, "backend", None)
    recorded = os.path.join(getattr(args, "output", None) or "", "config.json")
    if name is None and args.command == "train" and getattr(args, "output", None) and os.path.isfile(recorded):
        with open(recorded) as f:
            try:
                name = json.load(f).get("backend")
            except (json.JSONDecodeError, AttributeError):
                name = None  # the run's config is checked, with its one-line error, when the run starts
    return select_backend(name)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    # tf-emnist's progress at INFO; other libraries' INFO (TensorFlow's "Assets written to: <a temporary
    # folder>" on every export) stays out.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tf_emnist").setLevel(logging.WARNING if args.quiet else args.log_level.upper())
    debug = args.log_level == "debug"
    logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.ERROR)  # tfds's notes, e.g.
    from tf_emnist.files import disk_full
    from tf_emnist.nist import DataError
    from tf_emnist.runs import RunDirError

    try:
        args.chosen_backend = choose_backend(args)
        if args.chosen_backend == "tensorflow" and args.command != "tasks":
            from tf_emnist.backend import load_tensorflow

            load_tensorflow(show_logs=debug)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DataError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DATA
    except (ValueError, RunDirError, FileNotFoundError, FileExistsError, ConnectionError, RuntimeError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # permissions, a read-only folder: what, where, and what to do
        if disk_full(e):
            return _disk_full(parser.prog, args.command, e)
        where = f" ({e.filename})" if e.filename else ""
        message = e.strerror or " ".join(str(e).split())
        print(f"{parser.prog} {args.command}: error: {message}{where}; check the path and its permissions, then "
              "rerun the same command", file=sys.stderr)
        return EXIT_IO
    except Exception as e:  # a full disk that a library (TensorFlow, h5py) reports as its own error
        if disk_full(e):
            return _disk_full(parser.prog, args.command, e)
        raise


def _disk_full(prog: str, command: str, error: BaseException) -> int:
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    print(f"{prog} {command}: error: no space left on device{where}; free some space, then rerun the same command "
          "(nothing half-written is kept)", file=sys.stderr)
    return EXIT_IO


def run(argv=None) -> None:
    """The console script: main's exit code. A process of a cluster that fails leaves at once: with a peer
    gone, JAX's orderly shutdown would wait minutes for it."""
    code = main(argv)
    from tf_emnist.backend import joined

    if code and joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
