"""The local Ray clipdr starts (`clipdr.cluster.start_local`, also the suite's ``ray_local``)."""

from __future__ import annotations

import pytest
import ray

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class _Pinger:
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def _state_seen_from_inside(actor_id: str) -> str:
    from ray.util.state import get_actor

    return get_actor(actor_id, timeout=10).state


def test_processes_of_a_local_ray_reach_its_own_state_api(ray_local):
    """Ray Train's placement-group cleaner checks from inside the cluster, through the State API, that its
    controller lives. Without being told its own dashboard it asks the cluster /tmp/ray/ray_current_cluster names
    (a gone `ray start` node: time-outs, a stall at every fit's end), or no dashboard at all."""
    actor = _Pinger.remote()
    assert ray.get(actor.ping.remote())
    assert ray.get(_state_seen_from_inside.remote(actor._actor_id.hex())) == "ALIVE"
    ray.kill(actor)
