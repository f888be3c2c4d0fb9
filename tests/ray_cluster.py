"""A real Ray cluster on this machine for the ray tier's tests: a head without CPUs (the driver's
node: nothing is placed there) and two worker nodes with two CPUs each, so the tier's actors run
in other processes on other raylets, as on other machines. One per test session, started when a
test first needs it and torn down at the end; every start is bounded by a timeout."""

from __future__ import annotations

import importlib.util

import pytest

SKIP = "ray is not installed (pip install \"kvoffload[ray]\"): the ray tier's tests need a local Ray cluster"
NODE_CPUS = 2
# a node that dies without saying so is declared dead after ~3 s (Ray's default: ~30 s)
SYSTEM = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def available() -> bool:
    return importlib.util.find_spec("ray") is not None


class LocalCluster:
    def __init__(self, workers: int = 2) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        if ray.is_initialized():
            # a test ran the ray tier without asking for this cluster (not marked ``ray``): the
            # tier started a local Ray of its own, which would refuse this one's ray.init
            ray.shutdown()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM})
        try:
            self.workers = [self.add_node() for _ in range(workers)]
            ray.init(address=self.cluster.address, log_to_driver=False, logging_level="ERROR")
        except BaseException:
            self.cluster.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, cpus: int = NODE_CPUS):
        node = self.cluster.add_node(num_cpus=cpus)
        self.cluster.wait_for_nodes(timeout=60)
        return node

    def remove_node(self, node) -> None:
        """The node leaves: its raylet and workers are stopped."""
        self.cluster.remove_node(node, allow_graceful=True)

    def shutdown(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    if not available():
        pytest.skip(SKIP)
    c = LocalCluster()
    yield c
    c.shutdown()
