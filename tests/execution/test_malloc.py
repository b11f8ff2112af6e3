"""``cluster.retain_memory``: workers keep freed memory for the next step instead of faulting it
in again (glibc), in this process, in Ray actors, and never when it is switched off."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.data.base import FederatedData
from fedsim.data.partition import Dirichlet
from fedsim.data.sources import load_digits
from fedsim.execution import malloc
from fedsim.execution.local import LocalExecutor
from fedsim.execution.worker import NodeTask, WorkerSpec
from fedsim.models import MLP
from fedsim.seeding import np_rng
from strategies.client import LocalSGD

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's worth of short-lived buffers, straight from the C allocator: eight of 1 MiB, written,
# then freed, so that the free space at the heap's top (8 MiB) exceeds what glibc's default rules
# keep. (Through torch the same pattern is not reliable: torch's small allocations land between
# the buffers or above them depending on the run, and then nothing can be trimmed.)
STEPS = """
import ctypes, resource, sys
from fedsim.execution.malloc import retain_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():
    bufs = [libc.malloc(1 << 20) for _ in range(8)]
    for b in bufs:
        ctypes.memset(b, 1, 1 << 20)
    for b in reversed(bufs):
        libc.free(b)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="retaining freed memory is a glibc setting")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = faults_per_step("default"), faults_per_step("retain")
    # 8 MiB is 2,048 pages of 4 KiB: given back and faulted in again on every step by default
    assert default >= 1000, f"glibc's defaults no longer give the memory back ({default} faults per step)"
    assert retained < 64, f"{retained} page faults per step with retained memory"


def test_elsewhere_than_glibc_it_reports_that_nothing_was_done(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert malloc.retain_freed_memory() is False


@pytest.fixture(scope="module")
def digits_fed():
    ds = load_digits()
    return FederatedData(ds, Dirichlet(alpha=1.0)(ds.y_train, ds.y_test, 4, np_rng(0, "partition")))


def test_the_local_executor_passes_the_setting_to_its_worker(digits_fed, monkeypatch):
    from fedsim.execution import worker

    calls = []
    monkeypatch.setattr(worker, "retain_freed_memory", lambda: calls.append(1) or True)
    spec = WorkerSpec(MLP, (1, 8, 8), 10, LocalSGD(), 0)
    assert LocalExecutor(spec, digits_fed).spec.retain_memory is True
    assert len(calls) == 1  # the worker applied it
    assert LocalExecutor(spec, digits_fed, retain_memory=False).spec.retain_memory is False
    assert len(calls) == 1  # and this one did not


@pytest.mark.integration
@pytest.mark.skipif(not GLIBC, reason="retaining freed memory is a glibc setting")
@pytest.mark.parametrize("retain", [True, False])
def test_ray_actors_retain_memory_only_when_asked(ray_cluster, digits_fed, retain):
    import ray

    from fedsim.execution.ray_executor import RayExecutor

    ex = RayExecutor(WorkerSpec(MLP, (1, 8, 8), 10, LocalSGD(), 0), digits_fed, num_actors=2, retain_memory=retain)
    try:
        params = torch.nn.utils.parameters_to_vector(MLP((1, 8, 8), 10).parameters()).detach()
        assert ex.run_round(params, 0, [NodeTask(0), NodeTask(1)]).node_ids == [0, 1]
        # each actor's own process: True once its worker applied the setting, None if it never did
        states = ray.get([a.__ray_call__.remote(lambda _: malloc._applied) for a in ex.actors])
        assert states == ([True, True] if retain else [None, None])
    finally:
        ex.shutdown()
