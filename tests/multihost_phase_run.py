"""One process of the sentiment smoke experiment's DPO phase in a simulated multi-host
run (2 processes x 2 CPU devices, jax.distributed on localhost), or the single-process
reference (process id -1, 2 devices). Run by tests/test_experiments_multihost.py on a
copy of a run directory whose earlier phases are finished.

Arguments: process_id, port, workdir.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

NUM_PROCESSES = 2


def main() -> None:
    process_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if process_id >= 0:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
            process_id=process_id,
        )  # fmt: skip
        assert jax.device_count() == 4 and jax.local_device_count() == 2
    from experiments import driver, sentiment

    config = sentiment.get_config("smoke")
    config.run_dir = workdir
    config.methods = ("dpo:beta=0.1",)
    config.mesh.multihost = "false"  # initialized above
    _, returned = driver.run(config, sentiment.EXPERIMENT)
    assert list(returned) == ["methods/dpo_beta=0.1", "report"], list(returned)


if __name__ == "__main__":
    main()
