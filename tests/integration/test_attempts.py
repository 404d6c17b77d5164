"""Actors named for their run and driver attempt: a later attempt ends its run's earlier attempts' actors, and with
them what they own (a TrainingRun's Ray Train controller and its workers), and touches nothing of another run."""

import time

import pytest

from spin_ray.run.attempts import NAMESPACE, Attempt, earlier_actors, end_earlier_attempts

pytestmark = pytest.mark.ray


class Owner:
    """Stands in for a TrainingRun: it starts an actor of its own (as Ray Train's controller is), which holds a
    placement group (as the controller's worker group does)."""

    def start_child(self):
        import ray

        self.child = ray.remote(num_cpus=0)(Child).remote()
        return ray.get(self.child.hold.remote())


class Child:
    def hold(self) -> str:
        from ray.util.placement_group import placement_group

        self.group = placement_group([{"CPU": 1}], strategy="PACK")
        self.group.wait(timeout_seconds=60)
        return self.group.id.hex()


def test_a_later_attempt_ends_what_earlier_attempts_of_its_run_left_and_nothing_of_another_run(ray_session):
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    first, other = Attempt("/runs", "a"), Attempt("/runs", "b")
    owner = ray.remote(num_cpus=0)(Owner).options(**first.options("train:iter_0")).remote()
    tally = ray.remote(num_cpus=0)(Owner).options(**first.options("pass:iter_0/generation")).remote()
    bystander = ray.remote(num_cpus=0)(Owner).options(**other.options("train:iter_0")).remote()
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(ray.get(owner.start_child.remote(), timeout=60))))
    ray.get([tally.__ray_ready__.remote(), bystander.__ray_ready__.remote()], timeout=60)

    second = Attempt("/runs", "a")
    assert earlier_actors(second) == sorted([first.name("train:iter_0"), first.name("pass:iter_0/generation")])
    assert earlier_actors(first) == []  # an attempt's own actors are not earlier ones
    lines = []
    ended = end_earlier_attempts(second, 60, lines.append)
    assert ended["actors"] == sorted([first.name("train:iter_0"), first.name("pass:iter_0/generation")])
    assert ended["seconds"] < 20
    assert lines == [f"[spin-ray] ended 2 actor(s) an earlier attempt of this run left (pass:iter_0/generation, "
                     f"train:iter_0) in {ended['seconds']:.1f}s"]
    # the owner's own actor died with it, and its placement group is an orphan Ray keeps while the job lives: the
    # driver's resource wait releases it (spin_ray.run.cluster.release_orphaned_groups)
    from spin_ray.run.cluster import release_orphaned_groups

    deadline = time.monotonic() + 30
    while placement_group_table(group)["state"] != "REMOVED" and time.monotonic() < deadline:
        release_orphaned_groups(lambda line: None)
        time.sleep(0.5)
    assert placement_group_table(group)["state"] == "REMOVED"
    ray.get(bystander.__ray_ready__.remote(), timeout=30)  # another run's actor is alive: it answers (else raises)
    assert ray.get_actor(other.name("train:iter_0"), namespace=NAMESPACE)
    assert end_earlier_attempts(second, 60, lines.append) is None and len(lines) == 1
    ray.kill(bystander)
