"""The decode pool inside a Ray worker, as an actor runs it: its fork server skips Ray's worker loop (all of Ray),
and its processes decode a shard exactly as they do in any other process."""

from __future__ import annotations

import ray

from cdam_worker.pipeline.decode_pool import DecodePool, DecodeSettings, SampleRules, _forkserver_preload
from cdam_worker.pipeline.settings import ShardTask
from tests.test_decode_pool import shard, transform  # noqa: F401 - the module's fixtures

PRELOAD = "cdam_worker.pipeline.decode_pool"


def test_a_ray_worker_pool_skips_rays_main_and_decodes_like_any_other(ray_local, shard, transform):  # noqa: F811
    settings = DecodeSettings(transform, SampleRules(False, None))

    def decode_with_two_workers() -> tuple[list[str], list[tuple]]:  # a closure: Ray sends it by value
        pool = DecodePool(2)
        try:
            with pool.samples(ShardTask(0, shard, "cut", 40), settings, 8) as samples:
                outcomes = [
                    (s.key, s.tensor.double().sum().item()) if hasattr(s, "tensor") else (s.key, s.reason)
                    for s in samples
                ]
            return _forkserver_preload(), outcomes
        finally:
            pool.close()

    in_ray = ray.get(ray.remote(decode_with_two_workers).remote())
    here = decode_with_two_workers()
    assert in_ray[0] == [PRELOAD] and here[0] == ["__main__", PRELOAD]  # pytest, the user's script here, is preloaded
    assert in_ray[1] == here[1] and len(here[1]) == 41
