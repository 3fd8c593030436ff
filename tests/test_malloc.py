"""hpt_dsl.malloc: with glibc's thresholds raised, training passes whose tensors come and go
stop faulting their pages in again on every pass."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

LOOP = """
import resource, sys, torch
from pathlib import Path
from hpt_dsl import models
from hpt_dsl.malloc import keep_freed_memory
print(keep_freed_memory())
torch.set_num_threads(1)
model, _ = models.load_local(Path(sys.argv[1]))
g = torch.Generator().manual_seed(0)

def step(i):  # a forward and backward pass over 64 rows of a length that changes per step
    ids = torch.randint(5, 100, (64, 24 + (i * 7) % 17), generator=g)
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()

for i in range(3):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpt_dsl import models

    return models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def _faults(model: Path, **env: str) -> tuple[bool, int]:
    """(whether the thresholds were set, page faults of 10 training passes) in a new process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "HPT_DSL_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", LOOP, str(model)], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return out[-2] == "True", int(out[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_reused_instead_of_faulted_in_again(tiny: Path) -> None:
    tuned, tuned_faults = _faults(tiny)
    default, default_faults = _faults(tiny, HPT_DSL_MALLOC="default")
    assert tuned and not default
    assert tuned_faults * 4 < default_faults, (tuned_faults, default_faults)


def test_a_user_setting_in_the_environment_wins(tiny: Path) -> None:
    tuned, _ = _faults(tiny, MALLOC_MMAP_THRESHOLD_="65536")
    assert not tuned
