"""One real Ray instance for the whole integration session (start-up costs ~25 s; never start two)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # 4 logical CPUs on the 2-core box: two engine actors and a reference actor can be scheduled
    # at once (each reserves 1 CPU) while torch runs 1 thread in each.
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
