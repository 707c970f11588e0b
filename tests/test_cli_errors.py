"""Expected failures of every command end in one ``Error:`` line that names the file, with no
traceback and a non-zero exit status; ``--debug`` (or COMAD_DEBUG=1) keeps the traceback."""

import pytest
from click.testing import CliRunner

from cli import main
from core.errors import ExpectedError
from store.features import StoreError
from tests.conftest import one_error


@pytest.fixture(scope="module")
def other_data(photo_tree, tmp_path_factory):
    """The same photos packed in shards of 4: another data digest than ``prepared_data``."""
    from data.shards import prepare

    out = tmp_path_factory.mktemp("other") / "data"
    prepare(photo_tree, out, shard_size=4, progress=False, workers=0)
    return out


@pytest.fixture
def junk(tmp_path):
    """A file that is no checkpoint of any kind."""
    path = tmp_path / "junk.pth"
    path.write_bytes(b"these bytes are not a pickle" * 4)
    return path


def test_prepare_of_an_unreadable_image_names_the_file(tmp_path):
    src = tmp_path / "src" / "cats"
    src.mkdir(parents=True)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    one_error(["prepare", tmp_path / "src", tmp_path / "out"], "broken.jpg")


def test_extract_into_a_store_of_other_data_names_the_store(other_data, teacher_store, tmp_path, tiny_random_init):
    import shutil

    store = tmp_path / "store"              # a copy: the writer lock file lies beside the store
    shutil.copytree(teacher_store, store)
    one_error(["extract", "--teacher", "mae", "--data", other_data, "--store", store, "--random-init",
               "--views", 2, "--decoder", "pil", "--device", "cpu"], store)


def test_extract_with_a_file_that_is_no_checkpoint_names_it(prepared_data, junk, tmp_path):
    one_error(["extract", "--teacher", "mae", "--data", prepared_data, "--store", tmp_path / "store",
               "--checkpoint", junk, "--device", "cpu"], junk)


def test_extract_and_verify_of_a_folder_that_is_no_image_set_name_it(teacher_store, tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)       # an ImageFolder tree, not yet prepared
    one_error(["extract", "--teacher", "mae", "--data", tmp_path / "photos", "--store", tmp_path / "store",
               "--random-init", "--device", "cpu"], tmp_path / "photos")
    one_error(["verify", teacher_store, "--data", tmp_path / "photos"], tmp_path / "photos")


def test_verify_and_inspect_of_a_folder_that_is_no_store_name_it(prepared_data, tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tmp_path), "--data", str(prepared_data)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output    # verify reports problems as such
    assert [line for line in r.output.splitlines() if str(tmp_path) in line] == [
        f"PROBLEM: {tmp_path}: no feature store here (no zarr.json); run `python cli.py extract` first"]
    one_error(["inspect", tmp_path, "--data", prepared_data, "--index", 0,
               "--out", tmp_path / "panel.png"], tmp_path)


def test_inspect_of_a_store_with_other_data_names_the_store(other_data, teacher_store, tmp_path):
    one_error(["inspect", teacher_store, "--data", other_data, "--index", 0,
               "--out", tmp_path / "panel.png"], teacher_store)


def test_train_against_a_store_of_other_data_names_the_store(other_data, teacher_store, tmp_path):
    one_error(["train", "--data", other_data, "--store", teacher_store, "--out", tmp_path / "run",
               "--steps", 1, "--batch-size", 8, "--device", "cpu"], teacher_store)


def test_train_with_an_unknown_config_key_names_the_key(prepared_data, teacher_store, tmp_path):
    one_error(["train", "--data", prepared_data, "--store", teacher_store, "--out", tmp_path / "run",
               "optim.no_such_key=1"], "optim.no_such_key")


def test_export_of_a_folder_that_is_no_run_names_it(tmp_path):
    (tmp_path / "run").mkdir()
    one_error(["export", tmp_path / "run", tmp_path / "student.safetensors"], tmp_path / "run")


@pytest.mark.parametrize("protocol", ["knn", "linear", "finetune"])
def test_eval_of_a_file_that_is_no_checkpoint_names_it(protocol, photo_tree, junk, tmp_path):
    one_error(["eval", protocol, "--checkpoint", junk, "--train", photo_tree, "--val", photo_tree,
               "--device", "cpu", "--workers", 0, "--out", tmp_path / "result.json"], junk)


def test_eval_of_a_damaged_safetensors_file_names_it(photo_tree, tmp_path):
    damaged = tmp_path / "student.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_error(["eval", "knn", "--checkpoint", damaged, "--train", photo_tree, "--val", photo_tree,
               "--device", "cpu", "--workers", 0, "--out", tmp_path / "result.json"], damaged)


@pytest.mark.parametrize("protocol", ["detection", "segmentation"])
def test_eval_of_a_folder_in_the_wrong_layout_names_it(protocol, photo_tree, junk, tmp_path):
    one_error(["eval", protocol, photo_tree, "--checkpoint", junk, "--device", "cpu", "--workers", 0,
               "--out", tmp_path / "result.json"], photo_tree)


def test_demo_into_a_folder_made_with_other_settings_names_it(tmp_path):
    (tmp_path / "config.yaml").write_text("copies: 99\n")
    one_error(["demo", "--out", tmp_path, "--device", "cpu", "--no-progress"], tmp_path)


def test_debug_flag_and_environment_variable_keep_the_traceback(prepared_data, tmp_path):
    args = ["inspect", str(tmp_path), "--data", str(prepared_data), "--index", "0"]
    for argv, env in ((["--debug", *args], None), (args, {"COMAD_DEBUG": "1"})):
        r = CliRunner().invoke(main, argv, env=env)
        assert isinstance(r.exception, StoreError), (argv, r.exception, r.output)
    one_error(args, tmp_path, env={"COMAD_DEBUG": "0"})


def test_the_projects_own_errors_are_expected_errors():
    from teachers.checkpoints import CheckpointError, CheckpointUnavailableError
    from data.shards import PrepareError
    from demo.stages import DemoError
    from train.learner import NonFiniteLoss

    for cls, builtin in ((StoreError, RuntimeError), (PrepareError, ValueError), (CheckpointError, ValueError),
                         (CheckpointUnavailableError, FileNotFoundError), (DemoError, RuntimeError),
                         (NonFiniteLoss, RuntimeError)):
        assert issubclass(cls, ExpectedError) and issubclass(cls, builtin), cls


def test_a_bug_keeps_its_traceback(monkeypatch, prepared_data, tmp_path):
    import store.verify

    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(store.verify, "verify_store", broken)
    r = CliRunner().invoke(main, ["verify", str(tmp_path), "--data", str(prepared_data)])
    assert isinstance(r.exception, KeyError)


@pytest.mark.parametrize("protocol", ["detection", "segmentation"])
def test_dense_eval_into_an_existing_run_without_resume_is_refused_naming_it(protocol, photo_tree, junk, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    line = one_error(["eval", protocol, photo_tree, "--checkpoint", junk, "--device", "cpu", "--workers", 0,
                      "--out", run], run, "--resume")
    assert "already holds a run" in line
    assert (run / "checkpoint.pt").read_bytes() == b"a run's checkpoint"      # nothing overwritten
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("protocol", ["linear", "finetune", "detection", "segmentation"])
def test_eval_resume_with_nothing_to_resume_is_an_error_naming_the_folder(protocol, photo_tree, junk, tmp_path):
    data = [photo_tree] if protocol in ("detection", "segmentation") else ["--train", photo_tree, "--val", photo_tree]
    run = tmp_path / "nothing"
    one_error(["eval", protocol, *data, "--checkpoint", junk, "--device", "cpu", "--workers", 0,
               "--out", run, "--resume"], run, "--resume")
    assert not run.exists()                                                    # nothing made either


def test_eval_with_an_unknown_config_key_names_the_key_and_the_valid_ones(photo_tree, junk, tmp_path):
    line = one_error(["eval", "knn", "--checkpoint", junk, "--train", photo_tree, "--val", photo_tree,
                      "--out", tmp_path / "knn", "no_such_key=1"], "no_such_key", "temperature")
    assert "unknown config key" in line
