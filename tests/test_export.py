"""SavedModel and TFLite export, reload with plain TensorFlow, versions, atomicity, ensembles."""
import json
import os

import numpy as np
import pytest

from tests.conftest import run_cli
from tf_emnist.config import TrainConfig
from tf_emnist.export import export_model
from tf_emnist.runs import load_run
from tf_emnist.training import train


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run



def test_export_reloads_with_plain_tensorflow_and_matches_keras(run_dir, tmp_path):
    import tensorflow as tf

    path = export_model(run_dir, str(tmp_path))
    assert path == str(tmp_path / "merged" / "1")
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    spec = serve.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28]
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    out = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (7, 47)
    assert out["class_ids"].dtype == np.int32 and out["characters"].dtype == object

    model, config, task = load_run(run_dir)
    # Upright uint8 in; the Keras model takes upright float rows.
    expected = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert [c.decode() for c in out["characters"]] == [task.class_names[i] for i in expected.argmax(1)]
    # A large batch goes through in two halves: same answers, same order.
    many = np.random.default_rng(1).integers(0, 256, (301, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(serve(images=tf.constant(many))["logits"].numpy(),
                               model.predict(many.astype(np.float32) / 255.0, verbose=0), atol=1e-5)
    stored = loaded.signatures["serve_stored"](images=tf.constant(images.transpose(0, 2, 1)))
    np.testing.assert_allclose(stored["logits"].numpy(), out["logits"], atol=1e-5)
    extra = os.path.join(path, "assets.extra")
    assert json.load(open(os.path.join(extra, "config.json")))["task"] == "merged"
    assert open(os.path.join(extra, "labels.txt")).read().split() == list(task.class_names)


def test_exports_are_portable_unless_xla_is_asked_for(run_dir, tmp_path):
    from tf_emnist.export import xla_functions

    assert xla_functions(export_model(run_dir, str(tmp_path))) == []  # loads where XLA is off (TF Serving)
    assert xla_functions(export_model(run_dir, str(tmp_path), require_xla=True))  # opt-in: must-compile functions


def test_tfsmlayer_loads_the_export(run_dir, tmp_path):
    import keras

    path = export_model(run_dir, str(tmp_path))
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    out = layer(np.zeros((2, 28, 28), np.uint8))
    assert out["logits"].shape == (2, 47)


def test_versions_count_up_and_are_never_overwritten_without_force(run_dir, tmp_path, capsys):
    assert run_cli("export", run_dir, "--output", tmp_path) == 0
    assert run_cli("export", run_dir, "--output", tmp_path) == 0
    assert sorted(os.listdir(tmp_path / "merged")) == ["1", "2"]
    marker = tmp_path / "merged" / "1" / "marker"
    marker.write_text("old")
    assert run_cli("export", run_dir, "--output", tmp_path, "--version", 1) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and marker.exists()
    assert run_cli("export", run_dir, "--output", tmp_path, "--version", 1, "--force") == 0
    assert not marker.exists() and (tmp_path / "merged" / "1" / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path / "merged")) == ["1", "2"]  # no temporary folders left


def test_a_folder_of_versions_means_its_newest_as_in_tensorflow_serving(run_dir, tmp_path):
    from tf_emnist.cli.main import build_parser, config_from_args
    from tf_emnist.sources import newest_version

    for version in (2, 10):
        export_model(run_dir, str(tmp_path), version=version)
    (tmp_path / "merged" / "11").mkdir()  # not an export: passed over
    newest = str(tmp_path / "merged" / "10")
    assert newest_version(tmp_path / "merged") == newest
    assert newest_version(run_dir) == run_dir and newest_version(newest) == newest
    parse = build_parser().parse_args
    assert parse(["predict", str(tmp_path / "merged"), "x.png"]).model == newest
    assert parse(["evaluate", str(tmp_path / "merged"), run_dir]).run_dirs == [newest, run_dir]
    args = parse(["train", "--teacher", f"{tmp_path / 'merged'},{run_dir}"])
    assert config_from_args(args).teacher == f"{newest},{os.path.abspath(run_dir)}"  # recorded as the version taught


def test_interrupted_export_leaves_nothing_behind(run_dir, tmp_path, monkeypatch):
    import tf_emnist.export

    def crash(*args):  # interrupted after the SavedModel is written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(tf_emnist.export, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(run_dir, str(tmp_path))
    assert os.listdir(tmp_path / "merged") == []


def test_exports_are_readable_by_other_users(run_dir, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        path = export_model(run_dir, str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # not mkdtemp's private 0700
    assert stat.S_IMODE(os.stat(os.path.join(path, "assets.extra", "config.json")).st_mode) == 0o644


@pytest.fixture(scope="module")
def other_runs(run_dir, tmp_path_factory):
    """Two more runs of the same data and validation split, with other widths and seeds."""
    root = tmp_path_factory.mktemp("members")
    config = load_run(run_dir)[1]
    runs = []
    for width, seed in ((12, 1), (6, 2)):
        train(config.replace(hidden_dim=width, seed=seed, validation_seed=config.seed), str(root / f"run{width}"),
              verbose=0)
        runs.append(str(root / f"run{width}"))
    return runs


def test_export_stores_each_weight_once(run_dir, tmp_path):
    import tensorflow as tf

    path = export_model(run_dir, str(tmp_path))
    model = load_run(run_dir)[0]
    stored = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    stored_values = sum(int(np.prod(shape)) for name, shape in stored if shape)
    assert stored_values == model.count_params()


def test_ensemble_export_averages_its_models_and_nests(run_dir, other_runs, tmp_path, capsys):
    import tensorflow as tf

    def probabilities(path, images):
        serve = tf.saved_model.load(path).signatures["serving_default"]
        return serve(images=tf.constant(images))["probabilities"].numpy()

    images = np.random.default_rng(2).integers(0, 256, (300, 28, 28), dtype=np.uint8)  # > SPLIT_FROM: two halves
    singles = [probabilities(export_model(r, str(tmp_path / "single")), images)
               for r in (run_dir, *other_runs)]

    assert run_cli("export", run_dir, other_runs[0], "--output", tmp_path / "pair", "--no-require-xla") == 0
    pair = str(tmp_path / "pair" / "merged" / "1")
    np.testing.assert_allclose(probabilities(pair, images), (singles[0] + singles[1]) / 2, atol=1e-5)
    members = json.load(open(os.path.join(pair, "assets.extra", "ensemble.json")))["members"]
    assert [m["hidden_dim"] for m in members] == [8, 12]
    stored = tf.saved_model.load(pair).signatures["serve_stored"](images=tf.constant(images.transpose(0, 2, 1)))
    np.testing.assert_allclose(stored["probabilities"].numpy(), (singles[0] + singles[1]) / 2, atol=1e-5)

    # An exported ensemble of two plus a third run: each of the three models counts once.
    trio = export_model([pair, other_runs[1]], str(tmp_path / "trio"))
    np.testing.assert_allclose(probabilities(trio, images), sum(singles) / 3, atol=1e-5)
    assert len(json.load(open(os.path.join(trio, "assets.extra", "ensemble.json")))["members"]) == 3

    # The exported ensemble evaluates like the ensemble of its runs, on both splits.
    from tf_emnist.evaluate import evaluate_runs
    for split in ("validation", "test"):
        of_runs = evaluate_runs([run_dir, *other_runs], split=split, output=tmp_path / "runs")
        of_exports = evaluate_runs([pair, other_runs[1]], split=split, output=tmp_path / "exports")
        assert of_exports[f"{split}_accuracy"] == of_runs[f"{split}_accuracy"]
        assert of_exports[f"{split}_loss"] == pytest.approx(of_runs[f"{split}_loss"], abs=1e-4)

    # A lone SavedModel is not exported again, and --tta needs the Keras models.
    assert run_cli("export", pair, "--output", tmp_path / "again") == 2
    assert "is already an export" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--tta needs run directories"):
        evaluate_runs([pair], output=tmp_path / "tta", tta=2)


def test_unroll_lstms_keeps_the_weights_of_plain_and_bidirectional_lstms():
    from tf_emnist.export import unroll_lstms
    from tf_emnist.model import build_model

    model = build_model(TrainConfig(hidden_dim=6, num_layers=2, bidirectional=True), 5)
    twin = unroll_lstms(model)
    lstms = [layer for b in twin.layers[:2] for layer in (b.forward_layer, b.backward_layer)]
    assert len(lstms) == 4 and all(layer.unroll for layer in lstms)
    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(twin(x).numpy(), model(x).numpy(), atol=1e-6)


def test_tflite_export_serves_any_batch_like_the_keras_models(run_dir, other_runs, tmp_path, capsys):
    from tf_emnist.sources import load_tflite_signature

    path = export_model(run_dir, str(tmp_path), format="tflite")
    assert path == str(tmp_path / "merged-tflite" / "1")
    assert sorted(os.listdir(path)) == ["assets.extra", "model.tflite"]
    serve = load_tflite_signature(path)
    model, config, task = load_run(run_dir)
    for n in (1, 7, 301):
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out = serve(images=images)
        expected = model.predict(images.astype(np.float32) / 255.0, verbose=0)
        np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
        assert out["class_ids"].dtype == np.int32 and list(out["class_ids"]) == list(expected.argmax(1))
        assert [c.decode() for c in out["characters"]] == [task.class_names[i] for i in expected.argmax(1)]

    # An ensemble averages its models' probabilities, as the SavedModel's does.
    assert run_cli("export", run_dir, other_runs[0], "--output", tmp_path, "--format", "tflite") == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "merged-tflite" / "2")
    pair = load_tflite_signature(tmp_path / "merged-tflite" / "2")
    images = np.random.default_rng(3).integers(0, 256, (9, 28, 28), dtype=np.uint8)
    singles = [m.predict(images.astype(np.float32) / 255.0, verbose=0) for m in (model, load_run(other_runs[0])[0])]
    mean = sum(np.exp(s) / np.exp(s).sum(1, keepdims=True) for s in singles) / 2
    np.testing.assert_allclose(pair(images=images)["probabilities"], mean, atol=1e-5)

    # `evaluate` reads it (the serve_stored orientation is turned in numpy), as it reads the run.
    from tf_emnist.evaluate import evaluate_runs
    of_run = evaluate_runs([run_dir], split="test", output=tmp_path / "of-run")
    of_tflite = evaluate_runs([path], split="test", output=tmp_path / "of-tflite",
                              data_dir=load_run(run_dir)[1].data_dir)  # an export names its data folder only
    assert of_tflite["test_accuracy"] == of_run["test_accuracy"]
    assert of_tflite["test_loss"] == pytest.approx(of_run["test_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="is a TFLite export, which cannot join a SavedModel"):
        export_model([path, run_dir], str(tmp_path / "mixed"))

    # `predict` reads it; a SavedModel member cannot be converted.
    np.save(tmp_path / "x.npy", images[:2])
    assert run_cli("predict", path, tmp_path / "x.npy", "--json", "--top-k", 1) == 0
    assert [r["top"][0]["character"] for r in json.loads(capsys.readouterr().out)] == [
        task.class_names[i] for i in singles[0][:2].argmax(1)]
    saved = export_model(run_dir, str(tmp_path / "saved"))
    assert run_cli("export", saved, run_dir, "--output", tmp_path, "--format", "tflite") == 2
    assert "is an export; a TFLite export is built from the Keras models" in capsys.readouterr().err


def test_tflite_quantized_exports_shrink_and_stay_close_to_the_float_model(tmp_path, capsys):
    import tensorflow as tf

    from tf_emnist.export import convert_to_tflite
    from tf_emnist.model import build_model
    from tf_emnist.sources import TFLiteSource, source_class
    from tf_emnist.tasks import get_task

    # Weights of 1,024 elements or more get quantized: a 2 x 32 model's kernels have them,
    # the module's tiny run's do not.
    task = get_task("merged")
    config = TrainConfig(hidden_dim=32, num_layers=2)
    model = build_model(config, task.num_classes)
    kernels = sorted((w.shape[1], w.shape[0]) for w in model.weights if len(w.shape) == 2)  # TFLite: [out, in]
    images = np.random.default_rng(4).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    blobs, logits = {}, {}
    for quantize, stored in (("none", np.float32), ("dynamic", np.int8), ("float16", np.float16)):
        blobs[quantize] = convert_to_tflite([(model, config)], task.class_names, quantize)
        interpreter = tf.lite.Interpreter(model_content=blobs[quantize])
        logits[quantize] = interpreter.get_signature_runner("serving_default")(images=images)["logits"]
        shapes = [tuple(t["shape"]) for t in interpreter.get_tensor_details() if t["dtype"] == stored]
        assert set(kernels) <= set(shapes), quantize  # every kernel stored in that type
    assert len(blobs["dynamic"]) < len(blobs["float16"]) < len(blobs["none"])
    spread = logits["none"].std()
    assert np.abs(logits["float16"] - logits["none"]).max() < 0.01 * spread
    assert 0 < np.abs(logits["dynamic"] - logits["none"]).max() < 0.2 * spread

    # The CLI writes the quantization beside the model; a SavedModel is not quantized.
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        convert_to_tflite([(model, config)], task.class_names, "int4")
    run = tmp_path / "run"  # a run directory: the model and its config
    run.mkdir()
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    assert run_cli("export", run, "--output", tmp_path, "--format", "tflite", "--quantize", "dynamic") == 0
    path = capsys.readouterr().out.strip()
    assert source_class(path) is TFLiteSource
    with open(os.path.join(path, "assets.extra", "export.json")) as f:
        info = json.load(f)
    assert {k: v for k, v in info.items() if k != "files"} == {"format": "tflite", "quantize": "dynamic"}
    assert info["files"]["model.tflite"]["bytes"] == os.path.getsize(os.path.join(path, "model.tflite"))
    assert run_cli("export", run, "--output", tmp_path, "--quantize", "dynamic") == 2
    assert "is for TFLite exports; add --format tflite" in capsys.readouterr().err
