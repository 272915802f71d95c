"""experiments/run.py end to end: outputs, export, resume, and one-line errors for bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
QUICKSTART = str(CONFIGS / "quickstart.cfg")
QUICK = ["--epochs=3", "--warmup_epochs=1", "--knn_every=2", "--low_shot_draws=1", "--num_clusters=10,20",
         "--queue_size=256"]


@pytest.fixture(scope="module")
def quickstart_run(runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    runner.execute([f"--flagfile={QUICKSTART}", f"--output_dir={out}"] + QUICK)
    return out


def test_quickstart_writes_every_output(quickstart_run):
    out = quickstart_run
    for name in ("config.json", "history.json", "results.json", "model.keras", "curves.png", "tsne.png",
                 "prototypes_k10.png", "prototypes_k20.png", "saved_model/saved_model.pb"):
        assert (out / name).exists(), name
    assert any((out / "logs" / "train").iterdir())  # TensorBoard events
    results = json.loads((out / "results.json").read_text())
    for row in ("encoder", "raw_pixels"):
        scores = results["evaluation"][row]
        for key in ("knn_top1", "linear_top1", "svm_1shot", "svm_16shot", "ami", "nmi", "ari"):
            assert 0.0 <= scores[key] <= 1.0
    assert results["evaluation"]["raw_pixels"]["knn_top1"] > 0.9  # digits are easy for pixels
    assert results["evaluation"]["encoder"]["linear_top1"] > 0.5  # far above chance (0.1)
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    # One invocation: the epochs' wall time is part of the whole fit() call's.
    assert all(t > 0 for t in history["epoch_seconds"])
    assert results["train_seconds"] == pytest.approx(sum(history["epoch_seconds"]), abs=0.06)
    assert results["train_seconds"] <= results["train_seconds_this_invocation"] + 0.1
    assert history["learning_rate"][0] > history["learning_rate"][1] > history["learning_rate"][2] >= 0  # cosine
    assert history["estep_cluster_seconds"][1] > 0
    assert history["proto_nce"][0] == 0.0 and history["proto_nce"][1] > 0.0
    assert history["val_knn_top1"][0] is None and history["val_knn_top1"][1] is not None
    assert results["last_estep"]["k10_empty_clusters"] == 0.0


def test_saved_model_serves_in_a_fresh_process(quickstart_run, runner, digits):
    """Reload with tf.saved_model.load in a new interpreter; compare with the Keras model here."""
    import keras
    import tensorflow as tf

    images = digits[0][:16]
    np.save(quickstart_run / "probe.npy", images)
    script = (
        "import sys, json, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1] + '/saved_model')\n"
        "x = tf.constant(np.load(sys.argv[1] + '/probe.npy'))\n"
        "a = m.assign(x)\n"
        "print(json.dumps({'features': m.embed(x)['features'].numpy().tolist(),\n"
        "  'prototype': a['prototype'].numpy().tolist(), 'similarity': a['similarity'].numpy().tolist()}))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script, str(quickstart_run)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    model = keras.models.load_model(quickstart_run / "model.keras")
    x = tf.cast(images, tf.float32) / 255.0
    features = tf.math.l2_normalize(model.backbone(x), axis=1).numpy()
    np.testing.assert_allclose(served["features"], features, atol=1e-5)
    keys = model.embed_keys(x).numpy()
    want = np.stack([(keys @ p.numpy().T).argmax(1) for p in model.prototypes], axis=1)
    assert np.asarray(served["prototype"]).shape == (16, 2)
    assert (np.asarray(served["prototype"]) == want).mean() > 0.95  # float ties aside
    assert np.all(np.asarray(served["similarity"]) <= 1.0 + 1e-5)


def test_rerun_resumes_and_a_changed_config_is_refused(runner, tmp_path, capsys):
    out = tmp_path / "resume"
    base = [f"--flagfile={QUICKSTART}", f"--output_dir={out}", "--knn_every=0", "--export=false",
            "--plots=false", "--low_shot_draws=1", "--num_clusters=10", "--queue_size=256", "--warmup_epochs=1",
            "--schedule=constant"]
    runner.execute(base + ["--epochs=2"])
    capsys.readouterr()
    first_seconds = json.loads((out / "history.json").read_text())["epoch_seconds"]
    # A run started before a flag existed resumes: the missing flag counts as its default.
    config = json.loads((out / "config.json").read_text())
    del config["prototype_temperature"]
    (out / "config.json").write_text(json.dumps(config))
    runner.execute(base + ["--epochs=3"])
    assert f"resuming {out} at epoch 2" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    # A constant rate is an optimizer Variable, not a schedule's tensor: logged as the flag's value.
    assert history["learning_rate"] == pytest.approx([config["learning_rate"]] * 3)
    # Training time adds up over both invocations: epochs 1-2 keep their times from the first one.
    assert history["epoch_seconds"][:2] == first_seconds and history["epoch_seconds"][2] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_seconds"] == pytest.approx(sum(history["epoch_seconds"]), abs=0.06)
    config_before = (out / "config.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        runner.execute(base + ["--epochs=3", "--temperature=0.3"])
    assert exit_info.value.code == 2
    assert "different config (differs in: temperature)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config_before


def test_a_simclr_run_from_before_the_projector_flag_is_not_resumed_with_another_head(runner, tmp_path, capsys):
    """SimCLR's projector ends in BatchNorm since --projector_output_norm: a run started before it (its
    config.json lacks the flag) ran a biased-Dense end, so resuming it needs --projector_output_norm=none."""
    out = tmp_path / "old_simclr"
    out.mkdir()
    runner.FLAGS.unparse_flags()
    runner.parse_argv(["run.py", f"--flagfile={QUICKSTART}", "--method=simclr", f"--output_dir={out}"])
    config, _ = runner.resolve_config()
    del config["projector_output_norm"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        runner.execute([f"--flagfile={QUICKSTART}", "--method=simclr", f"--output_dir={out}"])
    assert exit_info.value.code == 2
    assert "different config (differs in: projector_output_norm)" in capsys.readouterr().err
    runner.FLAGS.unparse_flags()
    runner.parse_argv(["run.py", f"--flagfile={QUICKSTART}", "--method=simclr", f"--output_dir={out}",
                       "--projector_output_norm=none"])
    assert runner.compare_with_previous_run(runner.resolve_config()[0], str(out)) is True  # would resume


def make_npz(path, images, labels=None):
    arrays = {"x": images}
    if labels is not None:
        arrays["y"] = labels
    np.savez(path, **arrays)
    return f"npz:{path}"


BAD_INPUTS = [
    # (name, extra flags, expected message fragment)
    ("unknown method", ["--method=swav2"], "--method=swav2: value should be one of"),
    ("unknown dataset", ["--dataset=mnist"], "unknown dataset 'mnist'"),
    ("missing folder", ["--dataset=folder:{tmp}/nowhere"], "does not exist"),
    ("empty folder", ["--dataset=folder:{tmp}/empty"], "is empty"),
    ("only corrupt files", ["--dataset=folder:{tmp}/corrupt"], "none of the 2 files"),
    ("smaller than a batch", ["--batch_size=2048", "--queue_size=2048"], "is larger than the dataset"),
    ("too many clusters", ["--num_clusters=10,5000"], "--num_clusters 5000 exceeds the 1438 training images"),
    ("queue not a multiple", ["--queue_size=1000"], "--queue_size 1000 is not a multiple of --batch_size 128; use e.g. 1024."),
    ("zero temperature", ["--temperature=0"], "--temperature must be > 0"),
    ("negative temperature", ["--temperature=-0.1"], "--temperature must be > 0"),
    ("negative prototype temperature", ["--prototype_temperature=-0.1"], "--prototype_temperature must be >= 0"),
    ("negative prototype weight", ["--prototype_weight=-1"], "--prototype_weight must be >= 0"),
    ("momentum of 1", ["--momentum=1.0"], "--momentum must be in [0, 1)"),
    ("images with NaN", ["--dataset=npz:{tmp}/nan.npz"], "NaN or Inf"),
    ("output dir is a file", ["--output_dir={tmp}/a_file"], "is a file"),
    ("output dir not writable", ["--output_dir={tmp}/a_file/sub"], "is not writable"),
    ("bad flagfile path", ["--flagfile={tmp}/missing.cfg"], "Unable to open flagfile"),
    ("image too small for encoder", ["--encoder=resnet18", "--small_images=false", "--width=4"],
     "needs images of at least 32 px"),
    ("npz without x", ["--dataset=npz:{tmp}/nox.npz"], "no array named 'x'"),
    ("batch vs split BN", ["--batch_size=102", "--queue_size=1020"], "--batch_size 102 is not divisible by --num_splits 4"),
    ("holdout too large", ["--holdout=5000"], "--holdout: holdout count 5000 must be between 1 and 1437"),
    ("bad crop scale", ["--crop_scale=0.5"], "--crop_scale takes two numbers"),
    ("stray argument", ["extra"], "unexpected arguments"),
    # Each family method's own flags and checks.
    ("moco queue not a multiple", ["--method=moco", "--queue_size=1000"], "--queue_size 1000 is not a multiple"),
    ("simclr zero temperature", ["--method=simclr", "--temperature=0"], "--temperature must be > 0"),
    ("simclr batch of one", ["--method=simclr", "--batch_size=1", "--num_splits=1"],
     "--batch_size 1: SimCLR needs a global batch of at least 2 images"),
    ("simclr negative trust coefficient", ["--method=simclr", "--lars_trust_coefficient=-1"],
     "--lars_trust_coefficient must be >= 0"),
    ("simclr negative weight decay", ["--method=simclr", "--weight_decay=-1e-6"], "--weight_decay must be >= 0"),
    ("byol momentum of 1", ["--method=byol", "--momentum=1"], "--momentum must be in [0, 1)"),
    ("byol predictor width 0", ["--method=byol", "--predictor_hidden_dim=0"], "--predictor_hidden_dim must be >= 1"),
    ("byol unknown schedule", ["--method=byol", "--momentum_schedule=linear"], "--momentum_schedule=linear: value"),
    ("simsiam head width 0", ["--method=simsiam", "--hidden_dim=0"], "--hidden_dim must be >= 1"),
    ("simsiam negative learning rate", ["--method=simsiam", "--learning_rate=-0.1"], "--learning_rate must be > 0"),
    ("swav zero epsilon", ["--method=swav", "--epsilon=0"], "--epsilon must be > 0"),
    ("swav no prototypes", ["--method=swav", "--num_prototypes=0"], "--num_prototypes must be >= 1"),
    ("swav one prototype", ["--method=swav", "--num_prototypes=1"], "num_prototypes must be an integer >= 2"),
    ("swav queue not a multiple", ["--method=swav", "--queue_size=1000"], "--queue_size 1000 is not a multiple"),
    ("swav bad small crop scale", ["--method=swav", "--small_crop_scale=0.5"], "--small_crop_scale takes two numbers"),
    ("swav small crops too large", ["--method=swav", "--num_small_crops=2", "--small_crop_size=9"],
     "small crops of 9 px must be between 1 and the image size 8"),
    ("swav bad freeze", ["--method=swav", "--freeze_prototypes_steps=-2"], "--freeze_prototypes_steps must be >= 0"),
    ("supcon zero temperature", ["--method=supcon", "--temperature=0"], "--temperature must be > 0"),
    ("paco negative alpha", ["--method=paco", "--alpha=-0.1"], "--alpha must be >= 0"),
    ("paco no positives", ["--method=paco", "--alpha=0", "--beta=0"], "alpha and beta are both 0"),
    ("paco queue not a multiple", ["--method=paco", "--queue_size=1000"], "--queue_size 1000 is not a multiple"),
    ("supervised unknown loss", ["--method=supervised", "--supervised_loss=focal"], "--supervised_loss=focal: value"),
    ("labels needed", ["--method=paco", "--dataset=npz:{tmp}/nolabels.npz"], "--method=paco trains on labels"),
    ("negative label", ["--method=supervised", "--dataset=npz:{tmp}/badlabels.npz"], "labels must be class ids >= 0"),
    ("long tail without labels", ["--long_tail_imbalance=10", "--dataset=npz:{tmp}/nolabels.npz"],
     "--long_tail_imbalance: dataset 'npz:"),
    ("long tail below 1", ["--long_tail_imbalance=0.5"], "--long_tail_imbalance must be 0 (off) or >= 1"),
]


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "a.png").write_bytes(b"not a png")
    (tmp / "corrupt" / "b.jpg").write_bytes(b"not a jpg")
    images = np.random.default_rng(0).uniform(size=(40, 8, 8, 1)).astype(np.float32)
    images[3, 2, 2, 0] = np.nan
    make_npz(tmp / "nan.npz", images)
    np.savez(tmp / "nox.npz", images=np.zeros((4, 8, 8)))
    clean = np.random.default_rng(1).uniform(size=(200, 8, 8, 1)).astype(np.float32)
    make_npz(tmp / "nolabels.npz", clean)
    make_npz(tmp / "badlabels.npz", clean, labels=np.arange(200) % 10 - 1)
    (tmp / "a_file").write_text("a file, not a folder")
    # An earlier run's outputs that a failed command must leave untouched.
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "results.json").write_text('{"keep": true}')
    return tmp


@pytest.mark.parametrize("name,extra,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(runner, bad_input_dir, capsys, name, extra, message):
    extra = [e.format(tmp=bad_input_dir) for e in extra]
    argv = [f"--flagfile={QUICKSTART}", f"--output_dir={bad_input_dir}/existing", "--epochs=1"] + extra
    with pytest.raises(SystemExit) as exit_info:
        runner.execute(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.startswith("run.py: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    existing = bad_input_dir / "existing"
    assert (existing / "results.json").read_text() == '{"keep": true}'
    assert not (existing / "config.json").exists()


def test_command_line_error_has_no_traceback():
    """The real CLI: status 2 and one line on stderr (before TensorFlow is even imported)."""
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--temperature=-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "run.py: error: --temperature must be > 0, got -1.0."


def test_head_init_choices_are_the_librarys(runner):
    """run.py spells --head_init's choices out (it defines flags before importing TensorFlow): keep them heads.INITS."""
    from keras_pcl.models import heads

    assert tuple(runner.FLAGS["head_init"].parser.enum_values) == heads.INITS


def test_projector_output_norm_choices_are_the_librarys(runner):
    """--projector_output_norm spells heads.OUTPUT_NORMS out, with "none" for None."""
    from keras_pcl.models import heads

    choices = runner.FLAGS["projector_output_norm"].parser.enum_values
    assert {None if c == "none" else c for c in choices} == set(heads.OUTPUT_NORMS)


@pytest.mark.parametrize("flagfile", sorted(p.name for p in CONFIGS.glob("*.cfg")))
def test_shipped_flagfiles_resolve_and_validate(runner, flagfile):
    """Each flagfile in experiments/configs names only flags the runner has, with values it accepts,
    and none its method or augmentation ignores (a flag left over from another method would be a
    silent no-op)."""
    runner.FLAGS.unparse_flags()
    runner.parse_argv(["run.py", f"--flagfile={CONFIGS / flagfile}"])
    config, ignored = runner.resolve_config()
    assert ignored == []
    assert runner.colour_flags_ignored(config) == []
    runner.validate(config)


@pytest.mark.parametrize("given,center,scale", [(None, True, True), ("batch_no_affine", False, False), ("none", None, None)])
def test_simclr_projector_ends_as_asked(runner, given, center, scale):
    """SimCLR's projector ends in affine BatchNorm by default (lightly's head); the
    flag gives BatchNorm without scale and shift, or a Dense with bias."""
    import keras

    import keras_pcl

    runner.FLAGS.unparse_flags()
    runner.parse_argv(["run.py", f"--flagfile={QUICKSTART}", "--method=simclr"]
                      + ([f"--projector_output_norm={given}"] if given else []))
    config, ignored = runner.resolve_config()
    assert not ignored and config["projector_output_norm"] == (given or "batch")
    model = runner.REGISTRY["simclr"].build(keras_pcl, config, keras_pcl.backbones.small_cnn((8, 8, 1)), None)
    last, dense = model.projector.layers[-1], [layer for layer in model.projector.layers
                                               if isinstance(layer, keras.layers.Dense)][-1]
    if given == "none":
        assert last is dense and dense.use_bias
    else:
        assert isinstance(last, keras.layers.BatchNormalization) and not dense.use_bias
        assert (last.center, last.scale) == (center, scale)


@pytest.mark.parametrize("method", ["moco", "simclr", "byol", "simsiam", "swav", "supcon", "paco", "supervised"])
def test_each_method_trains_evaluates_and_exports_on_the_quickstart(runner, tmp_path, capsys, method, digits):
    """--flagfile=quickstart.cfg --method=M (PCL: test_quickstart_writes_every_output): results beside raw
    pixels, a SavedModel serving `embed`, model.keras, the curves of the method's own logs and t-SNE."""
    import tensorflow as tf

    out = tmp_path / method
    # BYOL: another method's flag (reported, not checked), and the PyTorch heads' initialisation;
    # SimCLR: the colour jitter in a random order per image; supervised: the colour flags its
    # augmentation has no use for (reported).
    extra = {"byol": ["--queue_size=1000", "--head_init=torch"], "simclr": ["--jitter_order=random"],
             "supervised": ["--brightness_mode=multiply", "--jitter_order=random"]}.get(method, [])
    runner.execute([f"--flagfile={QUICKSTART}", f"--method={method}", f"--output_dir={out}", "--epochs=2",
                    "--knn_every=0", "--low_shot_draws=1"] + extra)
    printed = capsys.readouterr().out
    if method == "byol":
        assert "--method=byol does not use --queue_size; ignored." in printed
    assert ("--brightness_mode, --jitter_order ignored" in printed) == (method == "supervised")
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method
    assert ("queue_size" in config) == (method in ("moco", "swav", "paco"))  # only the method's own flags
    assert config["head_init"] == ("torch" if method == "byol" else "keras")
    assert config["jitter_order"] == ("random" if method in ("simclr", "supervised") else "fixed")
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method
    for row in ("encoder", "raw_pixels"):
        for key in ("knn_top1", "linear_top1", "svm_1shot", "svm_4shot", "ami"):
            assert 0.0 <= results["evaluation"][row][key] <= 1.0
    assert results["evaluation"]["encoder"]["linear_top1"] > 0.3  # far above chance (0.1) after 2 epochs
    for name in ("model.keras", "curves.png", "tsne.png", "history.json"):
        assert (out / name).exists(), name
    if method == "byol":  # model.keras rebuilds the heads' FanInUniformDense layers
        import keras

        import keras_pcl
        saved = keras.saving.load_model(out / "model.keras")
        assert isinstance(saved.predictor.layers[0], keras_pcl.models.heads.FanInUniformDense)
    history = json.loads((out / "history.json").read_text())
    model = runner_model_class(method)
    assert set(model.loss_names) | set(model.metric_names) <= set(history)
    served = tf.saved_model.load(str(out / "saved_model"))
    features = served.embed(tf.constant(digits[0][:5]))["features"].numpy()
    assert features.shape[0] == 5 and np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    if method == "swav":  # learnt prototypes: assign serves the nearest one, and the gallery shows them
        assigned = served.assign(tf.constant(digits[0][:5]))
        assert assigned["prototype"].shape == (5, 1) and (assigned["similarity"].numpy() <= 1 + 1e-5).all()
        assert (out / f"prototypes_k{config['num_prototypes']}.png").exists()
        assert {"prototypes_used", "code_entropy", "output_std"} <= set(history)
    else:
        assert not hasattr(served, "assign")  # no prototypes, no assign endpoint
    monitors = results.get("collapse_monitors", {})
    assert set(monitors) == set(model.collapse_monitors)  # SwAV's three, BYOL's and SimSiam's output_std
    for name, report in monitors.items():
        values = history[name]
        assert report["last"] == values[-1] and report["lowest"] == min(values) == values[report["lowest_epoch"] - 1]
    if method in ("paco", "supervised"):  # a classifier: classify serves it, results.json reports it
        classified = served.classify(tf.constant(digits[0][:5]))
        np.testing.assert_allclose(classified["probabilities"].numpy().sum(1), 1.0, rtol=1e-5)
        assert classified["label"].shape == (5,)
        report = results["classification"]
        assert report["classifier"] == "the model's classifier" and len(report["per_class_top1"]) == 10
        assert 0 <= report["tail_top1"] <= 1 and len(report["train_class_counts"]) == 10
    else:
        assert not hasattr(served, "classify")


def runner_model_class(method):
    import keras_pcl

    return keras_pcl.models.METHODS[method]


def test_a_bare_run_uses_defaults_that_fit_the_embedded_data(runner, tmp_path, monkeypatch):
    """`python experiments/run.py` with no flags trains PCL on digits; here one epoch of it."""
    monkeypatch.chdir(tmp_path)
    runner.execute(["--epochs=1", "--export=false", "--plots=false", "--low_shot_draws=1", "--raw_pixels=false"])
    config = json.loads((tmp_path / "runs" / "pcl" / "config.json").read_text())
    assert config["dataset"] == "digits" and config["method"] == "pcl"
    assert max(int(k) for k in config["num_clusters"]) <= 1438
    assert json.loads((tmp_path / "runs" / "pcl" / "results.json").read_text())["evaluation"]["encoder"]


def test_an_internal_error_keeps_its_traceback(runner, tmp_path, monkeypatch):
    """Only user mistakes become one-line exit-2 errors; a ValueError from inside is not one."""
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "build_backbone", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        runner.execute([f"--flagfile={QUICKSTART}", f"--output_dir={tmp_path / 'run'}", "--epochs=1"])


def test_a_missing_module_says_how_to_install_it(runner, tmp_path, capsys, monkeypatch):
    """keras_pcl (or TensorFlow) missing from the Python that runs run.py: one line that names the fix."""
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'keras_pcl'", name="keras_pcl")

    monkeypatch.setattr(runner, "build_backbone", missing)
    with pytest.raises(SystemExit) as exit_info:
        runner.execute([f"--flagfile={QUICKSTART}", f"--output_dir={tmp_path / 'run'}", "--epochs=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("run.py: error: No module named 'keras_pcl' in ") and "pip install -e ." in err


@pytest.mark.parametrize("method", ["simclr", "paco"])
def test_a_long_tailed_run_reports_head_middle_and_tail(runner, tmp_path, method):
    """--long_tail_imbalance=10 on digits: the training split follows the exponential profile, the
    test split stays whole, and a self-supervised method's frozen features get a balanced-softmax
    classifier whose head / middle / tail top-1 land in results.json; a method with its own
    classifier reports that one, and the linear classifier on its frozen features beside it."""
    out = tmp_path / "lt"
    runner.execute([f"--flagfile={QUICKSTART}", f"--method={method}", f"--output_dir={out}", "--epochs=2",
                    "--knn_every=0", "--low_shot_draws=1", "--long_tail_imbalance=10", "--export=false",
                    "--plots=false"])
    results = json.loads((out / "results.json").read_text())
    report = results["classification"]
    counts = report["train_class_counts"]
    assert counts[0] == max(counts) and counts[-1] == int(counts[0] * 10 ** -1) and counts == sorted(counts)[::-1]
    assert results["dataset"].endswith("[long-tail 10]")
    probe = "a balanced-softmax linear classifier on the frozen features"
    reports = [report]
    if method == "paco":
        assert report["classifier"] == "the model's classifier"
        reports.append(report["frozen_features"])
    else:
        assert report["classifier"] == probe and "frozen_features" not in report
    for each in reports:
        assert len(each["per_class_top1"]) == 10
        for key in ("top1", "head_top1", "middle_top1", "tail_top1"):
            assert 0 <= each[key] <= 1
