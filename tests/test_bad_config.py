"""Bad configuration: one line on stderr naming the culprit, exit status 2, and no Ray (so no actor) started.

Every test runs ``cdam explain`` in-process. This module never starts Ray: ``ray.is_initialized()`` is
False before and after each command, so nothing got as far as the actor pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import ray
import torch

from cdam_worker.pipeline.plan import make_plan
from cdam_worker.pipeline.run_output import prepare_output
from helpers import jpeg_bytes, make_shard, save_tiny_vit
from jobs.cli import build_parser, main
from jobs.explain import explain_options

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
CLASS_NAMES = ["cat", "dog", "zebra", "analog clock", "car", "tree"]


@pytest.fixture(autouse=True)
def quiet_moto() -> Iterator[None]:
    """The in-process moto server logs each request (werkzeug) to stderr: keep stderr for the command."""
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A shard with labels, one without, and a small cdam checkpoint."""
    root = tmp_path_factory.mktemp("bad-config")
    labelled = make_shard(
        root / "labelled-0000.tar", [(f"k{i}", {"jpg": jpeg_bytes(20, 20), "cls": b"1"}) for i in range(3)]
    )
    unlabelled = make_shard(root / "unlabelled-0000.tar", [(f"u{i}", {"jpg": jpeg_bytes(20, 20)}) for i in range(3)])
    checkpoint = save_tiny_vit(root / "model.pt", MODEL_KWARGS, CLASS_NAMES)
    return {"root": str(root), "labelled": str(labelled), "unlabelled": str(unlabelled), "checkpoint": checkpoint}


def explain(
    inputs: dict[str, str], output: str, *extra: str, shards: str | None = None, checkpoint: bool = True
) -> list[str]:
    args = [
        "explain",
        "--shards",
        shards or inputs["labelled"],
        "--output",
        output,
        "--batch-size",
        "2",
        "--actors",
        "1",
    ]
    return args + (["--checkpoint", inputs["checkpoint"]] if checkpoint else []) + list(extra)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command, check it is refused with status 2, one stderr line, and no Ray left running (Ray starts in
    the background as the command begins); return that line."""
    assert not ray.is_initialized(), "another module left Ray running: this check would prove nothing"
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cdam explain: error: ")
    assert not ray.is_initialized()
    return lines[0]


def test_unknown_model_name(inputs, tmp_path, capsys):
    line = refused(explain(inputs, str(tmp_path / "out"), "--model", "vit_smal_patch16_224", checkpoint=False), capsys)
    assert "unknown timm model 'vit_smal_patch16_224'" in line and "did you mean" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_fit_the_model(inputs, tmp_path, capsys):
    line = refused(explain(inputs, str(tmp_path / "out"), "--model-kwargs", json.dumps({"depth": 3})), capsys)
    assert f"checkpoint {inputs['checkpoint']} does not fit model 'vit_small_patch16_224'" in line
    assert "missing" in line and "blocks.2." in line


def test_class_index_out_of_range(inputs, tmp_path, capsys):
    line = refused(explain(inputs, str(tmp_path / "out"), "--targets", "classes:2,99"), capsys)
    assert "class index 99 is out of range" in line and "6 classes" in line


def test_unknown_class_name(inputs, tmp_path, capsys):
    line = refused(explain(inputs, str(tmp_path / "out"), "--targets", "classes:zebra,unicorn"), capsys)
    assert "unknown class name 'unicorn'" in line


def test_label_targets_on_shards_without_cls(inputs, tmp_path, capsys):
    line = refused(explain(inputs, str(tmp_path / "out"), "--targets", "label", shards=inputs["unlabelled"]), capsys)
    assert "--targets label needs a 'cls' member" in line and "'u0'" in line


def test_bad_concepts(inputs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "expected NAME=FILE, NAME=FOLDER, NAME=text:PROMPT or NAME=prompts:FILE" in refused(
        explain(inputs, out, "--concepts", "stripes"), capsys
    )
    missing = tmp_path / "nowhere.pt"
    assert f"--concepts c: {missing} is neither a concept file nor a folder" in refused(
        explain(inputs, out, "--concepts", f"c={missing}"), capsys
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert f"--concepts c: folder {empty} holds no images" in refused(
        explain(inputs, out, "--concepts", f"c={empty}"), capsys
    )
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "good.jpg").write_bytes(jpeg_bytes(20, 20))
    (examples / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    line = refused(explain(inputs, out, "--concepts", f"c={examples}"), capsys)
    assert f"--concepts c: corrupt image '{examples / 'broken.jpg'}'" in line
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.ones(7), wrong)
    assert "--concepts c: vector has 7 dims, the model's embedding has 48" in refused(
        explain(inputs, out, "--concepts", f"c={wrong}"), capsys
    )


def test_shard_spec_matching_nothing(inputs, tmp_path, capsys):
    spec = f"{inputs['root']}/val-*.tar"
    line = refused(explain(inputs, str(tmp_path / "out"), shards=spec), capsys)
    assert f"shard spec {spec!r} matches no file" in line


def test_unwritable_output(inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    line = refused(explain(inputs, str(blocker / "out")), capsys)
    assert f"local folder {blocker / 'out'} is not writable" in line


def test_missing_bucket(inputs, s3_server, capsys):
    line = refused(explain(inputs, "s3://cdam-no-such-bucket/run"), capsys)
    assert "S3 bucket 'cdam-no-such-bucket' does not exist" in line


def test_bad_credentials(inputs, s3_strict_auth, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-this-test")
    line = refused(explain(inputs, f"s3://{s3_strict_auth}/run"), capsys)
    assert f"access denied writing to s3://{s3_strict_auth}/run" in line
    assert "wrong-secret-for-this-test" not in line


def test_resume_into_output_made_with_other_settings(inputs, tmp_path, capsys):
    output = tmp_path / "out"
    first = build_parser().parse_args(explain(inputs, str(output), "--targets", "topk:1"))
    prepare_output(make_plan(explain_options(first)), overwrite=False)  # an unfinished run: its manifest, no shard done
    line = refused(explain(inputs, str(output), "--targets", "topk:2", "--dtype", "float16"), capsys)
    assert f"output {output} was made with different settings (maps_dtype, targets)" in line
    assert not (output / "lock.json").exists()
    assert json.loads((output / "manifest.json").read_text())["settings"]["targets"] == "topk:1"


def test_resume_into_output_of_another_program(inputs, tmp_path, capsys):
    output = tmp_path / "out"
    (output / "metadata").mkdir(parents=True)
    (output / "metadata" / "foreign.parquet").write_bytes(b"PAR1")
    line = refused(explain(inputs, str(output)), capsys)
    assert "holds files of an unfinished or foreign run without a manifest" in line
    assert (output / "metadata" / "foreign.parquet").read_bytes() == b"PAR1"


def test_bad_flags_are_refused(inputs, tmp_path, capsys):
    for extra, culprit in [
        (("--batch-size", "0"), "--batch-size must be >= 1"),
        (("--model-kwargs", "{oops"), "--model-kwargs is not valid JSON"),
        (("--targets", "topk:9"), "k=9 exceeds the model's 6 classes"),
    ]:
        assert culprit in refused(explain(inputs, str(tmp_path / "out"), *extra), capsys)
