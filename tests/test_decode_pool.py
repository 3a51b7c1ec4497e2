"""The actor's decode pool: the same samples, errors and tensor bytes as ``iter_samples`` + the transform, in
shard order, with one worker (a thread) or two (processes); the GPU path's checks and transform steps, run
on CPU tensors; the defaults and flags around them. No Ray here (see test_multinode.py for the job)."""

from __future__ import annotations

import tarfile
import threading

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from cdam_worker import load_model
from cdam_worker.pipeline.actor import GPU_BATCH_RANGE, batch_size_for_memory
from cdam_worker.pipeline.decode_pool import (
    DECODE_CHUNK,
    DecodePool,
    DecodeSettings,
    PreparedSample,
    SampleRules,
    gpu_fallback,
    gpu_jpeg_header,
    tensor_transform_steps,
)
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.shards.samples import Sample, SampleError, decode_image
from cdam_worker.shards.tar_reader import iter_samples
from helpers import image_bytes, jpeg_bytes, make_shard, png_bytes
from jobs.cli import main

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: a smooth random field plus noise."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(smooth, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg_of(image: Image.Image, **options: object) -> bytes:
    return image_bytes(image, "JPEG", quality=90, **options)


@pytest.fixture(scope="module")
def transform():
    return load_model("vit_small_patch16_224", **MODEL_KWARGS).transform


@pytest.fixture(scope="module")
def two_workers():
    """A pool of two worker processes, shared by the tests of this module."""
    pool = DecodePool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 samples: photos of many sizes, and a corrupt JPEG, an in-shard duplicate, a sample without an image,
    a label out of range (for label targets) and a missing label among them; cut inside its last sample."""
    samples = [
        (
            f"k{i:02d}",
            {"jpg": jpeg_of(photo(20 + 3 * i, 60 - i, i)), "cls": str(i % 6).encode(), "json": b'{"i": %d}' % i},
        )
        for i in range(40)
    ]
    samples[3] = ("k03", {"jpg": jpeg_bytes(40, 30)[:200], "cls": b"1"})
    samples[9] = ("k01", {"png": png_bytes(), "cls": b"1"})
    samples[14] = ("k14", {"cls": b"2", "txt": b"no image"})
    samples[21] = ("k21", {"png": png_bytes(17, 9, "L"), "cls": b"99"})
    samples[30] = ("k30", {"jpg": jpeg_bytes()})
    root = tmp_path_factory.mktemp("decode-pool")
    full = make_shard(root / "full.tar", samples)
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-1]
    cut = root / "cut.tar"
    cut.write_bytes(full.read_bytes()[: last.offset_data + 10])  # into the last member's data
    return str(cut)


def reference(url: str, transform, task: ShardTask, rules: SampleRules) -> list[tuple]:
    """What the actor did before the pool: iter_samples, then the job's refusals, label check and transform."""
    outcomes = []
    for index, item in iter_samples(url, require_label=rules.require_label):
        if isinstance(item, Sample):
            if item.key in task.duplicates:
                item = SampleError(item.key, task.duplicates[item.key])
            elif index >= task.n_samples:
                item = SampleError(
                    item.key,
                    f"sample {index} is beyond the {task.n_samples} samples planned for this shard (the shard changed since the job started)",
                )
            elif (
                rules.label_classes is not None and item.label is not None and not 0 <= item.label < rules.label_classes
            ):
                item = SampleError(
                    item.key, f"cls label {item.label} is out of range for a model with {rules.label_classes} classes"
                )
        if isinstance(item, Sample):
            outcomes.append(
                (
                    index,
                    item.key,
                    item.label,
                    item.width,
                    item.height,
                    item.sample_json,
                    transform(item.image).numpy().tobytes(),
                )
            )
        else:
            outcomes.append((item.key, item.reason))
    return outcomes


def outcomes(items: list) -> list[tuple]:
    return [
        (p.index, p.key, p.label, p.width, p.height, p.sample_json, p.tensor.numpy().tobytes())
        if isinstance(p, PreparedSample)
        else (p.key, p.reason)
        for p in items
    ]


@pytest.mark.parametrize("rules", [SampleRules(False, None), SampleRules(True, 6)], ids=["topk", "label"])
def test_one_and_two_workers_give_the_samples_errors_and_bytes_of_iter_samples(shard, transform, two_workers, rules):
    task = ShardTask(0, shard, "cut", 38, duplicates={"k05": "duplicate key 'k05': already in shard other-0000"})
    expected = reference(shard, transform, task, rules)
    errors = [row for row in expected if len(row) == 2]
    assert len(expected) == 41 and (None, "truncated tar after 113 members: unexpected end of data") == expected[-1]
    assert len(errors) == (9 if rules.require_label else 7), errors  # the test covers every kind of refusal
    settings = DecodeSettings(transform, rules)
    one = DecodePool(1)
    try:
        assert outcomes(all_samples(one, task, settings, in_flight=4)) == expected
    finally:
        one.close()
    assert outcomes(all_samples(two_workers, task, settings, in_flight=4)) == expected
    assert outcomes(all_samples(two_workers, task, settings, in_flight=64)) == expected


def fork_server_children() -> set[psutil.Process]:
    """The processes forked by this process's multiprocessing fork server (decode workers)."""
    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return {child for server in servers for child in server.children()}


def test_workers_are_processes_sending_tensors_through_shared_memory(shard, transform, two_workers):
    settings = DecodeSettings(transform, SampleRules(False, None))
    prepared = [
        p
        for p in all_samples(two_workers, ShardTask(0, shard, "cut", 40), settings, in_flight=16)
        if isinstance(p, PreparedSample)
    ]
    assert len(prepared) == 36 and all(p.tensor.is_shared() for p in prepared)
    assert len(fork_server_children()) >= 2


def all_samples(pool: DecodePool, task: ShardTask, settings: DecodeSettings, in_flight: int) -> list:
    with pool.samples(task, settings, in_flight) as samples:
        return list(samples)


def test_a_consumer_that_stops_early_leaves_no_reader_behind(shard, transform, two_workers):
    with two_workers.samples(
        ShardTask(0, shard, "cut", 40), DecodeSettings(transform, SampleRules(False, None)), in_flight=DECODE_CHUNK
    ) as items:
        assert [thread.name for thread in threading.enumerate()].count("read-cut") == 1  # reading before the first take
        assert next(items).key == "k00"
    assert "read-cut" not in [thread.name for thread in threading.enumerate()]


def test_a_next_shard_opened_early_gives_its_own_samples_after_the_current_one(shard, transform, two_workers):
    """An actor opens its next shard while it still takes the current one's samples (no drain at the boundary):
    both streams share the pool and each gives exactly its own samples, in order."""
    settings = DecodeSettings(transform, SampleRules(False, None))
    first, second = ShardTask(0, shard, "cut", 40), ShardTask(1, shard, "cut", 40)
    expected = reference(shard, transform, first, SampleRules(False, None))
    with two_workers.samples(first, settings, 16) as current, two_workers.samples(second, settings, 16) as following:
        assert outcomes(list(current)) == expected
        assert outcomes(list(following)) == expected


def test_a_dead_worker_fails_the_shard_and_the_pool_restarts(shard, transform):
    others = fork_server_children()
    pool = DecodePool(2)
    settings = DecodeSettings(transform, SampleRules(False, None))
    task = ShardTask(0, shard, "cut", 40)
    try:
        assert len(all_samples(pool, task, settings, in_flight=8)) == 41
        victims = sorted(fork_server_children() - others, key=lambda p: p.pid)
        assert len(victims) == 2
        victims[0].kill()
        victims[0].wait(timeout=30)
        with pytest.raises(
            RuntimeError,
            match="a decode worker process died while decoding shard cut .*; the decode pool was restarted",
        ):
            all_samples(pool, task, settings, in_flight=8)
        assert outcomes(all_samples(pool, task, settings, in_flight=8)) == reference(
            shard, transform, task, SampleRules(False, None)
        )
    finally:
        pool.close()


def test_two_shards_that_meet_a_dead_worker_restart_the_pool_once(shard, transform, monkeypatch):
    """Both shards an actor holds may see the broken pool; only the first finder restarts it, so the other does
    not shut down the fresh pool (a shard that met the broken pool fails and is retried by the driver; one whose
    reader reached the fresh pool decodes normally)."""
    starts = []
    start = DecodePool._start
    monkeypatch.setattr(DecodePool, "_start", lambda pool: starts.append(1) or start(pool))
    pool = DecodePool(2)
    settings = DecodeSettings(transform, SampleRules(False, None))
    first, second = ShardTask(0, shard, "cut", 40), ShardTask(1, shard, "cut", 40)
    expected = reference(shard, transform, first, SampleRules(False, None))
    try:
        assert len(all_samples(pool, first, settings, in_flight=8)) == 41  # both workers are up
        victim = min(pool._started.result()._processes.values(), key=lambda p: p.pid)
        victim.kill()
        victim.join(timeout=30)
        with pool.samples(first, settings, 8) as current, pool.samples(second, settings, 8) as following:
            with pytest.raises(RuntimeError, match="a decode worker process died"):
                list(current)
            try:
                assert outcomes(list(following)) == expected
            except RuntimeError as error:
                assert "a decode worker process died" in str(error)
        assert len(starts) == 2  # the first pool and one restart
        assert outcomes(all_samples(pool, first, settings, in_flight=8)) == expected
    finally:
        pool.close()


# -- the GPU path, on the CPU -------------------------------------------------------------------------


def test_gpu_jpeg_header_takes_only_what_nvjpeg_decodes_like_the_cpu_path():
    rotated = Image.Exif()
    rotated[0x0112] = 6
    assert gpu_jpeg_header(jpeg_of(photo(40, 30, 0))).size == (40, 30)
    assert gpu_jpeg_header(jpeg_of(photo(40, 30, 0).convert("L"))).size == (40, 30)
    assert gpu_jpeg_header(jpeg_of(photo(40, 30, 0), progressive=True)) is not None
    assert gpu_jpeg_header(jpeg_of(photo(40, 30, 0), exif=rotated.tobytes())) is None  # turned upright by the CPU path
    assert gpu_jpeg_header(image_bytes(photo(40, 30, 0).convert("CMYK"), "JPEG")) is None
    assert gpu_jpeg_header(jpeg_of(photo(40, 30, 0))[:-100]) is None  # cut: the CPU path reports it
    assert gpu_jpeg_header(png_bytes()) is None


def test_gpu_path_hands_back_jpegs_and_keeps_every_other_outcome(shard, transform):
    """With gpu_jpegs the workers return good JPEGs undecoded; errors and other images are as on the CPU path,
    and a JPEG that takes the CPU fallback gets exactly the CPU path's tensor."""
    task = ShardTask(0, shard, "cut", 40)
    cpu = DecodeSettings(transform, SampleRules(False, None))
    gpu = DecodeSettings(transform, SampleRules(False, None), gpu_jpegs=True)
    pool = DecodePool(1)
    try:
        on_cpu = all_samples(pool, task, cpu, in_flight=8)
        for_gpu = all_samples(pool, task, gpu, in_flight=8)
    finally:
        pool.close()
    assert [type(item) for item in for_gpu] == [type(item) for item in on_cpu]
    assert [item for item in for_gpu if isinstance(item, SampleError)] == [
        item for item in on_cpu if isinstance(item, SampleError)
    ]
    jpegs = [item for item in for_gpu if isinstance(item, PreparedSample) and item.jpeg is not None]
    assert len(jpegs) == 35 and all(item.tensor is None and item.image_name.endswith(".jpg") for item in jpegs)
    by_key = {item.key: item for item in on_cpu if isinstance(item, PreparedSample)}
    for item in jpegs[:3]:
        fallback = gpu_fallback(item, transform)
        assert fallback.jpeg is None and torch.equal(fallback.tensor, by_key[item.key].tensor)
    broken = PreparedSample(0, "bad", None, 1, 1, None, jpeg=b"\xff\xd8\xff" + bytes(50), image_name="bad.jpg")
    assert gpu_fallback(broken, transform) == SampleError("bad", "corrupt image 'bad.jpg': cannot identify image file")


@pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision are deprecated:DeprecationWarning"
)
def test_tensor_transform_steps_follow_the_timm_transform():
    """The GPU path's resize / crop / normalise steps, on CPU tensors decoded by torchvision, against Pillow +
    timm's transform on the ViT-S/16 eval transform (resize 248 bicubic, crop 224, mean/std 0.5).

    Tolerance: 2 grey levels (0.0157 in normalised units) per pixel, what torchvision's uint8 antialiased
    bicubic resize on the CPU gives against Pillow's; on CUDA the resize runs in float and differs more (the
    device check, bench/gpu_check.sh, measures the maps)."""
    from torchvision.io import decode_jpeg

    transform = load_model("vit_small_patch16_224", num_classes=6).transform
    steps = tensor_transform_steps(transform)
    for index, (width, height) in enumerate([(640, 480), (300, 500), (224, 224), (1000, 700)]):
        data = jpeg_of(photo(width, height, index))
        expected = transform(decode_image(data, "photo.jpg"))
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        for step in steps:
            image = step(image)
        assert image.shape == expected.shape == (3, 224, 224)
        assert (image - expected).abs().max() <= 2 / 255 / 0.5 + 1e-6
        assert (image - expected).abs().mean() < 0.003


def test_tensor_transform_steps_refuse_what_they_cannot_run():
    import torchvision.transforms as T

    with pytest.raises(ValueError, match="--decode gpu cannot run the transform step RandomHorizontalFlip on the GPU"):
        tensor_transform_steps(T.Compose([T.Resize(8), T.RandomHorizontalFlip()]))


# -- defaults and flags -------------------------------------------------------------------------------


def test_gpu_batch_size_is_the_largest_power_of_two_that_fits_half_the_free_memory():
    mib = 2**20
    assert batch_size_for_memory(10 * mib, 80_000 * mib) == 512  # capped
    assert batch_size_for_memory(100 * mib, 80_000 * mib) == 256  # 400 fit
    assert batch_size_for_memory(100 * mib, 8_000 * mib) == 32  # 40 fit
    assert batch_size_for_memory(1000 * mib, 8_000 * mib) == GPU_BATCH_RANGE[0]  # 4 fit: never below the floor


def test_decode_flags_are_checked_before_anything_starts(tmp_path, capsys):
    import ray

    shard = make_shard(tmp_path / "a.tar", [("k", {"jpg": jpeg_bytes()})])
    base = ["explain", "--shards", str(shard), "--output", str(tmp_path / "out"), "--model", "vit_small_patch16_224"]
    if not torch.cuda.is_available():
        assert main([*base, "--decode", "gpu"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            "cdam explain: error: --decode gpu needs CUDA, but torch.cuda.is_available() is False on this machine; use --decode cpu"
        ]
    assert main([*base, "--decode-workers", "-1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "cdam explain: error: --decode-workers must be >= 0 (0: sized to the node), got -1"
    ]
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
