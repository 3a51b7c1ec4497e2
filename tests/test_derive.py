"""Maps derived from the stored basis (``Run.derive``, ``cdam derive``) against the engine, on the demo run,
locally and on S3 (moto, with transient faults), and what derive does with incomplete runs and a held lock."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cdam_worker.derive import derive_maps
from cdam_worker.maps.engine import CDAMExplainer
from cdam_worker.maps.targets import Concept
from cdam_worker.reading import open_run
from cdam_worker.shards.samples import decode_image
from helpers import S3Proxy, upload_folder
from jobs.cli import main
from jobs.verify import verify_output

TOLERANCE = 1e-5  # float32, relative to the largest |score| of the reference


def relative_error(derived: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(derived - reference).max() / np.abs(reference).max())


def copy_run(demo_run: str, folder: Path) -> str:
    shutil.copytree(demo_run, folder / "run")
    return str(folder / "run")


@pytest.fixture(scope="module")
def demo(demo_run: str):
    """The demo run, its model (from the manifest), an explainer, and 12 keys spread over its shards with their inputs."""
    run = open_run(demo_run)
    loaded = run.load_model()
    keys = run.index.column("key").to_pylist()[::21][:12]
    images = torch.stack([loaded.transform(run.image(key)) for key in keys])
    return run, loaded, CDAMExplainer(loaded), keys, images


@pytest.fixture(scope="module")
def concept_file(demo, tmp_path_factory) -> Path:
    """A dot-product concept: the mean embedding of four demo images."""
    _, _, explainer, _, images = demo
    path = tmp_path_factory.mktemp("concept") / "mark.pt"
    Concept("mark", explainer.embed(images[:4]).mean(0)).save(path)
    return path


def test_derived_class_maps_equal_the_engine(demo):
    run, _, explainer, keys, images = demo
    derived = derive_maps(run, "classes:2,circle", keys=keys)
    assert derived.dims == ("image", "target", "y", "x") and derived.shape == (12, 2, 8, 8)
    assert derived["key"].values.tolist() == keys and derived["row"].values.tolist() == run.rows_of(keys).tolist()
    assert (derived["target_class"].values == [2, 0]).all() and derived.attrs["skipped"] == []
    assert relative_error(derived.values, explainer.explain(images, [2, 0]).cdam.numpy()) <= TOLERANCE

    top = derive_maps(run, "topk:2", keys=keys)  # the top classes come from the stored logits
    engine = explainer.explain(images, "topk:2")
    assert (top["target_class"].values == engine.target_class.numpy()).all()
    assert relative_error(top.values, engine.cdam.numpy()) <= TOLERANCE

    labels = run.index.column("label").to_numpy()[[run.index.column("key").to_pylist().index(k) for k in keys]]
    by_label = derive_maps(run, "label", keys=keys)
    assert (by_label["target_class"].values[:, 0] == labels).all()
    assert (
        relative_error(
            by_label.values, explainer.explain(images, "label", labels=torch.from_numpy(labels)).cdam.numpy()
        )
        <= TOLERANCE
    )

    stored = run.maps_for(keys, run.class_names)  # the run stored every class: derived 'all' is the same maps
    assert relative_error(derive_maps(run, "all", keys=keys).values, stored) <= TOLERANCE


def test_derived_concept_maps_equal_the_engine(demo, concept_file):
    run, _, explainer, keys, images = demo
    derived = derive_maps(run, "none", keys=keys, concepts=[f"mark={concept_file}", f"markcos={concept_file}:cosine"])
    vector = Concept.load(concept_file).vector
    engine = explainer.explain(images, "none", concepts=[Concept("mark", vector), Concept("markcos", vector, "cosine")])
    assert (derived["target_class"].values == -1).all()
    assert relative_error(derived.values[:, 0], engine.cdam[:, 0].numpy()) <= TOLERANCE
    assert relative_error(derived.values[:, 1], engine.cdam[:, 1].numpy()) <= TOLERANCE


def test_cdam_derive_writes_into_the_run_resumes_and_verifies(demo, demo_run, concept_file, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    args = ["derive", run_dir, "--targets", "topk:2", "--concepts", f"mark={concept_file}", "--name", "top2"]
    assert main(args) == 0
    assert (
        "derived top2: 3 map(s) per image for 256 images in 4 shard(s) (0 derived before), 0 skipped; status complete"
        in capsys.readouterr().out
    )
    run = open_run(run_dir)
    rows = run.index.column("row").to_numpy()
    expected = derive_maps(run, "topk:2", concepts=[f"mark={concept_file}"])  # in memory, every image in row order
    written = run.group["derived/top2/cdam"].get_orthogonal_selection((rows,))
    assert np.array_equal(written, expected.values)
    assert np.array_equal(
        run.group["derived/top2/target_class"].get_orthogonal_selection((rows,)), expected["target_class"].values
    )
    table = run.table("derived/top2/metadata.parquet")
    assert table.column("key").to_pylist() == expected["key"].values.tolist()
    assert table.column("target_names").to_pylist()[0][2] == "mark"
    flat = expected.values.reshape(len(rows), 3, -1)
    assert np.allclose(
        np.asarray(table.column("relevance_pos_sum").to_pylist()), np.clip(flat, 0, None).sum(2), rtol=1e-6
    )
    assert np.array_equal(np.asarray(table.column("relevance_argmax").to_pylist()), flat.argmax(2))
    assert verify_output(run_dir) == []

    # A derivation cut off before its last marker: the rerun derives that shard only.
    markers = Path(run_dir, "derived/top2/markers")
    (markers / "000002.json").unlink()
    kept = {path.name: path.stat().st_mtime_ns for path in markers.iterdir()}
    assert main(args) == 0
    assert "for 64 images in 1 shard(s) (3 derived before)" in capsys.readouterr().out
    assert {name: (markers / name).stat().st_mtime_ns for name in kept} == kept
    assert verify_output(run_dir) == []

    # Other settings under the same name are refused, with one line.
    assert main(["derive", run_dir, "--targets", "topk:3", "--name", "top2"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"cdam derive: error: derived maps 'top2' of {run_dir} were made with other settings (concepts, targets); use another --name, or --overwrite"
    )

    # A damaged chunk of the derived maps is found by cdam verify.
    chunk = Path(run_dir, "cdam.zarr/derived/top2/cdam/c/1/0/0/0")
    good = chunk.read_bytes()
    chunk.write_bytes(Path(run_dir, "cdam.zarr/derived/top2/cdam/c/0/0/0/0").read_bytes())
    assert verify_output(run_dir) == [
        "derived top2: shard test-000000: Zarr array 'derived/top2/cdam' rows 0..63 do not match their checksum"
    ]
    chunk.write_bytes(good)


def test_a_concept_folder_is_embedded_with_the_runs_model(demo, demo_run, tmp_path):
    run, loaded, explainer, keys, images = demo
    examples = tmp_path / "examples"
    examples.mkdir()
    for key in keys[:3]:
        run.image(key).save(examples / f"{key}.png")
    run_dir = copy_run(demo_run, tmp_path)
    assert main(["derive", run_dir, "--concepts", f"shapes={examples}", "--name", "shapes"]) == 0
    files = sorted(examples.iterdir())
    concept = explainer.concept_from_images(
        "shapes", torch.stack([loaded.transform(decode_image(f.read_bytes(), str(f))) for f in files])
    )
    written = open_run(run_dir).group["derived/shapes/cdam"].get_orthogonal_selection((run.rows_of(keys),))
    assert relative_error(written, explainer.explain(images, "none", concepts=[concept]).cdam.numpy()) <= TOLERANCE


def test_a_run_without_basis_gets_a_one_line_error(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    shutil.rmtree(Path(run_dir, "cdam.zarr/basis"))
    assert main(["derive", run_dir, "--targets", "all", "--name", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"cdam derive: error: {run_dir} has no relevance basis: maps can be derived only from a run made with `cdam explain ... --store-basis`"
    ]


def test_derive_skips_what_the_run_lacks_and_says_why(demo_run, tmp_path, capsys):
    """A shard without its completion marker (failed or cut off) and an image whose arrays read NaN."""
    run_dir = copy_run(demo_run, tmp_path)
    Path(run_dir, "markers/000001.json").unlink()
    run = open_run(run_dir)
    key, row = run.index.column("key")[5].as_py(), int(run.index.column("row")[5].as_py())
    group = zarr.open_group(Path(run_dir, "cdam.zarr"), mode="r+", zarr_format=3)
    group["embedding"][row] = np.nan
    group["basis"][row] = np.nan
    assert main(["derive", run_dir, "--targets", "classes:0", "--name", "c0"]) == 0
    captured = capsys.readouterr()
    assert "note: shard test-000001: no completion marker (still running, failed or cut off): not read" in captured.err
    assert f"note: image {key}: its basis or embedding is not written (reads NaN): not derived" in captured.err
    assert "for 191 images in 3 shard(s) (0 derived before), 1 skipped; status partial" in captured.out
    derived = open_run(run_dir)
    assert derived.table("derived/c0/metadata.parquet").num_rows == 191
    assert derived.group["derived/c0/target_class"][row].tolist() == [-2]
    assert json.loads(Path(run_dir, "derived/c0/manifest.json").read_text())["status"] == "partial"
    assert not [p for p in verify_output(run_dir) if p.startswith("derived")]


def test_derive_on_s3_retries_transient_faults(
    demo, demo_run, concept_file, s3_client, s3_bucket, s3_server, monkeypatch, capsys
):
    url = upload_folder(s3_client, demo_run, s3_bucket, "demo")
    with S3Proxy(s3_server, fail_every=4, fault=("503", "drop")) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        assert (
            main(["derive", url, "--targets", "classes:1", "--concepts", f"mark={concept_file}", "--name", "c1"]) == 0
        )
    monkeypatch.undo()
    assert {fault for _, _, fault in flaky.faulted} == {"503", "drop"}
    assert "256 images in 4 shard(s)" in capsys.readouterr().out
    run = open_run(url)
    rows = run.index.column("row").to_numpy()
    local = derive_maps(demo[0], "classes:1", concepts=[f"mark={concept_file}"])
    assert np.array_equal(run.group["derived/c1/cdam"].get_orthogonal_selection((rows,)), local.values)
    assert verify_output(url) == []


def test_a_second_derive_of_the_same_name_is_refused(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    with open_run(run_dir).exclusive("derive-held"):
        assert main(["derive", run_dir, "--targets", "classes:0", "--name", "held"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"cdam derive: error: output {run_dir} is in use by another cdam job") and "\n" not in line
    assert not Path(run_dir, "derived/held").exists()
